"""What a CPU target measures when the hub starts, to choose how its passes run; on CUDA, nothing.

Three choices are timed at start on a CPU, each on the target's own weights and shapes:
- which library computes its float32 matrix products (`--cpu-matmul auto`, `cpu_products.py`);
- whether the pool kernel attends, and up to which view width (`--cpu-attention auto`,
  `pool_kernel.py`);
- what the vocabulary projection costs by the rows it computes, so that the projection walk's
  first passes already weigh a row against a call (`projection.py`; every pass times it after).
On a GPU the products are CUDA's, attention is SDPA's, and the walk learns the projection's cost
from its passes (until then it projects a pass's nodes in one call, as a launch-bound device
would have it anyway).
"""

from __future__ import annotations

import torch

from hub_server.config import HubSettings, default_cache_dir
from hub_server.engine.cpu_products import choose_cpu_products
from hub_server.engine.pool_kernel import PoolKernel, load_pool_kernel
from hub_server.engine.projection import ProjectionWalk

PROJECTION_TIMED_ROWS = 64  # the projection is timed at start up to this many rows (linear beyond)


def time_cpu_choices(
    model, settings: HubSettings, device: str, kv_heads: int, head_dim: int, walk: ProjectionWalk
) -> PoolKernel | None:
    """Time and make a CPU target's choices (see above): its products routed, the walk told the
    projection's costs. Returns the pool kernel, or None where SDPA attends (always on CUDA)."""
    if torch.device(device).type != "cpu":
        return None
    # The rows a pass projects that the timings cover: its sessions' roots, and the widest verify pass (capped).
    timed_rows = min(PROJECTION_TIMED_ROWS, settings.max_batch * (1 + settings.max_draft_tokens))
    choose_cpu_products(model, settings.cpu_matmul, sorted({min(settings.max_batch, timed_rows), timed_rows}))
    # `auto` times the kernel on a typical verify pass: up to 8 sessions of a token and an 8-token draft.
    config = model.config.get_text_config(decoder=True)
    pass_shape = (
        min(settings.max_batch, 8),
        min(1 + settings.max_draft_tokens, 9),
        config.num_attention_heads,
        kv_heads,
        head_dim,
    )
    cache_dir = settings.cache_dir or default_cache_dir()
    kernel = load_pool_kernel(settings.cpu_attention, device, model.dtype, cache_dir, pass_shape)
    hidden_size = model.get_output_embeddings().weight.shape[1]
    hidden = torch.randn(max(2, timed_rows), hidden_size, generator=torch.Generator().manual_seed(0))
    walk.time_rows(hidden.to(device, model.dtype), timed_rows)
    return kernel

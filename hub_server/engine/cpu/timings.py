"""What a CPU target measures when the hub starts, to choose how its passes run; on CUDA, nothing.

Three choices are timed at start on a CPU, each on the target's own weights and shapes:
- which library computes its float32 matrix products (`--cpu-matmul auto`, `products.py`);
- whether the CPU kernel attends, and up to which view width (`--attention auto`: `kernel_widest`,
  called by `attention/choice.py`);
- what the vocabulary projection costs by the rows it computes, so that the projection walk's
  first passes already weigh a row against a call (`projection.py`; every pass times it after).
On a GPU the products are CUDA's, attention is chosen by rule, and the walk learns the
projection's cost from its passes (until then it projects a pass's nodes in one call, as a
launch-bound device would have it anyway).
"""

from __future__ import annotations

import time

import torch

from hub_server.config import HubSettings
from hub_server.engine.attention.metadata import FULL, PassMetadata, ancestor_closure
from hub_server.engine.attention.reference import ReferenceBackend
from hub_server.engine.cpu.kernel import KernelBackend, PoolKernel
from hub_server.engine.cpu.products import choose_cpu_products
from hub_server.engine.kv_pool import BLOCK_TOKENS
from hub_server.engine.projection import ProjectionWalk

PROJECTION_TIMED_ROWS = 64  # the projection is timed at start up to this many rows (linear beyond)
TIMED_WIDTHS = (64, 128, 256, 512, 1024, 2048, 4096)  # `auto`: the views (columns) the kernel is timed at
FASTER = 0.9  # `auto`: the kernel's time at most this share of the reference's
PassShape = tuple[int, int, int, int, int]  # rows, tokens a row, query heads, kv heads, head dims


def time_cpu_choices(model, settings: HubSettings, device: str, walk: ProjectionWalk) -> None:
    """Time and make a CPU target's products and projection choices (see above)."""
    if torch.device(device).type != "cpu":
        return
    # The rows a pass projects that the timings cover: its sessions' roots, and the widest verify pass (capped).
    timed_rows = min(PROJECTION_TIMED_ROWS, settings.max_batch * (1 + settings.max_draft_tokens))
    choose_cpu_products(model, settings.cpu_matmul, sorted({min(settings.max_batch, timed_rows), timed_rows}))
    hidden_size = model.get_output_embeddings().weight.shape[1]
    hidden = torch.randn(max(2, timed_rows), hidden_size, generator=torch.Generator().manual_seed(0))
    walk.time_rows(hidden.to(device, model.dtype), timed_rows)


def sample_pass(shape: PassShape, width: int) -> tuple[list[torch.Tensor], list[torch.Tensor], PassMetadata]:
    """One full-attention layer's pass of `shape` over views of `width` positions: each row's
    past, then its chain of new tokens, each row in blocks of its own. Returns the layer's pool
    (keys, values: one layer each) and the pass's metadata."""
    rows, span = shape[:2]
    heads, dim = shape[3], shape[4]
    generator = torch.Generator().manual_seed(width)
    per_row = -(-max(width, span) // BLOCK_TOKENS)
    keys, values = (torch.randn(1 + rows * per_row, BLOCK_TOKENS, heads, dim, generator=generator) for _ in range(2))
    tables = 1 + torch.arange(rows * per_row).view(rows, per_row)
    past = max(width - span, 0)
    stored = (past + torch.arange(span)).repeat(rows)
    row_of = torch.arange(rows).repeat_interleave(span)
    meta = PassMetadata(
        rows=rows,
        tables=tables,
        lengths=torch.full((rows,), past),
        sizes=torch.full((rows,), span),
        positions=past + torch.arange(span).expand(rows, span),
        ancestors=ancestor_closure(torch.arange(-1, span - 1).expand(rows, span)),
        sources=torch.arange(rows * span),
        targets=tables[row_of, stored // BLOCK_TOKENS] * BLOCK_TOKENS + stored % BLOCK_TOKENS,
        host_lengths=[past] * rows,
        host_sizes=[span] * rows,
    )
    return [keys], [values], meta


def sample_inputs(shape: PassShape, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's queries, keys and values for `shape`, laid out as the projections write them."""
    rows, span, query_heads, heads, dim = shape

    def new(count: int) -> torch.Tensor:  # [B, S, H, D] seen as [B, H, S, D]
        return torch.randn(rows, span, count, dim, generator=generator).transpose(1, 2)

    return new(query_heads), new(heads), new(heads)


@torch.inference_mode()
def timed_layer(kernel: PoolKernel | None, shape: PassShape, width: int, repeats: int = 5) -> float:
    """Seconds one layer of `sample_pass` takes through `kernel` (the reference for None), best of `repeats`."""
    keys, values, meta = sample_pass(shape, width)
    windows = {FULL: 0}
    if kernel is None:
        backend: ReferenceBackend = ReferenceBackend(keys, values, [FULL], windows)
    else:
        backend = KernelBackend(keys, values, [FULL], windows, kernel)
    query, key, value = sample_inputs(shape, torch.Generator().manual_seed(width))
    attention = backend.begin(meta)  # its views and packed arguments: built at the warm-up, once a pass
    best = float("inf")
    for _ in range(repeats + 1):  # one warm-up
        started = time.perf_counter()
        attention.attend(query, key, value, 0, 1.0)
        best = min(best, time.perf_counter() - started)
    return best


def kernel_widest(kernel: PoolKernel, shape: PassShape) -> tuple[int, list[tuple[int, float, float]]]:
    """The widest of `TIMED_WIDTHS` up to which the kernel ran a layer of `shape` in at most
    FASTER of the reference's time (0 if none), and the timings: (width, kernel s, reference s)."""
    widest, timings = 0, []
    for width in TIMED_WIDTHS:
        ours, reference = timed_layer(kernel, shape, width), timed_layer(None, shape, width)
        timings.append((width, ours, reference))
        if ours > FASTER * reference:
            break
        widest = width
    return widest, timings

"""The attention interface: how the target's layers reach a backend, and what a backend is.

The runner's target runs with one attention function (registered with transformers' attention
interface as `POOL_ATTENTION`). A pass hands the model its `PassAttention` (`kv_pool=`), which
transformers carries down to every layer; in each layer the function gives it the layer's new
queries, keys and values, and the pass attention writes the keys and values into their blocks and
attends over each row's session. Any other call of the model (a test's reference decoding, the
hub's own tools) passes no `kv_pool` and gets plain SDPA.

A backend (`AttentionBackend`) turns a pass's neutral metadata (`metadata.PassMetadata`) into a
`PassAttention` once a pass. Two ways through a compiled pass:
- **In the graph** (`PassAttention.traced`: FlexAttention): the compiler traces the attention
  like the rest of the decoder, so the pass compiles as one graph (`fullgraph=True`) over a
  bucket's fixed buffers, which a GPU captures whole as a CUDA graph.
- **Through an operator** (the reference and the CPU kernel): the compiled graph calls one custom
  operator a layer, opaque to it (`THROUGH_OPERATOR`), which reads the active pass
  (`PassAttention.active()`); on a GPU it is tagged unsafe for CUDA graphs, so inductor splits the
  graph around it.
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hub_server.engine.attention.metadata import PassMetadata

POOL_ATTENTION = "specedge_pool"


class PassAttention:
    """One pass's attention over the pool: `attend` runs one layer."""

    traced: ClassVar[bool] = False  # a compiled pass traces `attend` (True) or calls the operator
    copied_bytes: int = 0  # past KV read through a copy (a gather of the views)
    _active: ClassVar[PassAttention | None] = None  # the pass the operator serves now (the device lock: one)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float):
        """Write the layer's new keys and values into their blocks, then attend over each row's session.

        query: [B', Hq, S, D]; key, value: [B', Hkv, S, D]. Returns [B', S, Hq, D]; padding rows' and
        padding tokens' outputs are dropped by the runner."""
        raise NotImplementedError

    @contextlib.contextmanager
    def active(self):
        """The pass the operator serves inside the block (compiled passes that call it)."""
        PassAttention._active = self
        try:
            yield self
        finally:
            PassAttention._active = None


class AttentionBackend(Protocol):
    """Turns a pass's metadata into the attention that runs it, once a pass."""

    name: str

    def begin(self, meta: PassMetadata) -> PassAttention: ...


class _ThroughOperator(PassAttention):
    """What a compiled graph that calls the operator is given: each layer goes to the active pass."""

    def attend(self, query, key, value, layer, scale):
        return torch.ops.specedge.pool_attention(query, key, value, layer, scale)


THROUGH_OPERATOR = _ThroughOperator()


def _attend_active(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float):
    """The active pass's attention for `layer` (see `PassAttention.attend`)."""
    if PassAttention._active is None:
        raise RuntimeError("the pool attention ran outside a pass: run the model inside PassAttention.active()")
    return PassAttention._active.attend(query, key, value, layer, scale)


# The operator is defined at the dispatcher's own level, not with `torch.library.custom_op`,
# whose Python wrapper (autograd and aliasing checks) cost ~20 us a call, 16 calls a pass.
# cudagraph_unsafe: a CUDA graph must not capture it (its views and masks change every pass), so
# under reduce-overhead inductor splits each pass's graph around it, one graph between layers.
_LIBRARY = torch.library.Library("specedge", "DEF")
_LIBRARY.define(
    "pool_attention(Tensor query, Tensor key, Tensor value, int layer, float scale) -> Tensor",
    tags=(torch.Tag.cudagraph_unsafe,),
)
_LIBRARY.impl("pool_attention", _attend_active, "CompositeExplicitAutograd")  # passes run in inference mode


@torch.library.register_fake("specedge::pool_attention")
def _(query, key, value, layer, scale):
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def pool_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: the layer's queries, keys and values of the new tokens.

    Only a pass that hands the model its attention (`kv_pool=`, the runner's) reads the pool."""
    attention = kwargs.pop("kv_pool", None)
    if attention is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs
        )
    if softcap is not None:
        raise ValueError(f"{type(module).__name__} caps its attention logits, which the pool attention does not do")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return attention.attend(query, key, value, module.layer_idx, scale), None


AttentionInterface.register(POOL_ATTENTION, pool_attention_forward)
# Outside a pool pass the model builds SDPA's masks, as with attn_implementation="sdpa"; a pool
# pass hands the model a 4D placeholder instead, which transformers passes through unbuilt.
AttentionMaskInterface.register(POOL_ATTENTION, sdpa_mask)

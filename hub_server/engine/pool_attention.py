"""Attention that reads the KV pool where it lives: no copy of any session's past.

The runner's target runs with this attention function (registered with transformers' attention
interface as `POOL_ATTENTION`). In each layer it first writes the pass's new keys and values
into their sessions' slots, at the columns right after each slot's past ("tentative" columns:
a draft node's keys are written before anyone knows whether it will be accepted), then runs
SDPA over the slots as views of the pool: rows whose slots are consecutive share one call. On a
CPU the hub's own kernel (`pool_kernel.c`) does both in one call instead, where it was built.
A boolean mask, built once per pass and layer kind on the device, lets each query see its
session's past (within the window on sliding layers), the pass's pending tokens and its own
draft ancestors, nothing else. After the pass the runner keeps the accepted path: a chain's
accepted nodes already stand where they belong; a tree's are moved down to close the gap.

A ring (sliding layers) has `spare` columns beyond its window, as wide as the widest row a
pass may carry, so the tentative columns never overwrite a key some query of the pass, or any
later one, still needs.

The work runs inside one custom operator, opaque to torch.compile: a compiled pass fuses
everything around it (projections, norms, MLPs, rotary embeddings) and calls this operator once
a layer, whatever the slots and contexts of the pass; the pass's layout is set beforehand with
`PoolPass.active()`. On a GPU with CUDA graphs the operator runs between the graphs (it is
tagged unsafe to capture), so each layer's other kernels replay as graphs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hub_server.engine.kv_pool import column_positions

if TYPE_CHECKING:
    import ctypes

    from hub_server.engine.pool_kernel import PoolKernel

POOL_ATTENTION = "specedge_pool"
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class LayerKind:
    """What the layers of one kind share: the pool columns each slot has, and the window."""

    capacity: int
    window: int  # 0: full attention


@dataclass
class PoolPass:
    """One pass's layout in the pool: where its new tokens go, and what each token sees.

    B rows of S columns (a row is one session's new tokens, padded); T real tokens in all.
    """

    keys: list[torch.Tensor]  # per layer: the pool's [slots, H, capacity, D]
    values: list[torch.Tensor]
    kinds: list[str]  # per layer
    rows: int  # B: real rows (a compiled pass may run more, as padding)
    sources: torch.Tensor  # [T] each real new token's index in the flattened [B * S] rows
    slots: torch.Tensor  # [T] its slot
    columns: dict[str, torch.Tensor]  # per kind: [T] its column
    widths: dict[str, int]  # per kind: slot columns the pass's views cover
    masks: dict[str, torch.Tensor]  # per kind: [B, 1, S, width] bool, what each query sees
    runs: list[tuple[int, int, int]]  # (first row, end row, first slot): rows of consecutive slots
    row_slots: torch.Tensor | None = None  # [B] each row's slot (for the CPU kernel)
    kernel: PoolKernel | None = None  # the CPU pool kernel, where the hub attends through it
    copied_bytes: int = field(default=0)  # past KV read through a copy instead of a view: 0 here
    _grouped: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # masks for grouped queries
    _targets: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=dict)  # `_writes`, by kind
    _kernel_args: dict[str, ctypes.Array[ctypes.c_int64] | None] = field(default_factory=dict)  # by kind: None for SDPA

    _active: ClassVar[PoolPass | None] = None  # the pass the operator serves now (one at a time: the device lock)

    @contextlib.contextmanager
    def active(self):
        PoolPass._active = self
        try:
            yield self
        finally:
            PoolPass._active = None

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float):
        """Write the layer's new keys and values into their slots, then attend over the slots.

        query: [B', Hq, S, D]; key, value: [B', Hkv, S, D] for B' >= B rows. Returns [B', S, Hq, D].
        """
        kind = self.kinds[layer]
        pool_keys, pool_values = self.keys[layer], self.values[layer]
        if kind not in self._kernel_args:  # the first layer of its kind in this pass: the kernel's or SDPA's
            self._kernel_args[kind] = self._kernel_pass(kind, query, key, pool_keys)
        shared = self._kernel_args[kind]
        if shared is not None and self.kernel is not None:  # one call writes and attends in place (pool_kernel.c)
            return self.kernel.attend(query, key, value, pool_keys, pool_values, shared, scale)
        rows, query_heads, span, dim = query.shape
        heads, width = key.shape[1], self.widths[kind]
        # The new keys and values go to their columns in two indexed copies: the pass's rows are
        # read as [B', S', H] rows of D (the order the projections wrote them, so reading them
        # copies nothing), the pool as one row per (slot, head, column).
        sources, targets = self._writes(kind, key.shape, pool_keys.shape)
        new_keys, new_values = key.transpose(1, 2).reshape(-1, dim), value.transpose(1, 2).reshape(-1, dim)
        if sources is not None:  # some rows are padded: only the real tokens' rows are written
            new_keys, new_values = new_keys.index_select(0, sources), new_values.index_select(0, sources)
        pool_keys.view(-1, dim).index_copy_(0, targets, new_keys)
        pool_values.view(-1, dim).index_copy_(0, targets, new_values)
        groups = query_heads // heads
        # Grouped-query attention as plain attention: the query heads that share a kv head become
        # more queries of it ([B, Hkv, G * S, D]), so each kv head is read once by one call and
        # SDPA needs no GQA path (on this CPU its GQA path cost 1.4x more at 2,000 columns, with
        # the same results to the bit; on CUDA a masked GQA call would fall back to the math path).
        grouped = query.reshape(rows, heads, groups * span, dim) if groups > 1 else query
        mask = self._grouped_mask(kind, groups, query.dtype)
        outputs = []
        for first, end, slot in self.runs:
            keys = pool_keys[slot : slot + end - first, :, :width]  # a view: the past is not copied
            values = pool_values[slot : slot + end - first, :, :width]
            self.copied_bytes += _copied(keys, pool_keys) + _copied(values, pool_values)
            outputs.append(
                F.scaled_dot_product_attention(grouped[first:end], keys, values, attn_mask=mask[first:end], scale=scale)
            )
        if rows > self.rows:  # padding rows of a compiled bucket: nothing to see
            outputs.append(grouped.new_zeros(rows - self.rows, *grouped.shape[1:]))
        attended = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        return attended.reshape(rows, query_heads, span, dim).transpose(1, 2).contiguous()

    def _kernel_pass(self, kind: str, query: torch.Tensor, key: torch.Tensor, pool_keys: torch.Tensor):
        """The kernel's arguments for this kind's layers in this pass, or None where SDPA attends them."""
        width, span = self.widths[kind], query.shape[2]
        if self.kernel is None or self.row_slots is None or not self.kernel.serves(query, width):
            return None
        bias = self._grouped_mask(kind, 1, query.dtype).view(self.rows, span, width)
        writes = (self.sources, self.slots, self.columns[kind])
        return self.kernel.prepare(query, key, pool_keys, writes, self.rows, self.row_slots, bias)

    def _writes(self, kind: str, shape: torch.Size, pool: torch.Size) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Where the layer kind's new keys go, built once a pass: for each real token and kv head,
        its row in the layer's keys seen as [B' * S' * H, D] (sources: the token's place in the
        flattened rows, then its head) and in the pool seen as [slots * H * capacity, D] (targets).
        Sources are None when every place holds a real token (no padding: the rows are read as
        they are, one operation less for keys and values in every layer)."""
        if kind not in self._targets:
            heads, capacity = shape[1], pool[2]
            head = torch.arange(heads, device=self.slots.device)[None, :]
            unpadded = self.sources.numel() == shape[0] * shape[2]  # sources: increasing places, so all of them
            self._targets[kind] = (
                None if unpadded else (self.sources[:, None] * heads + head).reshape(-1),
                ((self.slots[:, None] * heads + head) * capacity + self.columns[kind][:, None]).reshape(-1),
            )
        return self._targets[kind]

    def _grouped_mask(self, kind: str, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """The kind's mask for grouped queries, built once a pass: each query's row repeated for
        every head of its group ([B, 1, G * S, width]), as the scores' additive mask (0 where a
        query sees, -inf where not), which SDPA adds as it is instead of converting a boolean
        mask in every layer."""
        key = (kind, groups)
        if key not in self._grouped:
            mask = self.masks[kind]
            rows, _, span, width = mask.shape
            if groups > 1:
                mask = mask[:, :, None].expand(rows, 1, groups, span, width).reshape(rows, 1, groups * span, width)
            self._grouped[key] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, float("-inf")
            )
        return self._grouped[key]


def _copied(view: torch.Tensor, pool: torch.Tensor) -> int:
    """Bytes of `view` that are not the pool's own memory (a copy), 0 for a view."""
    return 0 if view._base is pool else view.nbytes


def _attend_active(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int, scale: float):
    """The active pass's attention for `layer` (see `PoolPass.attend`)."""
    if PoolPass._active is None:
        raise RuntimeError("the pool attention ran outside a pass: run the model inside PoolPass.active()")
    return PoolPass._active.attend(query, key, value, layer, scale)


# The operator is defined at the dispatcher's own level, not with `torch.library.custom_op`,
# whose Python wrapper (autograd and aliasing checks) cost ~20 us a call, 16 calls a pass.
# cudagraph_unsafe: a CUDA graph must not capture it (its slots and masks change every pass), so
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

    Only a pass that asks for it (`kv_pool=True`, the runner's) reads the pool; any other call
    of the model (a reference decoding in a test, the hub's own tools) gets plain SDPA.
    """
    if not kwargs.pop("kv_pool", False):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs
        )
    if softcap is not None:
        raise ValueError(f"{type(module).__name__} caps its attention logits, which the pool attention does not do")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():  # the compiled graph calls the operator, opaque to it
        return torch.ops.specedge.pool_attention(query, key, value, module.layer_idx, scale), None
    return _attend_active(query, key, value, module.layer_idx, scale), None  # eager: no dispatcher hop


AttentionInterface.register(POOL_ATTENTION, pool_attention_forward)
# Outside a pool pass the model builds SDPA's masks, as with attn_implementation="sdpa"; a pool
# pass hands the model a 4D placeholder instead, which transformers passes through unbuilt.
AttentionMaskInterface.register(POOL_ATTENTION, sdpa_mask)


# --- a pass's layout, built on the device -------------------------------------------------
def ancestor_closure(parents: torch.Tensor) -> torch.Tensor:
    """ancestors[b, i, j]: token j of row b is token i or one of its ancestors. [B, S, S] bool.

    parents: [B, S] each token's parent within its row, -1 for none. By pointer doubling: each
    step adds to a token's set what its 2^k-th ancestor's set holds, so log2(S) steps of two
    reads cover any depth, with no loop over rows or tokens (on this CPU, 64 rows of 33 tokens,
    ~5x cheaper than squaring the relation as matrices, whose products took 0.9 ms a pass).
    """
    rows, width = parents.shape
    index = torch.arange(width, device=parents.device).expand(rows, width)
    jump = torch.where(parents >= 0, parents, index)  # the 2^k-th ancestor; the row's top one once past it
    reach = (index[:, :, None] == index[:, None, :]) | (jump[:, :, None] == index[:, None, :])  # itself, its parent
    for _ in range((width - 2).bit_length() if width > 1 else 0):
        reach = reach | rows_of(reach, jump)  # each token's 2^k-th ancestor's set
        jump = torch.gather(jump, 1, jump)
    return reach


def rows_of(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """For each b, rows index[b] of table[b]: [B, R, W] by [B, N] -> [B, N, W]. Read as whole
    rows of the flattened table (a gather along the last axis cost 4-7x more on this CPU)."""
    batch, height, width = table.shape
    starts = torch.arange(0, batch * height, height, device=table.device)[:, None]  # each b's first row
    flat = table.reshape(batch * height, width).index_select(0, (index + starts).view(-1))
    return flat.view(batch, index.shape[1], width)


def kind_mask(
    kind: LayerKind,
    lengths: torch.Tensor,
    sizes: torch.Tensor,
    positions: torch.Tensor,
    ancestors: torch.Tensor,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of each row's new tokens [B, S] and what each query sees [B, 1, S, width].

    lengths: [B] tokens each slot held before the pass; sizes: [B] real tokens per row;
    positions: [B, S] context positions; ancestors: [B, S, S]. Column c of a slot holds a new
    token when the pass writes one there, else the latest past position that maps to it.
    """
    rows, span = positions.shape
    offsets = torch.arange(span, device=lengths.device)
    real = offsets[None, :] < sizes[:, None]  # [B, S]
    if not kind.window:
        return _full_mask(lengths, sizes, ancestors, width, offsets, real)
    columns = torch.remainder(lengths[:, None] + offsets[None, :], kind.capacity)  # [B, S]
    # Which new token each column holds (-1: none); padding tokens are sent to a column past the end.
    holder = torch.full((rows, width + 1), -1, dtype=torch.long, device=lengths.device)
    holder.scatter_(1, torch.where(real, columns, width), offsets.expand(rows, -1).contiguous())
    holder = holder[:, :width]  # [B, P]
    past = column_positions(lengths, kind.capacity, width)  # [B, P]
    sees_past = ((past >= 0) & (holder < 0))[:, None, :].expand(-1, span, -1)  # [B, S, P]
    held = holder.clamp(min=0)
    # Whether each column's new token is the query or one of its ancestors: for each column, the
    # queries that have its token ([B, S, S] by token j: who has j), seen as [B, S, P].
    has = rows_of(ancestors.transpose(1, 2), held).transpose(1, 2)
    sees_new = has & (holder >= 0)[:, None, :]
    if kind.window:
        queries = positions[:, :, None]
        sees_past = sees_past & (queries - past[:, None, :] < kind.window)
        sees_new = sees_new & (queries - torch.gather(positions, 1, held)[:, None, :] < kind.window)
    sees = sees_past | sees_new
    # Padding queries see the first column, so no row of the attention is empty (their output is dropped).
    sees[:, :, 0] |= ~real
    return columns, sees[:, None]


def _full_mask(
    lengths: torch.Tensor,
    sizes: torch.Tensor,
    ancestors: torch.Tensor,
    width: int,
    offsets: torch.Tensor,
    real: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kind_mask` for a layer of full attention, whose slots never wrap: a row's past fills its
    first columns and its new tokens follow them, so a query sees every past column and the new
    tokens that are its ancestors (a third of the ring's operations: ~0.2 ms a pass on the CPU
    machine, where the ring's way took ~0.37)."""
    columns = lengths[:, None] + offsets[None, :]  # [B, S]
    held = torch.arange(width, device=lengths.device)[None, :] - lengths[:, None]  # [B, P]: which new token, if any
    new = (held >= 0) & (held < sizes[:, None])
    has = rows_of(ancestors.transpose(1, 2), held.clamp(0, ancestors.shape[-1] - 1)).transpose(1, 2)
    sees = (held < 0)[:, None, :] | (has & new[:, None, :])
    sees[:, :, 0] |= ~real  # padding queries see the first column (their output is dropped)
    return columns, sees[:, None]


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(first row, end row, first slot) for each run of consecutive slot indices, rows in order."""
    runs: list[tuple[int, int, int]] = []
    for row, slot in enumerate(slots):
        if runs and slot == runs[-1][2] + row - runs[-1][0]:
            runs[-1] = (runs[-1][0], row + 1, runs[-1][2])
        else:
            runs.append((row, row + 1, slot))
    return runs


# --- a sample pass, for timing the attention ----------------------------------------------
def sample_pass(
    shape: tuple[int, int, int, int, int], width: int, kernel: PoolKernel | None
) -> tuple[PoolPass, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One full-attention layer's pass of `shape` (rows, tokens a row, query heads, kv heads,
    head dims) over slot views of `width` columns: each row's past, then its chain of new tokens.
    Returns the pass (attending through `kernel`, or SDPA for None) and its queries, keys, values."""
    rows, span, query_heads, heads, dim = shape
    generator = torch.Generator().manual_seed(width)
    keys, values = (torch.randn(rows, heads, width + span, dim, generator=generator) for _ in range(2))
    past = max(width - span, 0)
    sees = torch.ones(rows, 1, span, width, dtype=torch.bool)
    sees[..., past:] = torch.ones(span, width - past, dtype=torch.bool).tril()
    layout = PoolPass(
        keys=[keys],
        values=[values],
        kinds=[FULL],
        rows=rows,
        sources=torch.arange(rows * span),
        slots=torch.arange(rows).repeat_interleave(span),
        columns={FULL: past + torch.arange(span).repeat(rows)},
        widths={FULL: width},
        masks={FULL: sees},
        runs=[(0, rows, 0)],
        row_slots=torch.arange(rows),
        kernel=kernel,
    )
    query, key, value = (
        torch.randn(rows, span, count, dim, generator=generator).transpose(1, 2)
        for count in (query_heads, heads, heads)
    )
    return layout, (query, key, value)


@torch.inference_mode()
def timed_layer(
    kernel: PoolKernel | None, shape: tuple[int, int, int, int, int], width: int, repeats: int = 5
) -> float:
    """Seconds one layer of `sample_pass` takes through `kernel` (SDPA for None), best of `repeats`."""
    layout, (query, key, value) = sample_pass(shape, width, kernel)
    best = float("inf")
    for _ in range(repeats + 1):  # one warm-up
        started = time.perf_counter()
        layout.attend(query, key, value, 0, 1.0)
        best = min(best, time.perf_counter() - started)
    return best

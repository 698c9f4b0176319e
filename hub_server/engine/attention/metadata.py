"""A pass's attention metadata: neutral data, built once a pass, that every backend reads.

Row b of a pass is one session's new tokens (pending context, then draft nodes), padded to the
pass's width. What a backend needs to attend row b: its block table, how many tokens the session
stored before the pass, how many new tokens the row holds, each new token's context position
and its ancestors among the row's tokens (the draft tree), and where each new token's keys go.
Each backend turns that into what its kernel reads: views of each row's blocks and an additive
mask (`reference`, the CPU kernel), or a block mask and a mask_mod (`flex`).

The visibility rule, written once here (`view_bias` builds it as a mask; `flex.py` evaluates it
per score): a query sees its session's past (on a sliding layer, only positions less than the
window behind it) and, among the pass's new tokens, itself and its ancestors (within the window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hub_server.engine.kv_pool import BLOCK_TOKENS, NULL_BLOCK

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class PassMetadata:
    """One pass's layout, on the device: B' rows (B real, then padding) of S' columns; M blocks
    a table. The host's copies of the lengths and sizes say how wide each view is without a sync."""

    rows: int  # B: real rows
    tables: torch.Tensor  # [B, M] each row's block table, padded with the null block
    lengths: torch.Tensor  # [B] tokens each session stored before the pass
    sizes: torch.Tensor  # [B] real new tokens per row
    positions: torch.Tensor  # [B', S'] each new token's context position (padding rows: 0)
    ancestors: torch.Tensor  # [B, S', S'] bool: token j of row b is token i or one of its ancestors
    sources: torch.Tensor  # [N] each written token's place in the flattened [B' * S'] rows
    targets: torch.Tensor  # [N] its row in the pool seen as [blocks * BLOCK_TOKENS, H, D]
    host_lengths: list[int]  # lengths, as the host knows them
    host_sizes: list[int]  # sizes, as the host knows them

    def view_start(self, window: int) -> list[int]:
        """The first stored position each row's view shows: 0 on a full layer; on a sliding one,
        the oldest position the row's first new token still sees."""
        return [max(0, length - window + 1) if window else 0 for length in self.host_lengths]

    def view_width(self, window: int) -> int:
        """Columns of the widest row's view: its shown past, then its new tokens."""
        starts = self.view_start(window)
        return max(length - start + size for length, start, size in zip(self.host_lengths, starts, self.host_sizes))


@dataclass
class KindView:
    """What one layer kind's rows see, as views of their blocks: for backends that gather
    (or read in place) a row's positions in order and add a mask."""

    places: torch.Tensor  # [B, width] the pool row each column of a row's view reads
    bias: torch.Tensor  # [B, S', width] 0 where a query sees a column, -inf where not
    starts: torch.Tensor | None  # [B] each view's first stored position (None: 0, a full layer)


def kind_view(meta: PassMetadata, window: int, dtype: torch.dtype) -> KindView:
    """The views and mask of one layer kind (`window` 0: full attention) for the pass."""
    device = meta.lengths.device
    width = meta.view_width(window)
    starts = torch.tensor(meta.view_start(window)).to(device) if window else None
    rows = meta.rows
    places = view_places(meta.tables, starts, meta.lengths + meta.sizes, width)
    bias = view_bias(window, meta.lengths, starts, meta.sizes, meta.positions[:rows], meta.ancestors, width, dtype)
    return KindView(places, bias, starts)


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


def view_places(tables: torch.Tensor, starts: torch.Tensor | None, ends: torch.Tensor, width: int) -> torch.Tensor:
    """The pool row each column of each row's view reads: [B, width]. Row b's view shows its
    session's positions starts[b], starts[b] + 1, ... (those before ends[b] exist; the rest read
    the null block's zeros).

    tables: [B, M] each row's block table (padded with the null block); starts, ends: [B]
    (starts None: every view starts at position 0, as full attention's do). Built from each row's
    pool rows in position order ([B, M * BLOCK_TOKENS]: one product of the table and a block's
    offsets), read from its start: a handful of operations a pass, whatever the context.
    """
    rows, blocks = tables.shape
    offsets = torch.arange(BLOCK_TOKENS, device=tables.device)
    positions = torch.arange(width, device=tables.device)
    held = (tables[:, :, None] * BLOCK_TOKENS + offsets).view(rows, blocks * BLOCK_TOKENS)  # [B, M * BLOCK_TOKENS]
    if starts is None:
        if width > held.shape[1]:  # a view wider than every table: the rest is the null block's
            held = torch.nn.functional.pad(held, (0, width - held.shape[1]))
        places, shown = held[:, :width], positions[None, :]
    else:
        shown = starts[:, None] + positions  # [B, W]
        places = torch.gather(held, 1, shown.clamp(max=held.shape[1] - 1))
    return torch.where(shown < ends[:, None], places, NULL_BLOCK * BLOCK_TOKENS)


def view_bias(
    window: int,
    lengths: torch.Tensor,
    starts: torch.Tensor | None,
    sizes: torch.Tensor,
    positions: torch.Tensor,
    ancestors: torch.Tensor,
    width: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """What each query sees of its row's view, as the scores' additive mask: [B, S, width], 0
    where it sees a column and -inf where not.

    lengths: [B] tokens each session stored before the pass; starts: [B] the first position of
    each view (None: 0 for every row); sizes: [B] real tokens per row; positions: [B, S] the new
    tokens' context positions; ancestors: [B, S, S]. View column c shows stored position
    starts[b] + c: the session's past below lengths[b] (whose context position is where it is
    stored: kept paths are compacted), then the pass's new tokens in row order (a draft node's
    context position is its depth below the past, not where it is stored). A query sees the past
    and its own ancestors among the new tokens; on a sliding layer (`window` > 0) only those less
    than `window` behind it.

    Built as the past's columns for every query (one comparison and one fill over [B, S, width]),
    then the new tokens' [B, S, S] block put in at each row's past length: the only parts that
    differ between queries of a full-attention row.
    """
    rows, span = positions.shape
    device = lengths.device
    shown = torch.arange(width, device=device)[None, :]  # [1, W] stored position, less the view's start
    past = lengths if starts is None else lengths - starts  # [B] the view's past columns
    sees = shown[:, None, :] < past[:, None, None]  # [B, 1, W]
    if window:  # and within the window: stored position > a query's position - window
        first = positions - window + 1 - (0 if starts is None else starts[:, None])  # [B, S] first column seen
        sees = sees & (shown[:, None, :] >= first[:, :, None])
    bias = torch.zeros((), dtype=dtype, device=device).where(sees.expand(rows, span, width), float("-inf"))
    tokens = torch.arange(span, device=device)
    real = tokens[None, :] < sizes[:, None]  # [B, S]
    own = ancestors & real[:, None, :]  # [B, S, S]: query i sees new token j
    if window:
        own = own & (positions[:, :, None] - positions[:, None, :] < window)
    # New token j of row b stands in column past[b] + j; a padding token's column may lie past the
    # view: it is sent to the last column, where taking the larger of -inf and what is there keeps it.
    columns = (past[:, None] + tokens).clamp(max=width - 1)[:, None, :].expand(rows, span, span)
    seen = torch.zeros((), dtype=dtype, device=device).where(own, float("-inf"))
    bias.scatter_reduce_(2, columns, seen, "amax")
    bias[:, :, 0].masked_fill_(~real, 0.0)  # padding queries see the first column (their output is dropped)
    return bias

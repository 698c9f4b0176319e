"""A pass's layout: sessions' new tokens as rows, their positions, each token's ancestors in its
row, and where each token's keys go in the KV pool (the sessions' block tables).

Row b of a pass holds session b's pending tokens (a chain below its past), then its draft nodes
(`row_parents`). A compiled pass runs a few fixed shapes (`buckets`): rows and columns past the
real ones are padding. The part of a layout that depends only on the rows' parents (`RowShape`)
is built on the device once per shape and kept, since pass after pass of one batch's chains
repeats it; the rest (ids, positions, block tables) is built for each pass, in a few copies from
the host, as the attention's neutral metadata (`attention/metadata.py`), which the pass's
attention backend turns into what it reads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from hub_server.engine.attention.metadata import PassMetadata, ancestor_closure
from hub_server.engine.kv_pool import BLOCK_TOKENS, SessionKV

ROW_SHAPES_KEPT = 64  # pass row shapes kept on the device (`PassLayout.rows`), least recent dropped first


@dataclass
class PassBatch:
    """Sessions' new tokens laid out for one pass: rows (sessions) of width S; row b's tokens are
    its pending tokens (a chain below the session's past), then its draft nodes. A compiled pass
    runs more rows and columns than it has (a bucket): the rest is padding."""

    slots: list[SessionKV]
    sizes: list[int]  # real tokens per row
    tokens: torch.Tensor  # [B', S'] on the device
    positions: torch.Tensor  # [B', S'] absolute context positions
    meta: PassMetadata  # where the new tokens go in the pool, and what each sees

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


@dataclass(frozen=True)
class RowShape:
    """The shape of a pass's rows on the device, which depends only on each row's parents (and
    the bucket): the same for pass after pass of one batch's chains, so it is built once per
    shape (`PassLayout.rows`). Nothing downstream writes into these tensors."""

    row_of: torch.Tensor  # [T] each real token's row
    sources: torch.Tensor  # [T] its place in the flattened [B', S'] rows
    ranks: torch.Tensor  # [T] its place in its row
    sizes: torch.Tensor  # [B] real tokens per row
    ancestors: torch.Tensor  # [B, S', S'] bool: token j of row b is token i or one of its ancestors
    depths: torch.Tensor  # [B, S'] how many ancestors each token has (0: a row's first token)


def row_parents(n_pending: int, parents: list[int]) -> list[int]:
    """Parents within the row: pending tokens form a chain; draft roots hang off the last of them."""
    return list(range(-1, n_pending - 1)) + [n_pending - 1 if p < 0 else n_pending + p for p in parents]


def buckets(limit: int, smallest: int = 1) -> list[int]:
    """Powers of two from `smallest` up to `limit`, and `limit` itself: the shapes a compiled pass takes."""
    sizes = {1 << i for i in range(limit.bit_length()) if smallest <= 1 << i <= limit}
    return sorted(sizes | {limit})


def bucket(size: int, sizes: list[int]) -> int | None:
    """The smallest of `sizes` that holds `size`; None when none does."""
    return next((fits for fits in sizes if fits >= size), None)


def block_tables(slots: list[SessionKV]) -> np.ndarray:
    """Each session's stored tokens, then its block table: one [B, 1 + M] array, the tables
    padded with the null block (0)."""
    longest = max(len(slot.blocks) for slot in slots)
    tables = np.zeros((len(slots), 1 + longest), dtype=np.int64)
    for b, slot in enumerate(slots):
        tables[b, 0] = slot.length
        tables[b, 1 : 1 + len(slot.blocks)] = slot.blocks
    return tables


class PassLayout:
    """Lays passes out on one device over one KV pool."""

    def __init__(self, device: str, batch_buckets: list[int], width_buckets: list[int]):
        self.device = device
        self.batch_buckets, self.width_buckets = batch_buckets, width_buckets
        # Row shapes on this device, by (rows, width, parents); the least recent dropped first.
        self.row_shapes = functools.lru_cache(maxsize=ROW_SHAPES_KEPT)(self._lay_rows)

    def lay(
        self, slots: list[SessionKV], rows: list[list[int]], parents: list[list[int]], bucketed: bool = False
    ) -> PassBatch:
        """Lay the rows out for a pass (`bucketed`: in a compiled bucket when there is one) and
        plan where their keys go and what each token sees. Each session's blocks must already
        hold its new tokens."""
        sizes = [len(row) for row in rows]
        height, width = len(rows), max(sizes)
        if bucketed:
            height = bucket(height, self.batch_buckets) or height
            width = bucket(width, self.width_buckets) or width
        device, total = self.device, sum(sizes)
        shape = self.rows(height, width, parents)
        # What the host knows, sent to the device in two copies: each real token's id, then each
        # row's stored tokens, with its block table after them (through numpy: torch.tensor of a
        # list of Python ints costs ~0.2 us an int, 0.9 ms for 64 rows of 33).
        ids = torch.from_numpy(np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=total)).to(device)
        per_row = torch.from_numpy(block_tables(slots)).to(device)  # [B, 1 + M]
        lengths, tables = per_row[:, 0], per_row[:, 1:]
        positions = lengths[:, None] + shape.depths  # [B, S'] below the session's past
        if total < height * width:  # padded: the real tokens go to their places, the rest are 0
            tokens = torch.zeros(height * width, dtype=torch.long, device=device).index_put_((shape.sources,), ids)
            positions = torch.cat([positions, positions.new_zeros(height - len(rows), width)])
        else:
            tokens = ids
        # Each new token goes to the stored position after its row's past and the row's tokens before it.
        stored = lengths[shape.row_of] + shape.ranks
        blocks = tables.reshape(-1)[shape.row_of * tables.shape[1] + stored // BLOCK_TOKENS]
        meta = PassMetadata(
            rows=len(rows),
            tables=tables,
            lengths=lengths,
            sizes=shape.sizes,
            positions=positions,
            ancestors=shape.ancestors,
            sources=shape.sources,
            targets=blocks * BLOCK_TOKENS + stored % BLOCK_TOKENS,
            host_lengths=[slot.length for slot in slots],
            host_sizes=sizes,
        )
        return PassBatch(slots, sizes, tokens.view(height, width), positions, meta)

    def rows(self, height: int, width: int, parents: list[list[int]]) -> RowShape:
        """The shape of rows with these parents in a [height, width] pass, built on the device
        the first time (no loop over rows or tokens, no host sync) and kept for the next passes
        of the same shape: ~40 small operations a pass (0.4 ms on this CPU at 8 x 9 tokens;
        as many kernel launches on a GPU)."""
        return self.row_shapes(height, width, tuple(map(tuple, parents)))

    def _lay_rows(self, height: int, width: int, parents: tuple[tuple[int, ...], ...]) -> RowShape:
        device, sizes = self.device, [len(row) for row in parents]
        total = sum(sizes)
        parent_ids = torch.from_numpy(np.fromiter(chain.from_iterable(parents), dtype=np.int64, count=total))
        parent_ids, sizes_t = parent_ids.to(device), torch.tensor(sizes).to(device)
        # Each real token's place in the flattened rows: its row's start, plus its rank among
        # that row's tokens (repeat_interleave told its total: no host sync).
        row_of = torch.repeat_interleave(torch.arange(len(parents), device=device), sizes_t, output_size=total)
        ranks = torch.arange(total, device=device) - (torch.cumsum(sizes_t, 0) - sizes_t)[row_of]
        sources = row_of * width + ranks
        in_rows = torch.full((height * width,), -1, dtype=torch.long, device=device)
        in_rows[sources] = parent_ids
        ancestors = ancestor_closure(in_rows.view(height, width))[: len(parents)]  # [B, S', S']
        return RowShape(row_of, sources, ranks, sizes_t, ancestors, ancestors.sum(-1) - 1)

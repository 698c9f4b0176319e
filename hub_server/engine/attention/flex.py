"""The FlexAttention backend: the pool read in place through block masks, the draft tree as a
mask_mod, so a compiled pass is one graph a GPU can capture whole.

**Compiled passes** (`FlexBucket`, one per bucket of rows x width): the keys and values flex reads
are the whole pool of a layer, [1, H, blocks * BLOCK_TOKENS, D], as it lies (no copy). Each row's
block mask lists the pool blocks of its session (the window's only, on a sliding layer) in
position order: `kv_num_blocks` [B', 1, 1] and `kv_indices` [B', 1, 1, pool blocks], one KV block
of the mask being one pool block (BLOCK_TOKENS positions), so flex visits exactly the blocks a row
reads. Inside a listed block the mask_mod decides per score: it maps the pool position back to the
session's stored position (`block_logical`: each block's index in the tables that hold it; a block
shared between sessions stands at the same index in each, since sharing goes by prefix), checks
that the row's table holds that block there (so the rule stays exact even for a block it does not
own), and applies the visibility rule (`metadata.py`). Every tensor a pass reads (tokens,
positions, tables, lengths, sizes, ancestors, the writes' indices, the block masks) is a bucket
buffer allocated once and filled in place before the step (`fill`), with padding rows seeing
nothing and padding tokens writing a copy of the pass's first token where it already goes; the
step itself allocates nothing the compiler does not plan, never syncs with the host and branches
on no data in Python.

**Eager passes** (prompts fed apart, `--compile off`): flex over each row's view of its blocks,
gathered as the reference gathers them, with the same visibility rule as a mask_mod over view
columns. Uncompiled, flex computes every score of the view and masks after (torch's own
reference implementation): a correctness path, not a fast one, and auto never takes it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from hub_server.engine.attention.interface import PassAttention
from hub_server.engine.attention.metadata import PassMetadata, view_places
from hub_server.engine.attention.reference import ReferenceBackend, ReferencePass
from hub_server.engine.kv_pool import BLOCK_TOKENS, NULL_BLOCK

Q_BLOCK = 128  # queries a block mask row covers: a verify row fits in one
# Eager passes run flex uncompiled on purpose (torch's reference implementation): not worth a warning.
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)


@dataclass
class Visibility:
    """The rule of what a query sees, over a pass's rows (`metadata.py`), as a mask_mod reads it."""

    lengths: torch.Tensor  # [B] stored before the pass
    sizes: torch.Tensor  # [B] real new tokens
    positions: torch.Tensor  # [B, S] context positions
    ancestors: torch.Tensor  # [B, S, S] bool
    window: int  # 0: full attention

    def sees(self, b: torch.Tensor, q: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
        """Whether query q of row b sees the session's stored position `stored` (scalars: vmapped)."""
        length = self.lengths[b]
        past = stored < length
        j = (stored - length).clamp(0, self.positions.shape[1] - 1)  # a new token's place in the row
        own = (stored >= length) & (stored - length < self.sizes[b]) & self.ancestors[b, q, j]
        if not self.window:
            return past | own
        seen_position = torch.where(past, stored, self.positions[b, j])
        return (past | own) & (self.positions[b, q] - seen_position < self.window)


class FlexBackend(ReferenceBackend):
    """Flex for every pass; a compiled pass runs over its bucket's buffers (`bucket`)."""

    name = "flex"

    def __init__(self, keys, values, kinds, windows, table_blocks: int):
        super().__init__(keys, values, kinds, windows)
        self.table_blocks = min(table_blocks, keys[0].shape[0])  # M: the most blocks a row's table can hold
        self._buckets: dict[tuple[int, int], FlexBucket] = {}

    def begin(self, meta: PassMetadata) -> FlexViewPass:
        return FlexViewPass(self, meta)

    def bucket(self, rows: int, width: int) -> FlexBucket:
        """The bucket's buffers and block masks, allocated the first time it runs."""
        if (rows, width) not in self._buckets:
            self._buckets[rows, width] = FlexBucket(self, rows, width)
        return self._buckets[rows, width]


def _flex(query, keys, values, block_mask: BlockMask, scale: float) -> torch.Tensor:
    """flex_attention with grouped queries: [B, Hq, S, D] over [B or 1, H, N, D] -> [B, S, Hq, D]."""
    # On CUDA a kernel's tile of keys must divide the mask's KV block, a pool block of BLOCK_TOKENS
    # (its default tile is wider); the CPU's kernel takes the mask's blocks as they are.
    options = {"BLOCK_N": BLOCK_TOKENS} if query.device.type == "cuda" else None
    attended = flex_attention(
        query, keys, values, block_mask=block_mask, scale=scale, enable_gqa=True, kernel_options=options
    )
    assert isinstance(attended, torch.Tensor)  # no auxiliary outputs asked for
    return attended.transpose(1, 2)


class FlexViewPass(ReferencePass):
    """An eager pass: flex over each row's gathered view, masked by the same rule."""

    backend: FlexBackend

    def __init__(self, backend: FlexBackend, meta: PassMetadata):
        super().__init__(backend, meta)
        self._masks: dict[str, tuple[torch.Tensor, BlockMask]] = {}

    def attend(self, query, key, value, layer, scale):
        flat_keys, flat_values = self.write(key, value, layer)
        rows, heads, dim = self.meta.rows, key.shape[1], key.shape[3]
        places, mask = self._kind(self.backend.kinds[layer], query.shape[2])
        width = places.shape[1]
        keys = flat_keys.index_select(0, places.view(-1)).view(rows, width, heads, dim).transpose(1, 2)
        values = flat_values.index_select(0, places.view(-1)).view(rows, width, heads, dim).transpose(1, 2)
        self.copied_bytes += keys.nbytes + values.nbytes
        attended = _flex(query[:rows], keys, values, mask, scale)
        if query.shape[0] > rows:  # padding rows of a bucket: nothing to see
            attended = torch.cat([attended, attended.new_zeros(query.shape[0] - rows, *attended.shape[1:])])
        return attended

    def _kind(self, kind: str, span: int) -> tuple[torch.Tensor, BlockMask]:
        """The kind's views ([B, width] pool rows) and block mask, built at its first layer in the pass."""
        if kind not in self._masks:
            meta, window = self.meta, self.backend.windows[kind]
            width = meta.view_width(window)
            starts = torch.tensor(meta.view_start(window)).to(meta.lengths.device)  # [B]
            places = view_places(meta.tables, starts if window else None, meta.lengths + meta.sizes, width)
            rule = Visibility(meta.lengths, meta.sizes, meta.positions[: meta.rows], meta.ancestors, window)

            def in_view(b, h, q, column):  # view column c shows stored position starts[b] + c
                return rule.sees(b, q, starts[b] + column)

            blocks, q_blocks, device = -(-width // BLOCK_TOKENS), -(-span // Q_BLOCK), places.device
            mask = BlockMask.from_kv_blocks(  # every block of every view: the rule masks within them
                torch.full((meta.rows, 1, q_blocks), blocks, dtype=torch.int32, device=device),
                torch.arange(blocks, dtype=torch.int32, device=device).expand(meta.rows, 1, q_blocks, blocks),
                BLOCK_SIZE=(Q_BLOCK, BLOCK_TOKENS),
                mask_mod=in_view,
                seq_lengths=(span, width),
            )
            self._masks[kind] = (places, mask)
        return self._masks[kind]


class FlexBucket(PassAttention):
    """A bucket's fixed buffers and block masks; `fill` lays a pass into them, `attend` is traced.

    B' rows of S' tokens; M the most blocks a table holds; P the pool's positions."""

    traced = True

    def __init__(self, backend: FlexBackend, rows: int, width: int):
        self.backend = backend
        device = backend.keys[0].device
        blocks = backend.keys[0].shape[0]

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tokens, self.positions = zeros(rows, width), zeros(rows, width)  # the step's inputs
        self.tables = zeros(rows, backend.table_blocks)  # [B', M]
        self.lengths, self.sizes = zeros(rows), zeros(rows)  # [B']
        self.ancestors = zeros(rows, width, width, dtype=torch.bool)  # [B', S', S']
        self.sources, self.targets = zeros(rows * width), zeros(rows * width)  # [B' * S'] every token writes
        self.block_logical = zeros(blocks)  # [pool blocks] each block's index in the tables holding it
        q_blocks = -(-width // Q_BLOCK)
        self.masks: dict[str, BlockMask] = {}
        for kind, window in backend.windows.items():
            counts = zeros(rows, 1, q_blocks, dtype=torch.int32)
            indices = zeros(rows, 1, q_blocks, blocks, dtype=torch.int32)
            rule = Visibility(self.lengths, self.sizes, self.positions, self.ancestors, window)
            self.masks[kind] = BlockMask.from_kv_blocks(
                counts,
                indices,
                BLOCK_SIZE=(Q_BLOCK, BLOCK_TOKENS),
                mask_mod=self._paged(rule),
                seq_lengths=(width, blocks * BLOCK_TOKENS),
                compute_q_blocks=False,
            )
        self._static()

    def _paged(self, rule: Visibility):
        """The rule over pool positions: each mapped back to its session's stored position."""
        tables, block_logical = self.tables, self.block_logical

        def mask_mod(b, h, q, kv):
            block = kv // BLOCK_TOKENS
            logical = block_logical[block]
            owned = (tables[b, logical] == block) & (block != NULL_BLOCK)
            return owned & rule.sees(b, q, logical * BLOCK_TOKENS + kv % BLOCK_TOKENS)

        return mask_mod

    def _static(self) -> None:
        """Every buffer and the pool at a fixed address: a CUDA graph reads them where they are
        (no copy into the graph's own inputs at each replay), and a compiled graph is never
        asked to take another tensor in their place."""
        mark = torch._dynamo.mark_static_address
        tensors = [self.tokens, self.positions, self.tables, self.lengths, self.sizes, self.ancestors]
        tensors += [self.sources, self.targets, self.block_logical, *self.backend.keys, *self.backend.values]
        for mask in self.masks.values():
            tensors += [mask.kv_num_blocks, mask.kv_indices]
        for tensor in tensors:
            mark(tensor)

    @torch.inference_mode()
    def fill(self, meta: PassMetadata, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Lay a pass (already bucket-shaped: `tokens`, `positions` [B', S']) into the buffers in place."""
        rows, blocks = meta.tables.shape
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        for buffer, real in ((self.lengths, meta.lengths), (self.sizes, meta.sizes), (self.ancestors, meta.ancestors)):
            buffer.zero_()  # padding rows: no past, no tokens
            buffer[:rows].copy_(real)
        self.tables.zero_()  # and no blocks
        self.tables[:rows, :blocks].copy_(meta.tables)
        # Padding tokens write what the pass's first token writes, where it goes (the same bytes twice).
        self.sources.zero_()
        self.sources.index_copy_(0, meta.sources, meta.sources)
        self.targets.copy_(meta.targets[0].expand_as(self.targets))
        self.targets.index_copy_(0, meta.sources, meta.targets)
        every = torch.arange(blocks, device=self.tables.device).expand(rows, blocks)
        self.block_logical.index_put_((meta.tables.reshape(-1),), every.reshape(-1))
        for kind, window in self.backend.windows.items():
            self._fill_mask(self.masks[kind], window)

    def _fill_mask(self, mask: BlockMask, window: int) -> None:
        """Each row's blocks in position order, from the first its view shows to the last it writes."""
        first = (self.lengths - window + 1).clamp(min=0) // BLOCK_TOKENS if window else torch.zeros_like(self.lengths)
        end = (self.lengths + self.sizes + BLOCK_TOKENS - 1) // BLOCK_TOKENS  # [B'] padding rows: 0
        table_blocks = self.tables.shape[1]
        shown = (first[:, None] + torch.arange(table_blocks, device=first.device)).clamp(max=table_blocks - 1)
        listed = torch.gather(self.tables, 1, shown)  # [B', M]
        mask.kv_num_blocks.copy_((end - first)[:, None, None].expand_as(mask.kv_num_blocks))
        mask.kv_indices[..., :table_blocks].copy_(listed[:, None, None, :].expand(-1, 1, mask.kv_indices.shape[2], -1))

    def attend(self, query, key, value, layer, scale):
        heads, dim = key.shape[1], key.shape[3]
        pool_keys, pool_values = self.backend.keys[layer], self.backend.values[layer]
        flat_keys, flat_values = pool_keys.view(-1, heads, dim), pool_values.view(-1, heads, dim)
        new_keys = key.transpose(1, 2).reshape(-1, heads, dim).index_select(0, self.sources)
        new_values = value.transpose(1, 2).reshape(-1, heads, dim).index_select(0, self.sources)
        # index_put_, which inductor writes in place into the pool (a graph input it mutates).
        flat_keys.index_put_((self.targets,), new_keys)
        flat_values.index_put_((self.targets,), new_values)
        # The layer's pool as flex reads it: [1, H, P, D], the blocks where they lie.
        keys, values = flat_keys.transpose(0, 1)[None], flat_values.transpose(0, 1)[None]
        return _flex(query, keys, values, self.masks[self.backend.kinds[layer]], scale)

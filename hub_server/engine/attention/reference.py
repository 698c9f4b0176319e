"""The reference backend: SDPA over each row's view of its blocks, gathered. Runs on any device.

It is the oracle the other backends are tested against, and what any pass falls back to. In each
layer it writes the pass's new keys and values into their blocks (two indexed copies), gathers
each row's view (its session's positions, in order, through the block table: `places`) and hands
SDPA the views and the additive mask of the layer's kind, both built once a pass and kind. The
gather is a copy of the past (counted in `copied_bytes`, published as `past_kv_bytes_copied`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hub_server.engine.attention.interface import PassAttention
from hub_server.engine.attention.metadata import KindView, PassMetadata, kind_view


class ReferenceBackend:
    name = "reference"

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], kinds: list[str], windows: dict[str, int]):
        self.keys, self.values = keys, values  # per layer: the pool's [blocks, BLOCK_TOKENS, H, D]
        self.kinds, self.windows = kinds, windows  # each layer's kind; each kind's window (0: full)

    def begin(self, meta: PassMetadata) -> ReferencePass:
        return ReferencePass(self, meta)


class ReferencePass(PassAttention):
    def __init__(self, backend: ReferenceBackend, meta: PassMetadata):
        self.backend, self.meta = backend, meta
        self.copied_bytes = 0
        self._views: dict[str, KindView] = {}  # by kind, built at its first layer
        self._grouped: dict[tuple[str, int], torch.Tensor] = {}  # masks for grouped queries

    def view(self, kind: str, dtype: torch.dtype) -> KindView:
        if kind not in self._views:
            self._views[kind] = kind_view(self.meta, self.backend.windows[kind], dtype)
        return self._views[kind]

    def write(self, key: torch.Tensor, value: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's new keys and values into their blocks; returns the layer's pool as one row a
        position ([blocks * BLOCK_TOKENS, H, D] each)."""
        heads, dim = key.shape[1], key.shape[3]
        flat_keys = self.backend.keys[layer].view(-1, heads, dim)
        flat_values = self.backend.values[layer].view(-1, heads, dim)
        # The pass's rows read as [B' * S, H, D] (the order the projections wrote them: no copy).
        new_keys, new_values = (
            key.transpose(1, 2).reshape(-1, heads, dim),
            value.transpose(1, 2).reshape(-1, heads, dim),
        )
        sources, targets = self.meta.sources, self.meta.targets
        if sources.numel() != new_keys.shape[0]:  # some rows are padded: only the real tokens' rows are written
            new_keys, new_values = new_keys.index_select(0, sources), new_values.index_select(0, sources)
        flat_keys.index_copy_(0, targets, new_keys)
        flat_values.index_copy_(0, targets, new_values)
        return flat_keys, flat_values

    def attend(self, query, key, value, layer, scale):
        flat_keys, flat_values = self.write(key, value, layer)
        kind = self.backend.kinds[layer]
        view = self.view(kind, query.dtype)
        rows, width = view.places.shape
        padded_rows, query_heads, span, dim = query.shape
        heads = key.shape[1]
        # Each row's view gathered from its blocks: [B, width, H, D], read as [B, H, width, D].
        keys = flat_keys.index_select(0, view.places.view(-1)).view(rows, width, heads, dim).transpose(1, 2)
        values = flat_values.index_select(0, view.places.view(-1)).view(rows, width, heads, dim).transpose(1, 2)
        self.copied_bytes += keys.nbytes + values.nbytes
        groups = query_heads // heads
        # Grouped-query attention as plain attention: the query heads that share a kv head become
        # more queries of it ([B, Hkv, G * S, D]), so each kv head is read once by one call and
        # SDPA needs no GQA path (on this CPU its GQA path cost 1.4x more at 2,000 columns, with
        # the same results to the bit; on CUDA a masked GQA call would fall back to the math path).
        grouped = query[:rows].reshape(rows, heads, groups * span, dim)
        mask = self._grouped_mask(kind, view, groups)
        attended = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
        if padded_rows > rows:  # padding rows of a compiled bucket: nothing to see
            attended = torch.cat([attended, attended.new_zeros(padded_rows - rows, *attended.shape[1:])])
        return attended.reshape(padded_rows, query_heads, span, dim).transpose(1, 2).contiguous()

    def _grouped_mask(self, kind: str, view: KindView, groups: int) -> torch.Tensor:
        """The kind's additive mask for grouped queries, built once a pass: each query's row
        repeated for every head of its group ([B, 1, G * S, width]), which SDPA adds as it is."""
        if (kind, groups) not in self._grouped:
            bias = view.bias
            rows, span, width = bias.shape
            if groups > 1:
                bias = bias[:, None].expand(rows, groups, span, width)
            self._grouped[kind, groups] = bias.reshape(rows, 1, groups * span, width)
        return self._grouped[kind, groups]

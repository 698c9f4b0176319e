"""The model runner: the only part of the hub that touches torch and the device.

It owns the target model and every session's KV memory. One forward pass verifies the drafts of
many sessions at once, whatever their context lengths and draft shapes: each session's cached
keys and values are left-padded into one batch, its new tokens (pending context tokens, then
draft tree nodes) are laid out in a row with their own positions, and a 4D attention mask lets
each token see exactly its session's past and its own ancestors. After the pass, each session
keeps the keys and values of its pending tokens and of its accepted path, nothing else.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from hub_server.config import HubSettings, default_cache_dir
from hub_server.loading import choose_device, choose_dtype, load_target, read_vocabulary
from hub_server.verify import accept_tree, ancestor_mask, node_depths, target_choices

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass
class KVSlot:
    """One session's KV memory: per layer keys and values [H, L, D].

    Invariant: it covers every context token but the last (`length` of them). Sliding-window
    layers keep only the last window - 1 tokens, all that a later query can see.
    """
    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    length: int = 0

    def stored(self, layer: int) -> int:
        keys = self.keys[layer]
        return 0 if keys is None else keys.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)


@dataclass
class VerifyJob:
    """One session's share of a batched verify."""
    kv: KVSlot
    pending: list[int]            # context tokens not yet in the KV; at least one
    draft: list[int]              # tree nodes [N]
    parents: list[int]            # [N], -1 for children of the last pending token
    temperature: float
    seed: int
    stop_token_ids: frozenset[int]
    path: list[int] = field(default_factory=list)      # filled in: accepted node indices
    emitted: list[int] = field(default_factory=list)   # filled in: accepted tokens + bonus


@dataclass
class _Row:
    """A session's new tokens laid out for the batch: tokens, in-row parents, absolute positions."""
    tokens: list[int]
    parents: list[int]
    positions: list[int]


def _row(kv: KVSlot, pending: list[int], draft: list[int], parents: list[int]) -> _Row:
    # Pending tokens form a chain below the cached past; draft roots hang off the last of them.
    n_pending = len(pending)
    row_parents = list(range(-1, n_pending - 1)) + [n_pending - 1 if p < 0 else n_pending + p for p in parents]
    positions = [kv.length + depth - 1 for depth in node_depths(row_parents)]
    return _Row(pending + draft, row_parents, positions)


class ModelRunner:
    def __init__(self, settings: HubSettings):
        model_path = Path(settings.model).expanduser()
        self.name = model_path.name
        self.device = choose_device(settings.device)
        self.vocab = read_vocabulary(model_path)
        self.model = load_target(
            model_path, self.device, choose_dtype(settings.dtype, self.device),
            settings.cache_dir or default_cache_dir(),
        )
        config = self.model.config.get_text_config(decoder=True)
        model_limit = int(getattr(config, "max_position_embeddings", 0) or 2**31)
        self.max_context = min(settings.max_context or model_limit, model_limit)
        self.layer_types = list(getattr(config, "layer_types", None) or [FULL] * config.num_hidden_layers)
        self.window = int(getattr(config, "sliding_window", 0) or 0)
        # Ids the hub accepts: known to both the tokenizer and the embedding table.
        self.vocab_size = min(self.vocab.size, self.model.get_input_embeddings().num_embeddings)
        # One thing at a time on the device: a forward pass here, or the hub's own drafting.
        self.device_lock = threading.Lock()
        self.busy_seconds = 0.0  # time spent holding the device for forward passes

    def new_kv(self) -> KVSlot:
        return KVSlot([None] * len(self.layer_types), [None] * len(self.layer_types))

    # --- public operations --------------------------------------------------------------
    def prefill(self, kv: KVSlot, context: list[int], chunk: int = 512) -> None:
        """Bring `kv` up to all of `context` but its last token."""
        with self.device_lock, self._busy():
            while len(context) - 1 > kv.length:
                tokens = context[kv.length: min(len(context) - 1, kv.length + chunk)]
                row = _row(kv, tokens, [], [])
                _, cache, pasts = self._forward([kv], [row], logits_to_keep=1)
                self._keep(kv, cache, 0, pasts, list(range(len(tokens))))

    def verify_batch(self, jobs: list[VerifyJob]) -> None:
        """Verify every job's draft in one forward pass; fills in `path` and `emitted`."""
        with self.device_lock, self._busy():
            rows = [_row(job.kv, job.pending, job.draft, job.parents) for job in jobs]
            width = max(len(row.tokens) for row in rows)
            # Only columns from the earliest root onwards need logits: a long new prompt's
            # positions would otherwise each cost a full vocabulary projection.
            first = min(len(job.pending) for job in jobs) - 1
            logits, cache, pasts = self._forward([job.kv for job in jobs], rows, logits_to_keep=width - first)
            for b, (job, row) in enumerate(zip(jobs, rows)):
                self._accept(job, row, logits[b], first, cache, b, pasts)

    # --- internals ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _busy(self):
        """Count the time inside it as device time (taken inside the lock: waiting is not busy)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.busy_seconds += time.perf_counter() - started

    def _accept(self, job: VerifyJob, row: _Row, logits: torch.Tensor, first: int, cache, b: int, pasts: dict) -> None:
        """logits: [S - first, V], column c holds the logits of row position first + c."""
        n_pending = len(job.pending)
        # Position n_pending - 1 predicts after the root; position n_pending + i after draft node i.
        scored = logits[n_pending - 1 - first: len(row.tokens) - first]          # [N + 1, V]
        draw_positions = [p + 1 for p in row.positions[n_pending - 1:]]
        choices = target_choices(scored, job.temperature, job.seed, draw_positions)
        job.path, job.emitted = accept_tree(job.draft, job.parents, choices, job.stop_token_ids)
        # Keep what the context now holds, but its last token: pending, then the accepted path.
        kept_nodes = job.path[: len(job.emitted) - 1]
        self._keep(job.kv, cache, b, pasts, list(range(n_pending)) + [n_pending + i for i in kept_nodes])

    @torch.inference_mode()
    def _forward(self, slots: list[KVSlot], rows: list[_Row], logits_to_keep: int = 0):
        """One pass over every row on top of its slot's past. Returns logits [B, S, V], the
        batch cache, and the padded past length of each layer type."""
        width = max(len(row.tokens) for row in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)               # [B, S]
        position_ids = torch.zeros(len(rows), width, dtype=torch.long)            # [B, S]
        for b, row in enumerate(rows):
            input_ids[b, : len(row.tokens)] = torch.tensor(row.tokens)
            position_ids[b, : len(row.tokens)] = torch.tensor(row.positions)
        pasts = {kind: max(self._stored(slot, kind) for slot in slots) for kind in set(self.layer_types)}
        masks = {kind: self._mask(slots, rows, width, kind, pasts[kind]).to(self.device) for kind in pasts}
        cache = DynamicCache()
        for layer, kind in enumerate(self.layer_types):
            keys, values = self._padded_past(slots, layer, pasts[kind])
            cache.update(keys, values, layer)
        attention_mask = masks if SLIDING in masks else masks[FULL]
        out = self.model(
            input_ids=input_ids.to(self.device), position_ids=position_ids.to(self.device),
            attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=logits_to_keep,
        )
        return out.logits.float(), cache, pasts  # the forward appended the new tokens to `cache`

    def _stored(self, slot: KVSlot, kind: str) -> int:
        return slot.stored(self.layer_types.index(kind))

    def _padded_past(self, slots: list[KVSlot], layer: int, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's keys and values for `layer`, left-padded to `past`: [B, H, P, D] each."""
        reference = next((s.keys[layer] for s in slots if s.keys[layer] is not None), None)
        if reference is None:
            heads, dim = self._kv_shape()
            shape = (len(slots), heads, past, dim)
            empty = torch.zeros(shape, dtype=self.model.dtype, device=self.device)
            return empty, empty.clone()
        keys = reference.new_zeros((len(slots), reference.shape[0], past, reference.shape[2]))
        values = keys.clone()
        for b, slot in enumerate(slots):
            stored = slot.stored(layer)
            if stored:
                keys[b, :, past - stored:] = slot.keys[layer]
                values[b, :, past - stored:] = slot.values[layer]
        return keys, values

    def _kv_shape(self) -> tuple[int, int]:
        config = self.model.config.get_text_config(decoder=True)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return heads, dim

    def _mask(self, slots: list[KVSlot], rows: list[_Row], width: int, kind: str, past: int) -> torch.Tensor:
        """Which keys each query sees: [B, 1, S, P + S] bool.

        Past columns are the slot's stored tokens (right-aligned in P); new columns are the row's
        own tokens, visible along the ancestor path only. Sliding layers also drop keys more
        than window - 1 positions back.
        """
        mask = torch.zeros(len(rows), 1, width, past + width, dtype=torch.bool)
        for b, (slot, row) in enumerate(zip(slots, rows)):
            n = len(row.tokens)
            stored = self._stored(slot, kind)
            query_pos = torch.tensor(row.positions)                                       # [n]
            past_pos = torch.arange(slot.length - stored, slot.length)                    # [stored]
            visible_past = torch.ones(n, stored, dtype=torch.bool)
            visible_new = ancestor_mask(row.parents)                                     # [n, n]
            if kind == SLIDING and self.window:
                visible_past &= (query_pos[:, None] - past_pos[None, :]) < self.window
                visible_new &= (query_pos[:, None] - query_pos[None, :]) < self.window
            mask[b, 0, :n, past - stored: past] = visible_past
            mask[b, 0, :n, past: past + n] = visible_new
            # Padding queries look at themselves only, so no softmax row is empty.
            for j in range(n, width):
                mask[b, 0, j, past + j] = True
        return mask

    def _keep(self, kv: KVSlot, cache, b: int, pasts: dict, columns: list[int]) -> None:
        """Append the new-token columns `columns` of batch row `b` to the slot."""
        for layer, kind in enumerate(self.layer_types):
            index = torch.tensor([pasts[kind] + c for c in columns], device=self.device)
            layer_cache = cache.layers[layer]
            new_keys = layer_cache.keys[b].index_select(1, index)                        # [H, k, D]
            new_values = layer_cache.values[b].index_select(1, index)
            keys = new_keys if kv.keys[layer] is None else torch.cat([kv.keys[layer], new_keys], dim=1)
            values = new_values if kv.values[layer] is None else torch.cat([kv.values[layer], new_values], dim=1)
            if kind == SLIDING and self.window:
                keys, values = keys[:, -(self.window - 1):], values[:, -(self.window - 1):]
            kv.keys[layer], kv.values[layer] = keys.contiguous(), values.contiguous()
        kv.length += len(columns)

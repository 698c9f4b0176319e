"""The model runner: the engine that owns the target model, its KV pool and the forward passes.

It owns the target model and the KV pool that holds every session's keys and values
(`kv_pool.py`, allocated once at start). One forward pass verifies the drafts of many sessions
at once, whatever their context lengths and draft shapes: each session's slot is gathered into
one batch, its new tokens (pending context tokens, then draft tree nodes) are laid out in a row
with their own positions, and a 4D attention mask lets each token see exactly its session's
past and its own ancestors. After the pass, each session's slot takes the keys and values of
its pending tokens and of its accepted path, written in place; nothing else is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers.cache_utils import Cache, DynamicLayer

from hub_server.config import HubSettings, default_cache_dir
from hub_server.engine.kv_pool import GIB, KVPool, KVShape, KVSlot, column_positions, plan_kv
from hub_server.engine.loading import choose_device, choose_dtype, load_target, read_vocabulary
from hub_server.engine.sampling import ancestor_masks, target_choices
from hub_server.engine_api import EngineStats, PassTally, VerifyJob
from hub_server.pass_cost import PassCostFit
from hub_server.tree import accept_tree, chain_parents

FULL, SLIDING = "full_attention", "sliding_attention"
# Without --kv-memory-gib, the KV pool may take this share of the memory left once the model
# is loaded: on a GPU the rest is for the passes themselves (a batch's gathered KV, logits);
# a CPU machine is shared with the rest of the system.
AUTO_KV_SHARE = {"cuda": 0.5, "cpu": 0.25}
# A batch pads every row to its widest, so one session's new prompt would make every other
# session's draft as costly as that prompt. The runner feeds such a prompt in a pass of its own
# first when the padding saved outweighs what the extra pass costs beyond its tokens, counted
# in tokens. On a CPU a pass costs its tokens plus about two (the logits of its last token);
# on a GPU a small pass costs mostly its launches (~35 ms for Gemma 3 270M on an H100, flat
# from 1 to 16 sessions), worth thousands of padded tokens.
PASS_OVERHEAD_TOKENS = {"cuda": 4096, "cpu": 2}
# A GPU loads each kernel the first time a pass needs it: on an H100 a fresh hub's first passes
# took up to 4 s, and the first pass of each new batch size hundreds of ms. The hub runs these
# shapes once at start (CUDA only), so its first users do not pay for them.
WARM_UP_CONTEXT = 16
WARM_UP_DRAFTS = (0, 8, 32)

log = logging.getLogger("hub_server")


@dataclass
class _Batch:
    """Sessions' new tokens laid out for one pass. B rows of S columns; row b's tokens are the
    pending tokens (a chain below the slot's past), then its draft nodes."""

    slots: list[KVSlot]
    sizes: list[int]  # real tokens per row; the rest is padding
    tokens: torch.Tensor  # [B, S]
    ancestors: torch.Tensor  # [B, S, S] bool: token j is token i or one of its ancestors
    positions: torch.Tensor  # [B, S] absolute context positions
    lengths: torch.Tensor  # [B] tokens in each slot before the pass
    pasts: dict[str, int]  # per layer kind: slot columns gathered into the pass

    @property
    def width(self) -> int:
        return self.tokens.shape[1]


def _row_parents(n_pending: int, parents: list[int]) -> list[int]:
    """Parents within the row: pending tokens form a chain; draft roots hang off the last of them."""
    return list(range(-1, n_pending - 1)) + [n_pending - 1 if p < 0 else n_pending + p for p in parents]


def feed_apart(rows: list[tuple[int, int]], pass_overhead: int) -> list[int]:
    """Which rows' pending tokens (all but the last) to feed in passes of their own before a
    batched pass, so that the batch is not padded to long prompts.

    rows: (pending, draft) token counts per row. Taking out the k widest rows narrows the
    padded batch; it pays when the tokens saved exceed those rows' prefixes plus k extra
    passes' overhead (`pass_overhead` tokens each). Returns the rows of the k that saves most.
    """
    widths = [pending + draft for pending, draft in rows]
    order = sorted(range(len(rows)), key=lambda b: -widths[b])
    best, best_saving, fed = 0, 0, 0
    for k, b in enumerate(order, start=1):
        pending = rows[b][0]
        if pending <= 1:  # nothing to take out: no narrower batch beyond this row
            break
        fed += pending - 1 + pass_overhead
        rest = max([widths[c] for c in order[k:]] + [1 + rows[c][1] for c in order[:k]])
        saving = len(rows) * (widths[order[0]] - rest) - fed
        if saving > best_saving:
            best, best_saving = k, saving
    return order[:best]


class _PastLayer(DynamicLayer):
    """One layer of a pass's cache, starting from the gathered past as it is (no copy)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV pool on `device` now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class ModelRunner:
    def __init__(self, settings: HubSettings):
        model_path = Path(settings.model).expanduser()
        self.name = model_path.name
        self.device = choose_device(settings.device)
        if self.device == "cuda":
            # cuDNN's attention builds an execution plan for every new shape, hundreds of ms each
            # (seen on an H100); a hub's passes rarely repeat a shape. The other kernels don't.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.vocab = read_vocabulary(model_path)
        self.model = load_target(
            model_path,
            self.device,
            choose_dtype(settings.dtype, self.device),
            settings.cache_dir or default_cache_dir(),
        )
        if self.model.dtype != torch.float32:
            # Rounding at 16 bits depends on a pass's shape (its sessions, its draft), so a near
            # tie can go either way: measured on an H100, bf16 replies differed from the target
            # decoding alone, for the autoregressive baseline in a batch too; float32 matched.
            log.info(
                "target in %s: replies equal the target decoding alone up to its rounding "
                "(near ties can flip with a batch's shape); --dtype float32 makes them exact",
                str(self.model.dtype).removeprefix("torch."),
            )
        config = self.model.config.get_text_config(decoder=True)
        self.layer_types = list(getattr(config, "layer_types", None) or [FULL] * config.num_hidden_layers)
        self.window = int(getattr(config, "sliding_window", 0) or 0)
        self.pool = self._make_pool(settings, config)
        self.max_context = self.pool.max_context
        # Ids the hub accepts: known to both the tokenizer and the embedding table.
        self.vocab_size = min(self.vocab.size, self.model.get_input_embeddings().num_embeddings)
        # One thing at a time on the device: a forward pass here, or the hub's own drafting.
        self.device_lock = threading.Lock()
        self._zero_tallies()
        if self.device == "cuda":
            self.warm_up(settings.max_batch, settings.max_draft_tokens)

    def _make_pool(self, settings: HubSettings, config) -> KVPool:
        """The KV pool for --max-sessions sessions, sized to the budget; KVBudgetError when it cannot be."""
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        windows = tuple(self.window if kind == SLIDING else 0 for kind in self.layer_types)
        shape = KVShape(heads, dim, self.model.dtype.itemsize, windows)
        model_limit = int(getattr(config, "max_position_embeddings", 0) or 2**31)
        if settings.kv_memory_gib:
            budget, source = int(settings.kv_memory_gib * GIB), "--kv-memory-gib"
        else:
            device = torch.device(self.device)
            share = AUTO_KV_SHARE[device.type]
            budget = int(share * available_memory(device))
            source = f"auto: {share:.0%} of the {device.type} memory free after loading the model"
        plan = plan_kv(shape, settings.max_sessions, settings.max_context, model_limit, budget, source)
        log.info(plan.describe(shape))
        return KVPool(shape, plan, self.model.dtype, self.device)

    # --- sessions' KV memory ------------------------------------------------------------
    def new_kv(self) -> KVSlot | None:
        """A slot for a new session, or None when all are taken."""
        return self.pool.take()

    def release(self, kv: KVSlot) -> None:
        self.pool.give_back(kv)

    def pass_fixed_s(self) -> float | None:
        return self.pass_costs.fixed_s()

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_bytes_used=self.pool.used_bytes,
            kv_bytes_reserved=self.pool.reserved_bytes,
            device_busy_seconds=self.busy_seconds,
            feeds=replace(self.feeds),
            context_in_verify=self.context_in_verify,
            verify_passes={size: replace(tally) for size, tally in sorted(self.verify_passes.items())},
            pass_fixed_seconds=self.pass_costs.fixed_s(),
            pass_token_seconds=self.pass_costs.per_token_s(),
        )

    def stored_kv(self, kv: KVSlot, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a slot holds for `layer`, in position order: [H, n, D] each."""
        capacity = self.pool.capacities[layer]
        positions = column_positions(torch.tensor([kv.length]), capacity, min(kv.length, capacity))[0]
        columns = torch.argsort(positions).to(self.device)
        return self.pool.keys[layer][kv.index, :, columns], self.pool.values[layer][kv.index, :, columns]

    # --- public operations --------------------------------------------------------------
    def prefill(self, kv: KVSlot, context: list[int]) -> None:
        """Bring `kv` up to all of `context` but its last token."""
        with self.device_lock:
            self._feed(kv, context[kv.length : len(context) - 1])

    def verify_batch(self, jobs: list[VerifyJob]) -> None:
        """Verify every job's draft in one forward pass; fills in `path` and `emitted`."""
        with self.device_lock:
            rows = [(len(job.pending), len(job.draft)) for job in jobs]
            for b in feed_apart(rows, PASS_OVERHEAD_TOKENS[self.device]):
                self._feed(jobs[b].kv, jobs[b].pending[:-1])
                jobs[b].pending = jobs[b].pending[-1:]
            tally = self.verify_passes.setdefault(len(jobs), PassTally())
            before = tally.seconds
            with self._device_time(tally):
                tokens = self._verify_pass(jobs)
            self.pass_costs.add(tokens, tally.seconds - before)
            # What the pass computed beyond a pass of every session's last token and draft: the
            # context it carried (a new prompt) and the padding that context caused.
            self.context_in_verify += tokens - len(jobs) * max(1 + len(job.draft) for job in jobs)

    def warm_up(self, max_batch: int, max_draft: int) -> None:
        """One pass for each batch size (powers of two up to `max_batch`) and draft size on scratch
        slots, then give the slots back and zero the device-time tallies."""
        sizes = sorted({1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch} | {max_batch})
        max_draft = min(max_draft, self.max_context - WARM_UP_CONTEXT - 1)  # what a session could send
        drafts = sorted({d for d in WARM_UP_DRAFTS if d <= max_draft} | {max(max_draft, 0)})
        tokens = [2 + i % (self.vocab_size - 2) for i in range(WARM_UP_CONTEXT + max(drafts))]
        context = [1] + tokens[: WARM_UP_CONTEXT - 1]
        slots = [slot for slot in (self.pool.take() for _ in range(max(sizes))) if slot is not None]
        started = time.perf_counter()
        try:
            for slot in slots:
                self.prefill(slot, context)
            for size in (s for s in sizes if s <= len(slots)):
                for draft in drafts:
                    for slot in slots[:size]:
                        slot.length = len(context) - 1
                    self.verify_batch(
                        [
                            VerifyJob(
                                slot,
                                context[-1:],
                                tokens[-draft:] if draft else [],
                                chain_parents(draft),
                                0.0,
                                0,
                                frozenset(),
                            )
                            for slot in slots[:size]
                        ]
                    )
        finally:
            for slot in slots:
                self.pool.give_back(slot)
            self._zero_tallies()
        log.info(
            "warmed up %d batch sizes x %d draft sizes in %.1f s",
            len(sizes),
            len(drafts),
            time.perf_counter() - started,
        )

    # --- internals ----------------------------------------------------------------------
    def _zero_tallies(self) -> None:
        """What the device has done, as /metrics and the merge wait read it: nothing yet."""
        self.busy_seconds = 0.0  # time spent holding the device for forward passes
        self.feeds = PassTally()  # context fed in passes of its own (prompts, resumes)
        self.context_in_verify = 0  # tokens verify passes computed for the context they carried
        self.verify_passes: dict[int, PassTally] = {}  # by sessions in a pass
        self.pass_costs = PassCostFit()  # verify passes' device time against their (padded) tokens

    def _verify_pass(self, jobs: list[VerifyJob]) -> int:
        """One batched pass over the jobs; returns the tokens it computed, padding included."""
        batch = self._batch(
            [job.kv for job in jobs],
            [job.pending + job.draft for job in jobs],
            [_row_parents(len(job.pending), job.parents) for job in jobs],
        )
        # Only columns from the earliest root onwards need logits: a long new prompt's
        # positions would otherwise each cost a full vocabulary projection.
        first = min(len(job.pending) for job in jobs) - 1
        logits, cache = self._forward(batch, logits_to_keep=batch.width - first)
        # Greedy rows read one argmax over the whole batch: one copy from the device, not one a row.
        greedy = logits.argmax(dim=-1).tolist() if any(job.temperature == 0.0 for job in jobs) else None
        kept = [
            self._accept(job, batch, b, logits[b], greedy[b] if greedy else None, first) for b, job in enumerate(jobs)
        ]
        self._keep(batch, cache, kept)
        return batch.tokens.numel()

    def _feed(self, kv: KVSlot, tokens: list[int], chunk: int = 512) -> None:
        """Append `tokens` to `kv` in passes of this session alone, `chunk` tokens each."""
        if not tokens:
            return
        with self._device_time(self.feeds):
            self._feed_passes(kv, tokens, chunk)

    def _feed_passes(self, kv: KVSlot, tokens: list[int], chunk: int) -> None:
        for start in range(0, len(tokens), chunk):
            part = tokens[start : start + chunk]
            batch = self._batch([kv], [part], [_row_parents(len(part), [])])
            _, cache = self._forward(batch, logits_to_keep=1)
            self._keep(batch, cache, [list(range(len(part)))])

    @contextlib.contextmanager
    def _device_time(self, tally: PassTally):
        """Count the time inside it as device time (taken inside the lock: waiting is not busy),
        in `busy_seconds` and in `tally`. On a GPU it waits for the last
        kernels (the KV writes) first."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            self.busy_seconds += seconds
            tally.add(seconds)

    def _batch(self, slots: list[KVSlot], rows: list[list[int]], parents: list[list[int]]) -> _Batch:
        width = max(len(row) for row in rows)
        ancestors = ancestor_masks(parents, width)  # [B, S, S]
        lengths = torch.tensor([slot.length for slot in slots])  # [B]
        # A token's depth below the slot's past is how many ancestors it has, itself included.
        positions = lengths[:, None] + ancestors.sum(-1) - 1  # [B, S]
        tokens = torch.tensor([row + [0] * (width - len(row)) for row in rows])  # [B, S]
        longest = int(lengths.max())
        pasts = {
            kind: min(longest, self.pool.capacities[self.layer_types.index(kind)]) for kind in set(self.layer_types)
        }
        return _Batch(slots, [len(row) for row in rows], tokens, ancestors, positions, lengths, pasts)

    def _accept(
        self, job: VerifyJob, batch: _Batch, b: int, logits: torch.Tensor, argmax: list[int] | None, first: int
    ) -> list[int]:
        """Apply the acceptance rule to row b; returns the row's columns to keep.

        logits: [S - first, V], column c holds the logits of row position first + c.
        argmax: [S - first], their argmax (given when some row of the batch decodes greedily).
        """
        n_pending, size = len(job.pending), batch.sizes[b]
        # Position n_pending - 1 predicts after the root; position n_pending + i after draft node i.
        scored = slice(n_pending - 1 - first, size - first)  # N + 1 columns
        if job.temperature == 0.0 and argmax is not None:
            choices = argmax[scored]
        else:
            draw_positions = (batch.positions[b, n_pending - 1 : size] + 1).tolist()
            choices = target_choices(logits[scored], job.temperature, job.seed, draw_positions)
        job.path, job.emitted = accept_tree(job.draft, job.parents, choices, job.stop_token_ids)
        # Keep what the context now holds, but its last token: pending, then the accepted path.
        kept_nodes = job.path[: len(job.emitted) - 1]
        return list(range(n_pending)) + [n_pending + i for i in kept_nodes]

    @torch.inference_mode()
    def _forward(self, batch: _Batch, logits_to_keep: int = 0) -> tuple[torch.Tensor, Cache]:
        """One pass over every row on top of its slot's past. Returns logits [B, S, V] and the
        pass's cache: per layer the gathered past columns, then the rows' new tokens."""
        indices = [slot.index for slot in batch.slots]
        slots = indices[0] if len(indices) == 1 else torch.tensor(indices, device=self.device)
        layers = [
            _PastLayer(*self.pool.gather(layer, slots, batch.pasts[kind]))
            for layer, kind in enumerate(self.layer_types)
        ]
        masks = {kind: self._mask(batch, kind).to(self.device) for kind in batch.pasts}
        out = self.model(
            input_ids=batch.tokens.to(self.device),
            position_ids=batch.positions.to(self.device),
            attention_mask=masks if SLIDING in masks else masks[FULL],
            cache=Cache(layers=layers),
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits.float(), out.cache  # the forward appended the new tokens to each layer

    def _mask(self, batch: _Batch, kind: str) -> torch.Tensor:
        """Which keys each query sees: [B, 1, S, P + S] bool.

        Past columns are the slot's gathered columns (empty ones hidden); new columns are the
        row's own tokens, visible along the ancestor path only (padding sees itself). Sliding
        layers also drop keys window or more positions back.
        """
        capacity = self.pool.capacities[self.layer_types.index(kind)]
        past_positions = column_positions(batch.lengths, capacity, batch.pasts[kind])  # [B, P]
        queries = batch.positions  # [B, S]
        visible_past = (past_positions >= 0)[:, None, :].expand(-1, batch.width, -1)  # [B, S, P]
        visible_new = batch.ancestors  # [B, S, S]
        if kind == SLIDING and self.window:
            visible_past = visible_past & (queries[:, :, None] - past_positions[:, None, :] < self.window)
            visible_new = visible_new & (queries[:, :, None] - queries[:, None, :] < self.window)
        return torch.cat([visible_past, visible_new], dim=-1)[:, None]

    def _keep(self, batch: _Batch, cache: Cache, kept: list[list[int]]) -> None:
        """Write the kept new-token columns of each row into its slot, in place."""
        for kind in batch.pasts:
            capacity = self.pool.capacities[self.layer_types.index(kind)]
            rows, sources, slots, columns = [], [], [], []
            for b, (slot, keep) in enumerate(zip(batch.slots, kept)):
                # A ring smaller than what is kept takes only the latest tokens.
                for offset in range(max(0, len(keep) - capacity), len(keep)):
                    rows.append(b)
                    sources.append(batch.pasts[kind] + keep[offset])
                    slots.append(slot.index)
                    columns.append((slot.length + offset) % capacity)
            # One copy to the device for all four index lists.
            rows, sources, slots, columns = torch.tensor([rows, sources, slots, columns], device=self.device).unbind()
            for layer in (i for i, k in enumerate(self.layer_types) if k == kind):
                new = cache.layers[layer]
                self.pool.write(layer, slots, columns, new.keys[rows, :, sources], new.values[rows, :, sources])
        for slot, keep in zip(batch.slots, kept):
            slot.length += len(keep)

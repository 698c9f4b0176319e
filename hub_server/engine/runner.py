"""The model runner: the engine that owns the target model, its KV pool and the forward passes.

It owns the target model and the KV pool that holds every session's keys and values
(`kv_pool.py`: blocks allocated once at start, taken by sessions as their contexts grow). One
forward pass verifies the drafts of many sessions at once, whatever their context lengths and
draft shapes: each session's new tokens (pending context tokens, then draft tree nodes) are laid
out in a row with their own positions (`layout.py`), and the attention (a backend of
`attention/`, chosen at start by `--attention`) reads each session's past through its block
table, letting each token see exactly its session's past and its own ancestors. The new tokens' keys and values are written into the
session's blocks during the pass; the target's choices are projected only where the acceptance
rule reads them (`projection.py`); afterwards each session keeps the keys and values of its
pending tokens and its accepted path, nothing else, and gives back the blocks past them. Which
passes run, and who shares each, is the scheduler's to say (`scheduler.Composition`): the
runner runs the pass it is given. On a CPU, how the passes compute is chosen by timings at start
(`cpu/timings.py`).

With `--compile on` the passes take a few fixed shapes (rows and widths rounded up to powers of
two), each compiled once and kept under the hub's cache directory, which a restart loads instead
of compiling again. With FlexAttention the whole decoder is one graph per shape, over buffers
filled in place; with the attention as an operator between graphs, the graph calls it once a
layer. torch.compile compiles them ahead and saves them whole (`saved_passes.py`; CUDA graphs on
a GPU), except a CPU's passes through the operator: AOTInductor packages (`pass_packages.py`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from hub_server.config import HubSettings, default_cache_dir
from hub_server.engine.attention.choice import choose_attention
from hub_server.engine.attention.flex import FlexBackend
from hub_server.engine.attention.interface import POOL_ATTENTION, THROUGH_OPERATOR, PassAttention
from hub_server.engine.attention.metadata import FULL, SLIDING
from hub_server.engine.cpu.timings import time_cpu_choices
from hub_server.engine.kv_pool import BLOCK_TOKENS, GIB, KVPool, KVShape, SessionKV, blocks_for, plan_kv
from hub_server.engine.layout import PassBatch, PassLayout, buckets, row_parents
from hub_server.engine.loading import choose_device, choose_dtype, load_target, read_vocabulary
from hub_server.engine.pass_packages import PassDecoder, PassPackages
from hub_server.engine.projection import ProjectionWalk
from hub_server.engine.rotary import rotary_table, tabled
from hub_server.engine.saved_passes import SavedPasses, code_facts, model_facts, prune_other_keys
from hub_server.engine_api import EngineStats, KVHandle, PassTally, VerifyJob
from hub_server.errors import KVMemoryFull
from hub_server.pass_cost import PassCostFit
from hub_server.tree import accept_tree, chain_parents

# Without --kv-memory-gib, the KV pool may take this share of the memory left once the model
# is loaded: on a GPU the rest is for the passes themselves (activations, logits);
# a CPU machine is shared with the rest of the system.
AUTO_KV_SHARE = {"cuda": 0.5, "cpu": 0.25}
# A GPU loads each kernel the first time a pass needs it: on an H100 a fresh hub's first passes
# took up to 4 s, and the first pass of each new batch size hundreds of ms. The hub runs these
# shapes once at start (CUDA only), so its first users do not pay for them.
WARM_UP_CONTEXT = 16
WARM_UP_DRAFTS = (0, 8, 32)
# A prompt is fed in passes of at most this many tokens. The widest row a pass carries (this, or
# a verify's last token and longest draft): a new session is admitted while its blocks are free.
FEED_CHUNK = 128
SMALLEST_WIDTH = 16  # the narrowest compiled row: narrower ones cost about as much on any device

log = logging.getLogger("hub_server")
CompiledDecoder = Callable[[PassBatch, PassAttention], torch.Tensor]  # a bucket's pass -> hidden states


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV pool on `device` now."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as meminfo:
            line = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def coarse(budget: int) -> int:
    """`budget` rounded down to five significant bits (at most 1/16 less): the free memory it
    comes from moves a little from start to start, and a compiled pass that reads the whole pool
    (FlexAttention's) is saved for one pool size, which a restart should find again."""
    step = 1 << max(budget.bit_length() - 5, 0)
    return budget // step * step


class ModelRunner:
    def __init__(self, settings: HubSettings):
        model_path = Path(settings.model).expanduser()
        self.name = model_path.name
        self.device = choose_device(settings.device)
        # torch's intra-op threads, chosen for the pass: a verify pass is many small operators,
        # which one thread runs fastest on a CPU (more wait at each operator for the slowest, the
        # more so on busy cores); a prompt's chunk is wide products, which every core speeds up.
        # --threads fixes one count for both.
        cores = torch.get_num_threads()
        self.verify_threads = settings.threads or (1 if self.device == "cpu" else cores)
        self.prompt_threads = settings.threads or cores
        if self.device == "cuda":
            # cuDNN's attention builds an execution plan for every new shape, hundreds of ms each
            # (seen on an H100); a hub's passes rarely repeat a shape. The other kernels don't.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.vocab = read_vocabulary(model_path)
        self.model = self._load_model(model_path, settings)
        self.model.set_attn_implementation(POOL_ATTENTION)
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
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)
        # The widest row a pass carries: a fed chunk, or a verify's last token and longest draft.
        self.widest_row = max(FEED_CHUNK, 1 + settings.max_draft_tokens)
        self.pool = self._make_pool(settings, config)
        self.max_context = self.pool.max_context
        self.kinds = {kind: self.window if kind == SLIDING else 0 for kind in set(self.layer_types)}  # their windows
        # The pool attention builds its own masks; a 4D placeholder keeps transformers from building any.
        placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self._placeholder_mask = {kind: placeholder for kind in self.kinds} if SLIDING in self.kinds else placeholder
        # Ids the hub accepts: known to both the tokenizer and the embedding table.
        self.vocab_size = min(self.vocab.size, self.model.get_input_embeddings().num_embeddings)
        # One thing at a time on the device: a forward pass here, or the hub's own drafting.
        self.device_lock = threading.Lock()
        # Which draft nodes the vocabulary projection computes (`projection.py`).
        self.walk = ProjectionWalk(self._logits)
        # What is timed for the verify passes is timed on their threads: with a prompt's threads
        # the reference's products (which use them all) beat the kernel on views it wins in a pass.
        _use_threads(self.verify_threads)
        time_cpu_choices(self.model, settings, self.device, self.walk)
        self.attention = self._choose_attention(settings, config)
        self.compiled = _compile_wanted(settings.compile, self.device)
        self.batch_buckets = buckets(settings.max_batch)
        # Verify rows: a session's last token and its draft; the scheduler feeds longer pending
        # context apart first (`scheduler.Composition`), so that a compiled pass keeps its shapes.
        widest_verify = 1 + settings.max_draft_tokens
        self.width_buckets = buckets(widest_verify, min(SMALLEST_WIDTH, widest_verify))
        self.widest_verify_row = self.width_buckets[-1] if self.compiled else self.widest_row
        self.layout = PassLayout(self.device, self.batch_buckets, self.width_buckets)
        self._packages: PassPackages | None = None  # a CPU's passes through the operator, one package per bucket
        self._saved: SavedPasses | None = None  # the other compiled passes: torch.compile's, saved
        self._bucket_passes: dict[tuple[int, int], Callable] = {}
        self.passes_from_cache = 0  # buckets whose compiled pass a start loaded instead of compiling
        self._decoder: CompiledDecoder | None = self._compiled_decoder(settings) if self.compiled else None
        self.compiled_shapes: set[tuple[int, int]] = set()  # buckets run through the compiled decoder
        self._zero_tallies()
        if self.compiled:
            self.compile_buckets()
        elif self.device == "cuda":
            self.warm_up(settings.max_batch, settings.max_draft_tokens)

    def _load_model(self, model_path: Path, settings: HubSettings):
        """The target on this runner's device."""
        dtype = choose_dtype(settings.dtype, self.device)
        return load_target(model_path, self.device, dtype, settings.cache_dir or default_cache_dir())

    def _make_pool(self, settings: HubSettings, config) -> KVPool:
        """The KV pool's blocks, as many as the budget holds; KVBudgetError when it cannot hold one session."""
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = KVShape(heads, dim, self.model.dtype.itemsize, len(self.layer_types))
        model_limit = int(getattr(config, "max_position_embeddings", 0) or 2**31)
        budget, source = self._kv_budget(settings)
        plan = plan_kv(shape, settings.max_sessions, settings.max_context, model_limit, budget, source, self.widest_row)
        log.info(plan.describe(shape))
        return KVPool(shape, plan, self.model.dtype, self.device)

    def _kv_budget(self, settings: HubSettings) -> tuple[int, str]:
        """The KV pool's bytes on this device, and how they were chosen (for the log line)."""
        if settings.kv_memory_gib:
            return int(settings.kv_memory_gib * GIB), "--kv-memory-gib"
        device = torch.device(self.device)
        share = AUTO_KV_SHARE[device.type]
        source = f"auto: {share:.0%} of the {device.type} memory free after loading the model"
        return coarse(int(share * available_memory(device))), source

    def _choose_attention(self, settings: HubSettings, config):
        """The attention backend `--attention` names, or `auto`'s (`attention/choice.py`); on a CPU
        `auto` times the kernel on a typical verify pass: up to 8 sessions of a token and an 8-token draft."""
        pass_shape = (
            min(settings.max_batch, 8),
            min(1 + settings.max_draft_tokens, 9),
            config.num_attention_heads,
            self.pool.shape.heads,
            self.pool.shape.dim,
        )
        cache_dir = settings.cache_dir or default_cache_dir()
        table_blocks = blocks_for(self.max_context + self.widest_row)
        return choose_attention(
            settings.attention, self.pool, self.layer_types, self.kinds, cache_dir, pass_shape, table_blocks
        )

    # --- sessions' KV memory ------------------------------------------------------------
    def new_kv(self, scope: str | None = None) -> SessionKV | None:
        """A new session's KV memory, or None when the session table is full or the blocks of a
        pass's widest row are not free. `scope`: the sessions whose full blocks it may share
        (the same scope's), None for none."""
        return self.pool.open(least_blocks=blocks_for(self.widest_row), scope=scope)

    def release(self, kv: KVHandle) -> None:
        self.pool.close(_own(kv))

    def reserve(self, kv: KVHandle, tokens: int) -> bool:
        """Take the blocks for `kv` to hold `tokens` context tokens before a pass writes them;
        False (nothing taken) when too few blocks are free."""
        return self.pool.cover(_own(kv), tokens)

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices its passes run on."""
        return (str(self.device),)

    def pass_fixed_s(self) -> float | None:
        return self.pass_costs.fixed_s()

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_bytes_used=self.pool.used_bytes,
            kv_bytes_reserved=self.pool.reserved_bytes,
            kv_blocks=self.pool.usable_blocks,
            kv_blocks_used=self.pool.used_blocks,
            kv_blocks_cached=self.pool.cached_blocks,
            kv_blocks_shared=self.pool.shared_blocks,
            prefix_hits=self.pool.tally.prefix_hits,
            prefix_tokens_reused=self.pool.tally.tokens_reused,
            kv_blocks_reclaimed=self.pool.tally.reclaimed,
            device_busy_seconds=self.busy_seconds,
            feeds=replace(self.feeds),
            context_in_verify=self.context_in_verify,
            verify_passes={size: replace(tally) for size, tally in sorted(self.verify_passes.items())},
            pass_fixed_seconds=self.pass_costs.fixed_s(),
            pass_token_seconds=self.pass_costs.per_token_s(),
            past_kv_bytes_copied=self.past_kv_bytes_copied,
            kept_kv_bytes_moved=self.kept_kv_bytes_moved,
            compiled_hits=self.compiled_hits,
            compiled_misses=self.compiled_misses,
            compiled_buckets=len(self.compiled_shapes),
            devices=self.devices,
        )

    # --- public operations --------------------------------------------------------------
    def prefill(self, kv: KVHandle, context: list[int]) -> None:
        """Bring `kv` up to all of `context` but its last token."""
        with self.device_lock:
            _use_threads(self.prompt_threads)
            self.pool.share(_own(kv), context)
            self._feed(_own(kv), context[kv.length : len(context) - 1])

    def feed(self, kv: KVHandle, pending: list[int]) -> None:
        """Bring `kv` up to all of `pending` (the context after what it stores) but its last token,
        in passes of its session alone."""
        own = _own(kv)
        self.pool.settle(own)
        self.prefill(own, own.tokens + pending)

    def verify_batch(self, jobs: list[VerifyJob]) -> float:
        """Verify every job's draft in one forward pass, whatever context each brings (the
        scheduler chose who shares it); fills in `path` and `emitted`. Returns the pass's device
        seconds."""
        with self.device_lock:
            _use_threads(self.verify_threads)
            for job in jobs:  # a new context's leading blocks may be in the pool already
                if len(job.pending) > BLOCK_TOKENS:
                    kv = _own(job.kv)
                    self.pool.settle(kv)
                    job.pending = job.pending[self.pool.share(kv, kv.tokens + job.pending) :]
            tally = self.verify_passes.setdefault(len(jobs), PassTally())
            before = tally.seconds
            contexts = sum(len(_own(job.kv).tokens) for job in jobs)
            with self._device_time(tally):
                rows, width = self._verify_pass(jobs)
            # Its tokens (padded), and the positions they attended: each row's over its context.
            self.pass_costs.add(rows * width, tally.seconds - before, reads=width * (contexts + len(jobs) * width))
            # What the pass computed beyond a pass of every session's last token and draft: the
            # context it carried (a new prompt) and the padding that context caused in every row
            # (not a bucket's padding, which a pass of drafts alone has too).
            plain = max(1 + len(job.draft) for job in jobs)
            self.context_in_verify += rows * (max(len(job.pending) + len(job.draft) for job in jobs) - plain)
            return tally.seconds - before

    def warm_up(self, max_batch: int, max_draft: int) -> None:
        """One pass for each batch size (powers of two up to `max_batch`) and draft size on scratch
        slots, then give the slots back and zero the device-time tallies."""
        max_draft = min(max_draft, self.max_context - WARM_UP_CONTEXT - 1)  # what a session could send
        drafts = sorted({d for d in WARM_UP_DRAFTS if d <= max_draft} | {max(max_draft, 0)})
        started = time.perf_counter()
        self._scratch_passes([(size, draft) for size in buckets(max_batch) for draft in drafts])
        log.info(
            "warmed up %d batch sizes x %d draft sizes in %.1f s",
            len(buckets(max_batch)),
            len(drafts),
            time.perf_counter() - started,
        )

    def compile_buckets(self) -> None:
        """Compile the decoder for every bucket (rows x width), or load it from the cache, then
        run each once on scratch slots."""
        shapes = [(rows, width) for rows in self.batch_buckets for width in self.width_buckets]
        started = time.perf_counter()
        for done, (rows, width) in enumerate(shapes, start=1):
            shape_started = time.perf_counter()
            how = "loaded" if self._load_or_compile(rows, width) else "compiled"
            log.info(
                "%s pass %d of %d: %d rows x %d tokens (%.1f s)",
                how,
                done,
                len(shapes),
                rows,
                width,
                time.perf_counter() - shape_started,
            )
        self._scratch_passes([(rows, width - 1) for rows, width in shapes])
        compiled_passes = self._packages or self._saved
        assert compiled_passes is not None
        prune_other_keys(compiled_passes.folder)
        seconds = time.perf_counter() - started
        if self.passes_from_cache == len(shapes):
            how = f"{len(shapes)} buckets loaded from the cache in {seconds:.1f} s"
        else:
            how = f"{len(shapes)} buckets compiled in {seconds:.1f} s ({self.passes_from_cache} loaded from the cache)"
        log.info("compiled passes: %s: rows %s x widths %s", how, self.batch_buckets, self.width_buckets)

    def _load_or_compile(self, rows: int, width: int) -> bool:
        """The bucket's compiled pass, loaded or compiled; True where it came from the cache."""
        with tabled(self.model.model, self._rotary_table), torch.inference_mode():
            if self._packages is not None:
                compiled_pass, loaded = self._packages.load_or_compile(rows, width)
            else:
                assert self._saved is not None
                compiled_pass, loaded = self._saved.load_or_compile(rows, width, self._example_pass(rows, width))
        self._bucket_passes[rows, width] = compiled_pass
        self.passes_from_cache += loaded
        return loaded

    def _example_pass(self, rows: int, width: int) -> tuple:
        """What `_decode` is called with in a bucket's compiled pass: the bucket's buffers for
        FlexAttention, tensors of its shape through the operator."""
        if isinstance(self.attention, FlexBackend):
            bucket = self.attention.bucket(rows, width)
            return (self, bucket.tokens, bucket.positions, bucket)
        tokens = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        return (self, tokens, torch.arange(width, device=self.device).repeat(rows, 1), THROUGH_OPERATOR)

    # --- internals ----------------------------------------------------------------------
    def _scratch_passes(self, passes: list[tuple[int, int]]) -> None:
        """Verify passes of (sessions, draft tokens) on scratch slots with a short context, then
        give the slots back and zero the tallies: what a hub does before its first users."""
        longest = max(draft for _, draft in passes)
        tokens = [2 + i % (self.vocab_size - 2) for i in range(WARM_UP_CONTEXT + longest)]
        context = [1] + tokens[: WARM_UP_CONTEXT - 1]
        opened = (self.pool.open() for _ in range(max(n for n, _ in passes)))
        slots = [slot for slot in opened if slot is not None]
        try:
            for slot in slots:
                self.prefill(slot, context)
            for size, draft in passes:
                for slot in slots[:size]:
                    slot.length = len(context) - 1
                if size <= len(slots):
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
                self.pool.close(slot)
            self._zero_tallies()

    def _zero_tallies(self) -> None:
        """What the device has done, as /metrics and the merge wait read it: nothing yet."""
        self.busy_seconds = 0.0  # time spent holding the device for forward passes
        self.feeds = PassTally()  # context fed in passes of its own (prompts, resumes)
        self.context_in_verify = 0  # tokens verify passes computed for the context they carried
        self.verify_passes: dict[int, PassTally] = {}  # by sessions in a pass
        self.pass_costs = PassCostFit()  # verify passes' device time against their (padded) tokens and reads
        self.past_kv_bytes_copied = 0  # past keys and values a pass read through a copy: 0 by design
        self.kept_kv_bytes_moved = 0  # a tree's accepted nodes moved down to close the gap
        self.compiled_hits = 0  # passes run by a compiled bucket
        self.compiled_misses = 0  # passes (with --compile on) no bucket was compiled for: run eagerly
        self.walk.projected_rows = 0  # verify rows the vocabulary projection computed

    def _verify_pass(self, jobs: list[VerifyJob]) -> tuple[int, int]:
        """One batched pass over the jobs; returns its rows and width, padding included."""
        batch = self._batch(
            [_own(job.kv) for job in jobs],
            [job.pending + job.draft for job in jobs],
            [row_parents(len(job.pending), job.parents) for job in jobs],
            bucketed=self.compiled,
        )
        hidden = self._forward(batch, counted=True)
        kept = []
        for job, choices in zip(jobs, self.walk.choices(jobs, batch, hidden)):
            job.path, job.emitted = accept_tree(job.draft, job.parents, choices, job.stop_token_ids)
            job.note_emitted_logprobs()
            # Keep what the context now holds, but its last token: pending, then the accepted path.
            nodes = job.path[: len(job.emitted) - 1]
            kept.append((len(job.pending), nodes, job.pending + [job.draft[node] for node in nodes]))
        self._keep(batch, kept)
        rows, width = batch.tokens.shape
        return rows, width

    def _feed(self, kv: SessionKV, tokens: list[int]) -> None:
        """Append `tokens` to `kv` in passes of this session alone, FEED_CHUNK tokens each."""
        if not tokens:
            return
        with self._device_time(self.feeds):
            for start in range(0, len(tokens), FEED_CHUNK):
                part = tokens[start : start + FEED_CHUNK]
                batch = self._batch([kv], [part], [row_parents(len(part), [])])
                self._forward(batch)
                self._keep(batch, [(len(part), [], part)])

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

    def _batch(
        self, slots: list[SessionKV], rows: list[list[int]], parents: list[list[int]], bucketed: bool = False
    ) -> PassBatch:
        """The rows laid out for a pass (`layout.py`). Each session's blocks must hold its new
        tokens (`reserve`, or taken here: KVMemoryFull when they cannot be)."""
        for slot, row in zip(slots, rows):
            self._cover(slot, slot.length + len(row))
        return self.layout.lay(slots, rows, parents, bucketed)

    def _cover(self, kv: SessionKV, tokens: int) -> None:
        if not self.pool.cover(kv, tokens):
            raise KVMemoryFull(
                f"the hub's KV memory is full ({self.pool.usable_blocks} blocks of {BLOCK_TOKENS} tokens in use); "
                "retry in a few seconds"
            )

    @torch.inference_mode()
    def _forward(self, batch: PassBatch, counted: bool = False) -> torch.Tensor:
        """One pass over every row on top of its slot's past, writing the rows' keys and values
        into the slots as it goes. Returns the last hidden states [B', S', hidden].
        A verify pass (`counted`) counts as a compiled-bucket hit or miss; a prompt fed in
        passes of its own runs eagerly (long rows: few passes, each worth its launches)."""
        shape = tuple(batch.tokens.shape)
        compiled = self.compiled and shape[0] in self.batch_buckets and shape[1] in self.width_buckets
        attention = self.attention.begin(batch.meta)
        if compiled:
            assert self._decoder is not None
            self.compiled_shapes.add(shape)
            hidden = self._decoder(batch, attention)
        else:
            hidden = self._decode(batch.tokens, batch.positions, attention)
        if self.compiled and counted:
            self.compiled_hits += compiled
            self.compiled_misses += not compiled
        self.past_kv_bytes_copied += attention.copied_bytes
        return hidden

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, attention: PassAttention) -> torch.Tensor:
        """The target's decoder (everything but the vocabulary projection): [B, S] -> [B, S, hidden]."""
        out = self.model.model(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=self._placeholder_mask,
            use_cache=False,
            kv_pool=attention,
        )
        return out.last_hidden_state

    def _compiled_decoder(self, settings: HubSettings):
        """`_decode` compiled, one pass per bucket, loaded or compiled by `compile_buckets`: with
        FlexAttention the whole decoder as one graph, over the bucket's buffers; through the
        attention operator on a GPU one graph between its calls; both torch.compile's, saved
        whole, CUDA graphs on a GPU. Through the operator on a CPU, AOTInductor packages."""
        cache = (settings.cache_dir or default_cache_dir()) / "torch-compile"
        # Inductor's home for the kernels it builds, under the hub's cache (unless the user chose one).
        # Inductor writes its default into the variable the first time anything asks (importing
        # transformers does), so only a value other than that default is the user's own choice.
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

        if os.environ.get("TORCHINDUCTOR_CACHE_DIR", inductor_default()) == inductor_default():
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
        log.info("compile cache: %s", os.environ["TORCHINDUCTOR_CACHE_DIR"])
        # Compiled passes read the rotary cosines and sines from a table (rotary.py): inductor
        # would otherwise compute them again in every layer's kernel.
        self._rotary_table = rotary_table(self.model.model, self.max_context + self.widest_row + 1, self.model.dtype)
        if self.device == "cpu" and not isinstance(self.attention, FlexBackend):
            return self._packaged_decoder(cache / "passes")
        return self._saved_decoder(cache / "saved-passes")

    def _saved_decoder(self, root: Path):
        """`_decode` through each bucket's function that torch.compile compiled ahead and saved
        (`saved_passes.py`): the rotary table in place, and the pass's attention (FlexAttention:
        the bucket's buffers, filled in place before each pass, `FlexBucket.fill`; else the operator)."""
        options = {"triton.cudagraphs": self.device == "cuda"}
        flex = self.attention if isinstance(self.attention, FlexBackend) else None
        facts = [*code_facts(self.device), *model_facts(self.model.model), self.attention.name]
        # The rotary table's length; and flex's graph reads each layer's pool whole.
        facts += [f"contexts {self.max_context}, rows {self.widest_row}, threads {self.verify_threads}"]
        if flex is not None:
            facts += [f"pool {len(self.pool.keys)} x {self.pool.keys[0].dtype} {tuple(self.pool.keys[0].shape)}"]
        self._saved = SavedPasses(root, ModelRunner._decode, options, facts)

        def saved_pass(batch: PassBatch, attention: PassAttention) -> torch.Tensor:
            rows, width = batch.tokens.shape
            compiled = self._bucket_passes[rows, width]
            with tabled(self.model.model, self._rotary_table):
                if flex is not None:
                    bucket = flex.bucket(rows, width)
                    bucket.fill(batch.meta, batch.tokens, batch.positions)
                    return compiled(self, bucket.tokens, bucket.positions, bucket)
                with attention.active():
                    return compiled(self, batch.tokens, batch.positions, THROUGH_OPERATOR)

        return saved_pass

    def _packaged_decoder(self, root: Path):
        """`_decode` through each bucket's AOTInductor package (`pass_packages.py`), loaded or
        compiled by `compile_buckets`; the token embedding is looked up before it."""
        # Each call of a small pass costs as much as its work: the weights become constants of
        # the compiled graph (freezing), packed once for MKL's matrix products, and the
        # projections that read the same input become one product (q, k and v; gate and up)
        # (113 -> 64 products a pass on the dispatch-bound target). The packed weights are a
        # second copy of the linear layers' weights, beside the model's own that eager passes
        # (prompts fed apart, a bucket's miss) still use.
        options = {"freezing": True, "cpp.enable_concat_linear": True}
        embed = self.model.model.get_input_embeddings()
        decoder = PassDecoder(self.model.model, embed, self._placeholder_mask)
        with tabled(self.model.model, self._rotary_table):
            self._packages = PassPackages(root, decoder, self.verify_threads, options)

        def packaged_pass(batch: PassBatch, attention: PassAttention) -> torch.Tensor:
            tokens = batch.tokens
            with attention.active():
                return self._bucket_passes[tokens.shape[0], tokens.shape[1]](embed(tokens), batch.positions)

        return packaged_pass

    def _logits(self, hidden: torch.Tensor, columns: list[int]) -> torch.Tensor:
        """The target's logits at the given flattened columns of `hidden`: [K, V] float32.
        Only scored positions are projected: on a 262k-token vocabulary, most of a pass."""
        states = hidden.reshape(-1, hidden.shape[-1])[torch.tensor(columns, device=self.device)]
        with torch.inference_mode():
            logits = self.model.lm_head(states)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits.float()

    def _keep(self, batch: PassBatch, kept: list[tuple[int, list[int], list[int]]]) -> None:
        """Keep each row's pending tokens and accepted nodes: (pending, nodes, their tokens) per
        row; give back the blocks past them, and name the blocks they filled (shared prefixes).

        The pass wrote every new token after its session's past, pending tokens first, so those
        and a chain's accepted nodes already stand where they belong; a tree's accepted nodes
        that do not are moved down, in one copy a layer for the whole batch.
        """
        sources, targets = [], []
        for slot, (pending, nodes, _) in zip(batch.slots, kept):
            moved = [
                (slot.length + pending + node, slot.length + pending + k) for k, node in enumerate(nodes) if node != k
            ]
            sources += self.pool.places(slot, [source for source, _ in moved])
            targets += self.pool.places(slot, [target for _, target in moved])
        if sources:
            self._move_positions(sources, targets)
        for slot, (pending, nodes, tokens) in zip(batch.slots, kept):
            slot.length += pending + len(nodes)
            self.pool.trim(slot)
            self.pool.stored(slot, tokens)

    def _move_positions(self, sources: list[int], targets: list[int]) -> None:
        """In every layer, copy the keys and values at pool row sources[k] to targets[k]."""
        sources_t, targets_t = torch.tensor([sources, targets], device=self.device).unbind()
        for keys, values in zip(self.pool.keys, self.pool.values):
            flat_keys, flat_values = self.pool.flat(keys), self.pool.flat(values)
            flat_keys[targets_t] = flat_keys[sources_t]
            flat_values[targets_t] = flat_values[sources_t]
            self.kept_kv_bytes_moved += 2 * flat_keys[0].nbytes * len(sources)


def _use_threads(threads: int) -> None:
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _own(kv: KVHandle) -> SessionKV:
    """A handle the service holds, as the session's KV memory this runner gave it."""
    if not isinstance(kv, SessionKV):
        raise TypeError(f"not a session of this runner's KV pool: {kv!r}")
    return kv


def _compile_wanted(mode: str, device: str) -> bool:
    """--compile: on, off, or auto (on for CUDA, where a pass is bound by launching kernels)."""
    return mode == "on" or (mode == "auto" and device == "cuda")

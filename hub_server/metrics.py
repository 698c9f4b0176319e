"""The hub's `/metrics` page, through prometheus-client: histograms of what takes time, counters
of what happened, and the engine's and scheduler's figures read when the page is scraped.

Each hub has a registry of its own (`HubMetrics.registry`), so that several hubs can live in one
process (tests) without sharing series. What the service observes as it happens (a verify's
time, a pass's queue wait and device time, a refusal) goes into prometheus-client's histograms
and counters; what the engine and the scheduler already keep (device busy time, passes by
size, KV bytes, the fitted pass cost) is read from their snapshots at scrape time by
`HubCollector`, so nothing is counted twice. Series keep the `specedge_` names outside readers
know (`specedge_common/metric_names.py`); `specedge_verify_seconds` is now a histogram (its
`_sum` and `_count` mean what the summary's did). Engine series take a `worker` label once a hub
has several engines (`engines()` names them); a hub of one engine has no such label.
Plain Python, no torch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hub_server.engine_api import EngineStats

del GC_COLLECTOR  # the process-wide default; each hub registers its own below

# Milliseconds to seconds: a verify on a GPU takes a few ms, a long prompt's pass on a CPU seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SESSIONS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
TOKENS_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64)
PROMPT_TOKENS_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
MEDIA_TYPE = CONTENT_TYPE_LATEST


@dataclass
class VerifyTotals:
    """Running totals the mean-tokens-per-verify gauge is computed from."""

    verifies: int = 0
    emitted: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class HubMetrics:
    """Everything the hub observes as it happens, in one registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        for process_collector in (ProcessCollector, PlatformCollector, GCCollector):
            process_collector(registry=self.registry)
        r = self.registry
        self.verify_seconds = Histogram(
            "specedge_verify_seconds",
            "Hub time per verify, from its arrival to its answer, queueing included (every mode's).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "specedge_queue_wait_seconds",
            "Time a verify waited in the scheduler's queue before its pass began.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pass_device_seconds = Histogram(
            "specedge_pass_device_seconds",
            "Device time of each verify pass (the forward pass, masks and KV writes).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions_per_pass = Histogram(
            "specedge_sessions_per_pass",
            "Sessions verified together in one pass.",
            buckets=SESSIONS_BUCKETS,
            registry=r,
        )
        self.tokens_per_verify = Histogram(
            "specedge_verify_tokens",
            "Tokens a verify emitted (accepted draft tokens plus the bonus token).",
            buckets=TOKENS_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "specedge_time_to_first_token_seconds",
            "Server-only modes: from a generate request's arrival to its first tokens.",
            ["mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens_per_step = Histogram(
            "specedge_prompt_tokens_per_step",
            "Prompt tokens a worker's step fed beside its verify batch (prompts go in chunks).",
            buckets=PROMPT_TOKENS_BUCKETS,
            registry=r,
        )
        self.prompt_wait_seconds = Histogram(
            "specedge_prompt_wait_seconds",
            "Time a prompt waited in the scheduler's queue before its first chunk.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.feed_seconds = Histogram(
            "specedge_feed_seconds",
            "Hub time per feed, from its arrival until all of its prompt is in (when the next verify can go).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "specedge_refusals", "Requests refused, by error code (see docs/protocol.md).", ["code"], registry=r
        )
        self.draft_tokens = Counter("specedge_draft_tokens", "Draft tokens received.", registry=r)
        self.accepted_tokens = Counter("specedge_accepted_tokens", "Draft tokens accepted.", registry=r)
        self.emitted_tokens = Counter(
            "specedge_emitted_tokens", "Tokens emitted, by serving mode.", ["mode"], registry=r
        )
        self.evicted_sessions = Counter(
            "specedge_evicted_sessions", "Sessions evicted: idle too long, or for a new one on a full hub.", registry=r
        )
        self.evicted_for_memory = Counter(
            "specedge_evicted_for_memory",
            "Of those, sessions evicted because another's pass needed KV blocks and none were free.",
            registry=r,
        )
        self.lost_sessions = Counter(
            "specedge_lost_sessions",
            "Sessions dropped with a lost engine worker; their clients reopen them on a live one.",
            registry=r,
        )
        self.closed_for_removed_accounts = Counter(
            "specedge_sessions_closed_account_removed",
            "Sessions closed because their account was removed.",
            registry=r,
        )
        self.totals = VerifyTotals()

    def record_verify(self, mode: str, seconds: float, drafted: int, accepted: int, emitted: int) -> None:
        self.verify_seconds.observe(seconds)
        self.tokens_per_verify.observe(emitted)
        self.draft_tokens.inc(drafted)
        self.accepted_tokens.inc(accepted)
        self.emitted_tokens.labels(mode).inc(emitted)
        with self.totals.lock:
            self.totals.verifies += 1
            self.totals.emitted += emitted

    def record_pass(self, queue_waits: list[float]) -> None:
        """A pass is about to run: how long each of its verifies waited for it."""
        self.sessions_per_pass.observe(len(queue_waits))
        for wait in queue_waits:
            self.queue_wait_seconds.observe(wait)

    def record_prompt_step(self, tokens: int, first_chunk_waits: list[float]) -> None:
        """A step is about to feed `tokens` of prompts; the prompts starting in it waited this long."""
        self.prompt_tokens_per_step.observe(tokens)
        for wait in first_chunk_waits:
            self.prompt_wait_seconds.observe(wait)

    def record_refusal(self, code: str) -> None:
        self.refusals.labels(code).inc()

    def mean_tokens_per_verify(self) -> float:
        with self.totals.lock:
            return self.totals.emitted / self.totals.verifies if self.totals.verifies else 0.0

    def page(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(frozen=True)
class HubFigures:
    """What the collector reads from the hub at scrape time."""

    active_sessions: int
    queue_depth: int
    last_batch_size: int
    batches: int
    batched_jobs: int
    merge_waits: int
    merge_wait_seconds: float
    user_return_seconds: float
    hub_draft_seconds: float
    tokens_per_verify: float
    workers_ready: int = 1
    workers_total: int = 1


class HubCollector(Collector):
    """The hub's and its engines' own figures, read when `/metrics` is scraped."""

    def __init__(self, figures: Callable[[], HubFigures], engines: Callable[[], dict[str | None, EngineStats]]):
        self._figures = figures
        self._engines = engines  # worker name -> stats; None: the hub's one local engine

    def collect(self) -> Iterator:
        yield from _hub_families(self._figures())
        yield from _engine_families(self._engines())


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"specedge_{name}", help_text, value=value)


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"specedge_{name}", help_text, value=value)


def _hub_families(f: HubFigures) -> Iterator:
    yield _gauge("active_sessions", "Sessions open on the hub.", f.active_sessions)
    yield _gauge("queue_depth", "Verify requests waiting for the device.", f.queue_depth)
    yield _gauge("batch_size_last", "Sessions in the most recent forward pass.", f.last_batch_size)
    yield _counter("batches", "Forward passes run for verifies.", f.batches)
    yield _counter("batched_jobs", "Verify requests run inside those passes.", f.batched_jobs)
    yield _counter("merge_waits", "Batches held for users due back soon, so they share the pass.", f.merge_waits)
    yield _counter("merge_wait_seconds", "Seconds those batches were held.", f.merge_wait_seconds)
    yield _gauge(
        "user_return_seconds",
        "How long users take to send their next verify after a reply reaches them from the device "
        "(median of recent returns; 0: none yet).",
        f.user_return_seconds,
    )
    yield _counter(
        "hub_draft_seconds", "Seconds the hub spent drafting (server-only speculative mode).", f.hub_draft_seconds
    )
    yield _gauge("tokens_per_verify", "Mean tokens emitted per verify.", f.tokens_per_verify)
    yield _gauge("workers_ready", "Engine workers serving (ready or draining).", f.workers_ready)
    yield _gauge("workers_total", "Engine workers configured.", f.workers_total)


def _engine_families(engines: dict[str | None, EngineStats]) -> Iterator:
    """One family per figure, a sample per engine (labelled by worker where there are several)."""
    labelled = any(worker is not None for worker in engines)
    base = ["worker"] if labelled else []

    def family(
        kind: type[CounterMetricFamily | GaugeMetricFamily], name: str, help_text: str, extra: tuple[str, ...] = ()
    ) -> Any:
        return kind(f"specedge_{name}", help_text, labels=base + list(extra))

    kv = family(GaugeMetricFamily, "kv_bytes", "KV memory held by open sessions' blocks, in bytes.")
    reserved = family(GaugeMetricFamily, "kv_bytes_reserved", "KV memory allocated at start for all blocks, in bytes.")
    busy = family(
        CounterMetricFamily, "device_busy_seconds", "Seconds the device spent on the target's forward passes."
    )
    prefill = family(
        CounterMetricFamily,
        "prefill_seconds",
        "Of those, seconds spent feeding context (new prompts, resumed sessions) in passes of its own, apart from verifies.",
    )
    carried = family(
        CounterMetricFamily,
        "verify_context_tokens",
        "Tokens verify passes computed for the context they carried (a new prompt sent with its first verify), "
        "padding included; times specedge_pass_token_seconds, their device time.",
    )
    fixed = family(
        GaugeMetricFamily,
        "pass_fixed_seconds",
        "A verify pass's device time that does not grow with its tokens, as fitted (0 until passes of two sizes "
        "have run); batches wait at most --merge-wait-share of it.",
    )
    per_token = family(
        GaugeMetricFamily,
        "pass_token_seconds",
        "What each token adds to a verify pass's device time, as fitted (0 until passes of two sizes have run).",
    )
    passes = family(
        CounterMetricFamily, "verify_passes", "Verify forward passes, by sessions in the pass.", ("sessions",)
    )
    pass_seconds = family(
        CounterMetricFamily,
        "verify_pass_seconds",
        "Device seconds of those passes, by sessions in the pass.",
        ("sessions",),
    )
    copied = family(
        CounterMetricFamily,
        "past_kv_bytes_copied",
        "Bytes of sessions' past keys and values that passes copied before attending to them "
        "(the attention reads the KV pool in place: 0).",
    )
    moved = family(
        CounterMetricFamily,
        "kept_kv_bytes_moved",
        "Bytes of accepted draft-tree nodes' keys and values moved within their slots to close a gap.",
    )
    hits = family(
        CounterMetricFamily, "compiled_pass_hits", "Verify passes run by a pass shape compiled at start (--compile on)."
    )
    misses = family(
        CounterMetricFamily,
        "compiled_pass_misses",
        "Verify passes no compiled pass shape fitted, run eagerly (--compile on).",
    )
    buckets = family(
        GaugeMetricFamily,
        "compiled_pass_buckets",
        "Pass shapes (sessions x tokens) compiled at start; 0 with --compile off.",
    )
    devices = family(
        GaugeMetricFamily,
        "engine_devices",
        "The devices an engine's passes run on, 1 each: one, or a tensor-parallel worker's ranks (--tensor-parallel).",
        ("rank", "device"),
    )
    blocks = _block_families(family)
    for worker, stats in engines.items():
        at = [worker] if labelled else []
        for rank, device in enumerate(stats.devices):
            devices.add_metric([*at, str(rank), device], 1)
        for name, block_family in blocks.items():
            block_family.add_metric(at, getattr(stats, name))
        copied.add_metric(at, stats.past_kv_bytes_copied)
        moved.add_metric(at, stats.kept_kv_bytes_moved)
        hits.add_metric(at, stats.compiled_hits)
        misses.add_metric(at, stats.compiled_misses)
        buckets.add_metric(at, stats.compiled_buckets)
        kv.add_metric(at, stats.kv_bytes_used)
        reserved.add_metric(at, stats.kv_bytes_reserved)
        busy.add_metric(at, stats.device_busy_seconds)
        prefill.add_metric(at, stats.feeds.seconds)
        carried.add_metric(at, stats.context_in_verify)
        fixed.add_metric(at, stats.pass_fixed_seconds or 0.0)
        per_token.add_metric(at, stats.pass_token_seconds or 0.0)
        for size, tally in sorted(stats.verify_passes.items()):
            passes.add_metric([*at, str(size)], tally.passes)
            pass_seconds.add_metric([*at, str(size)], tally.seconds)
    yield from (kv, reserved, busy, prefill, carried, fixed, per_token, passes, pass_seconds)
    yield from (copied, moved, hits, misses, buckets, devices)
    yield from blocks.values()


def _block_families(family: Callable[..., Any]) -> dict[str, Any]:
    """The KV pool's blocks and prefix sharing, one family per `EngineStats` field of that name."""
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    return {
        "kv_blocks": family(gauge, "kv_blocks", "KV blocks allocated at start (16 tokens of every layer each)."),
        "kv_blocks_used": family(gauge, "kv_blocks_used", "KV blocks held by open sessions."),
        "kv_blocks_cached": family(
            gauge, "kv_blocks_cached", "KV blocks no session holds, kept for their prefix until memory is needed."
        ),
        "kv_blocks_shared": family(gauge, "kv_blocks_shared", "KV blocks held by more than one session."),
        "prefix_hits": family(
            counter, "prefix_hits", "Full KV blocks sessions took from the pool (a shared prefix) instead of computing."
        ),
        "prefix_tokens_reused": family(counter, "prefix_tokens_reused", "Their tokens: context not computed again."),
        "kv_blocks_reclaimed": family(
            counter, "kv_blocks_reclaimed", "Cached blocks taken back, least recently used first, for new contents."
        ),
    }

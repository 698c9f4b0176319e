"""Hub metrics in the Prometheus text format. Plain counters; no client library needed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from hub_server.engine_api import EngineStats
from hub_server.scheduler import SchedulerStats


@dataclass
class HubMetrics:
    verifies: int = 0
    verify_seconds: float = 0.0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_by_mode: dict[str, int] = field(default_factory=dict)
    evicted_sessions: int = 0
    lost_sessions: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_verify(self, mode: str, seconds: float, drafted: int, accepted: int, emitted: int) -> None:
        with self._lock:
            self.verifies += 1
            self.verify_seconds += seconds
            self.draft_tokens += drafted
            self.accepted_tokens += accepted
            self.emitted_by_mode[mode] = self.emitted_by_mode.get(mode, 0) + emitted


@dataclass(frozen=True)
class WorkerFigures:
    """One worker's point-in-time figures for the page; `worker` labels its series (None: unlabelled,
    the one worker of an in-process hub)."""

    worker: str | None
    device: EngineStats
    scheduler: SchedulerStats
    queue_depth: int
    user_return_seconds: float
    sessions: int


def render(metrics: HubMetrics, gauges: dict[str, float], workers: list[WorkerFigures]) -> str:
    """The /metrics page. `gauges` holds the hub's point-in-time values; device and batching
    series come per worker, labelled `worker="<id>"` when there are several."""
    lines: list[str] = []

    def emit(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP specedge_{name} {help_text}")
        lines.append(f"# TYPE specedge_{name} {kind}")
        lines.extend(f"specedge_{name}{labels} {value:g}" for labels, value in samples)

    def per_worker(name: str, kind: str, help_text: str, value: Callable[[WorkerFigures], float]) -> None:
        emit(name, kind, help_text, [(_labels(w.worker), value(w)) for w in workers])

    emit("active_sessions", "gauge", "Sessions open on the hub.", [("", gauges["active_sessions"])])
    emit("workers_ready", "gauge", "Engine workers serving (ready or draining).", [("", gauges["workers_ready"])])
    emit("workers_total", "gauge", "Engine workers configured.", [("", gauges["workers_total"])])
    if any(w.worker is not None for w in workers):
        per_worker("worker_sessions", "gauge", "Sessions open on each worker.", lambda w: w.sessions)
    per_worker("queue_depth", "gauge", "Verify requests waiting for the device.", lambda w: w.queue_depth)
    per_worker(
        "kv_bytes", "gauge", "KV memory held by open sessions' slots, in bytes.", lambda w: w.device.kv_bytes_used
    )
    per_worker(
        "kv_bytes_reserved",
        "gauge",
        "KV memory allocated at start for all slots, in bytes.",
        lambda w: w.device.kv_bytes_reserved,
    )
    per_worker(
        "batch_size_last", "gauge", "Sessions in the most recent forward pass.", lambda w: w.scheduler.last_batch_size
    )
    per_worker("batches_total", "counter", "Forward passes run for verifies.", lambda w: w.scheduler.batches)
    per_worker("batched_jobs_total", "counter", "Verify requests run inside those passes.", lambda w: w.scheduler.jobs)
    per_worker(
        "merge_waits_total",
        "counter",
        "Batches held for users due back soon, so they share the pass.",
        lambda w: w.scheduler.merge_waits,
    )
    per_worker(
        "merge_wait_seconds_total",
        "counter",
        "Seconds those batches were held.",
        lambda w: w.scheduler.merge_wait_seconds,
    )
    per_worker(
        "pass_fixed_seconds",
        "gauge",
        "A verify pass's device time that does not grow with its tokens, as "
        "fitted (0 until passes of two sizes have run); batches wait at most --merge-wait-share of it.",
        lambda w: w.device.pass_fixed_seconds or 0.0,
    )
    per_worker(
        "pass_token_seconds",
        "gauge",
        "What each token adds to a verify pass's device time, as fitted (0 until passes of two sizes have run).",
        lambda w: w.device.pass_token_seconds or 0.0,
    )
    per_worker(
        "user_return_seconds",
        "gauge",
        "How long users take to send their next verify after a reply "
        "reaches them from the device (median of recent returns; 0: none yet).",
        lambda w: w.user_return_seconds,
    )
    per_worker(
        "device_busy_seconds_total",
        "counter",
        "Seconds the device spent on the target's forward passes.",
        lambda w: w.device.device_busy_seconds,
    )
    per_worker(
        "prefill_seconds_total",
        "counter",
        "Of those, seconds spent feeding context (new prompts, "
        "resumed sessions) in passes of its own, apart from verifies.",
        lambda w: w.device.feeds.seconds,
    )
    per_worker(
        "verify_context_tokens_total",
        "counter",
        "Tokens verify passes computed for the context they "
        "carried (a new prompt sent with its first verify), padding included; times "
        "specedge_pass_token_seconds, their device time.",
        lambda w: w.device.context_in_verify,
    )
    emit(
        "verify_passes_total",
        "counter",
        "Verify forward passes, by sessions in the pass.",
        [
            (_labels(w.worker, sessions=size), tally.passes)
            for w in workers
            for size, tally in w.device.verify_passes.items()
        ],
    )
    emit(
        "verify_pass_seconds_total",
        "counter",
        "Device seconds of those passes, by sessions in the pass.",
        [
            (_labels(w.worker, sessions=size), tally.seconds)
            for w in workers
            for size, tally in w.device.verify_passes.items()
        ],
    )
    emit(
        "hub_draft_seconds_total",
        "counter",
        "Seconds the hub spent drafting (server-only speculative mode).",
        [("", gauges["hub_draft_seconds"])],
    )
    emit(
        "verify_seconds",
        "summary",
        "Hub time per verify request, queueing included.",
        [("_sum", metrics.verify_seconds), ("_count", metrics.verifies)],
    )
    emit("draft_tokens_total", "counter", "Draft tokens received.", [("", metrics.draft_tokens)])
    emit("accepted_tokens_total", "counter", "Draft tokens accepted.", [("", metrics.accepted_tokens)])
    emitted = sum(metrics.emitted_by_mode.values())
    emit(
        "tokens_per_verify",
        "gauge",
        "Mean tokens emitted per verify.",
        [("", emitted / metrics.verifies if metrics.verifies else 0.0)],
    )
    emit(
        "emitted_tokens_total",
        "counter",
        "Tokens emitted, by serving mode.",
        [(f'{{mode="{mode}"}}', count) for mode, count in sorted(metrics.emitted_by_mode.items())],
    )
    emit("evicted_sessions_total", "counter", "Sessions evicted after idling.", [("", metrics.evicted_sessions)])
    emit(
        "lost_sessions_total",
        "counter",
        "Sessions dropped because their worker was lost (clients reopen them on another).",
        [("", metrics.lost_sessions)],
    )
    return "\n".join(lines) + "\n"


def _labels(worker: str | None, **more: object) -> str:
    """`{worker="1",sessions="4"}`, the worker left out when unlabelled; "" when nothing is left."""
    pairs = ([("worker", worker)] if worker is not None else []) + list(more.items())
    return "{" + ",".join(f'{key}="{value}"' for key, value in pairs) + "}" if pairs else ""

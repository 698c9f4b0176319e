"""Hub metrics in the Prometheus text format. Plain counters; no client library needed."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class HubMetrics:
    verifies: int = 0
    verify_seconds: float = 0.0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_by_mode: dict[str, int] = field(default_factory=dict)
    evicted_sessions: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_verify(self, mode: str, seconds: float, drafted: int, accepted: int, emitted: int) -> None:
        with self._lock:
            self.verifies += 1
            self.verify_seconds += seconds
            self.draft_tokens += drafted
            self.accepted_tokens += accepted
            self.emitted_by_mode[mode] = self.emitted_by_mode.get(mode, 0) + emitted


def render(metrics: HubMetrics, gauges: dict[str, float], scheduler_stats) -> str:
    """The /metrics page. `gauges` holds point-in-time values (sessions, queue depth, KV bytes)."""
    lines: list[str] = []

    def emit(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP specedge_{name} {help_text}")
        lines.append(f"# TYPE specedge_{name} {kind}")
        lines.extend(f"specedge_{name}{labels} {value:g}" for labels, value in samples)

    emit("active_sessions", "gauge", "Sessions open on the hub.", [("", gauges["active_sessions"])])
    emit("queue_depth", "gauge", "Verify requests waiting for the device.", [("", gauges["queue_depth"])])
    emit("kv_bytes", "gauge", "KV memory held by open sessions' slots, in bytes.", [("", gauges["kv_bytes"])])
    emit(
        "kv_bytes_reserved",
        "gauge",
        "KV memory allocated at start for all slots, in bytes.",
        [("", gauges["kv_bytes_reserved"])],
    )
    emit(
        "batch_size_last", "gauge", "Sessions in the most recent forward pass.", [("", scheduler_stats.last_batch_size)]
    )
    emit("batches_total", "counter", "Forward passes run for verifies.", [("", scheduler_stats.batches)])
    emit("batched_jobs_total", "counter", "Verify requests run inside those passes.", [("", scheduler_stats.jobs)])
    emit(
        "merge_waits_total",
        "counter",
        "Batches held for users due back soon, so they share the pass.",
        [("", scheduler_stats.merge_waits)],
    )
    emit(
        "merge_wait_seconds_total",
        "counter",
        "Seconds those batches were held.",
        [("", scheduler_stats.merge_wait_seconds)],
    )
    emit(
        "pass_fixed_seconds",
        "gauge",
        "A verify pass's device time that does not grow with its tokens, as "
        "fitted (0 until passes of two sizes have run); batches wait at most --merge-wait-share of it.",
        [("", gauges["pass_fixed_seconds"])],
    )
    emit(
        "pass_token_seconds",
        "gauge",
        "What each token adds to a verify pass's device time, as fitted (0 until passes of two sizes have run).",
        [("", gauges["pass_token_seconds"])],
    )
    emit(
        "user_return_seconds",
        "gauge",
        "How long users take to send their next verify after a reply "
        "reaches them from the device (median of recent returns; 0: none yet).",
        [("", gauges["user_return_seconds"])],
    )
    emit(
        "device_busy_seconds_total",
        "counter",
        "Seconds the device spent on the target's forward passes.",
        [("", gauges["device_busy_seconds"])],
    )
    emit(
        "prefill_seconds_total",
        "counter",
        "Of those, seconds spent feeding context (new prompts, "
        "resumed sessions) in passes of its own, apart from verifies.",
        [("", gauges["prefill_seconds"])],
    )
    emit(
        "verify_context_tokens_total",
        "counter",
        "Tokens verify passes computed for the context they "
        "carried (a new prompt sent with its first verify), padding included; times "
        "specedge_pass_token_seconds, their device time.",
        [("", gauges["verify_context_tokens"])],
    )
    passes = gauges["verify_passes"]
    emit(
        "verify_passes_total",
        "counter",
        "Verify forward passes, by sessions in the pass.",
        [(f'{{sessions="{size}"}}', count) for size, (count, _) in passes.items()],
    )
    emit(
        "verify_pass_seconds_total",
        "counter",
        "Device seconds of those passes, by sessions in the pass.",
        [(f'{{sessions="{size}"}}', seconds) for size, (_, seconds) in passes.items()],
    )
    emit(
        "past_kv_bytes_copied_total",
        "counter",
        "Bytes of sessions' past keys and values that passes copied before attending "
        "to them (the attention reads the KV pool in place: 0).",
        [("", gauges.get("past_kv_bytes_copied", 0))],
    )
    emit(
        "kept_kv_bytes_moved_total",
        "counter",
        "Bytes of accepted draft-tree nodes' keys and values moved within their slots to close a gap.",
        [("", gauges.get("kept_kv_bytes_moved", 0))],
    )
    emit(
        "compiled_pass_hits_total",
        "counter",
        "Verify passes run by a pass shape compiled at start (--compile on).",
        [("", gauges.get("compiled_pass_hits", 0))],
    )
    emit(
        "compiled_pass_misses_total",
        "counter",
        "Verify passes no compiled pass shape fitted, run eagerly (--compile on).",
        [("", gauges.get("compiled_pass_misses", 0))],
    )
    emit(
        "compiled_pass_buckets",
        "gauge",
        "Pass shapes (sessions x tokens) compiled at start; 0 with --compile off.",
        [("", gauges.get("compiled_pass_buckets", 0))],
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
    return "\n".join(lines) + "\n"

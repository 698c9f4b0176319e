"""One bench run: every mode in turn, the same users and prompts, figures read off the hub's /metrics.

Server throughput counts only the hub's busy time (its forward passes, plus its own drafting in
server_only_spec), so edge drafting on the same machine does not count against the hub.
"""

from __future__ import annotations

import os
import statistics
import time
from functools import partial
from typing import Any

from specedge_bench.bound import bound_from_runs
from specedge_bench.config import MODES, BenchConfig
from specedge_bench.cost import cost_ratios, mode_cost
from specedge_bench.metrics import MetricsPage, hub_busy_s, pass_ms_by_sessions, per_worker, worker_mean
from specedge_bench.users import ClientRecord, SimulatedUser, connect, run_all
from specedge_bench.workload import Workload, hub_info, prepare_workload
from specedge_common import metric_names as names


def _rotated(prompts: list[list[int]], start: int) -> list[list[int]]:
    start %= len(prompts)
    return prompts[start:] + prompts[:start]


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile of `values` (nearest rank; 0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_mode(mode: str, config: BenchConfig, users: list[SimulatedUser], prompt_tokens: list[list[int]]) -> dict:
    """Every user answers every prompt in `mode`, all at once; the mode's figures."""
    for user in users:
        user.record = ClientRecord()
        user.replies = {}
    with connect(config) as client:
        before = MetricsPage.parse(client.metrics())
        started = time.perf_counter()
        # Each user starts at a different prompt so the mix is the same whatever N is.
        run_all([partial(u.run, mode, _rotated(prompt_tokens, u.index)) for u in users])
        wall = time.perf_counter() - started
        after = MetricsPage.parse(client.metrics())
    return _figures(config, users, after, after.since(before), wall)


def _figures(
    config: BenchConfig, users: list[SimulatedUser], after: MetricsPage, grown: MetricsPage, wall: float
) -> dict:
    busy = hub_busy_s(grown)
    # Context is fed apart from verifies, or inside a verify pass (a prompt sent with its first
    # verify, as clients do): those tokens at the fitted cost per token.
    in_verify = grown.value(names.VERIFY_CONTEXT_TOKENS)
    token_s = per_worker(after, names.PASS_TOKEN_SECONDS)  # each worker's own fitted cost
    in_verify_s = sum(
        tokens * token_s.get(w, 0.0) for w, tokens in per_worker(grown, names.VERIFY_CONTEXT_TOKENS).items()
    )
    passes = grown.value(names.BATCHES)
    # An estimate from the fit, never more than the verify passes' measured time less each pass's
    # fixed part, which decoding pays whatever a pass carries (a short run's fit can overshoot). A
    # fit that has found no fixed part cannot split a pass: its prompt tokens stay in decoding.
    verify_busy = busy - grown.value(names.PREFILL_SECONDS)
    fixed_s = worker_mean(after, names.PASS_FIXED_SECONDS)
    in_verify_s = min(in_verify_s, max(0.0, verify_busy - passes * fixed_s)) if fixed_s > 0 else 0.0
    prefill = grown.value(names.PREFILL_SECONDS) + in_verify_s
    verifies = grown.value(names.VERIFY_REQUESTS)
    records = [u.record for u in users]
    emitted = sum(r.emitted for r in records)
    itl = [x for r in records for x in r.step_itl_ms]
    drafts_ahead, ahead_hits = sum(r.drafts_ahead for r in records), sum(r.ahead_hits for r in records)
    ttft = [x for r in records for x in r.ttft_ms]
    edge_busy = sum(r.edge_busy_s for r in records)
    return {
        "emitted_tokens": emitted,
        "server_throughput": emitted / busy if busy else 0.0,
        "wall_throughput": emitted / wall,
        "tokens_per_verify": emitted / verifies if verifies else 0.0,
        "itl_ms_mean": statistics.fmean(itl) if itl else 0.0,
        "itl_ms_p95": percentile(itl, 0.95),
        "ttft_ms_mean": statistics.fmean(ttft) if ttft else 0.0,
        "hub_busy_fraction": busy / wall,
        "hub_busy_s": busy,
        # Prompts cost every mode alike; without them, what decoding costs.
        "prefill_busy_s": prefill,
        "prefill_in_verify_s": in_verify_s,  # of which inside verify passes
        "verify_context_tokens": in_verify,
        "decode_throughput": emitted / (busy - prefill) if busy > prefill else 0.0,
        "forward_passes": passes,
        "busy_ms_per_pass": 1000 * grown.value(names.DEVICE_BUSY_SECONDS) / passes if passes else 0.0,
        "verifies_per_pass": verifies / passes if passes else 0.0,
        # Batches held for users due back soon (--merge-wait-share), and for how long in all.
        "merge_waits": grown.value(names.MERGE_WAITS),
        "merge_wait_s": grown.value(names.MERGE_WAIT_SECONDS),
        "pass_fixed_ms": 1000 * worker_mean(after, names.PASS_FIXED_SECONDS),
        "user_return_ms": 1000 * after.value(names.USER_RETURN_SECONDS),
        "pass_ms_by_sessions": pass_ms_by_sessions(grown),
        "wall_s": wall,
        # SpecEdge users' drafts made ahead while a verify was out, and the share that was sent.
        "proactive_drafts": drafts_ahead,
        "proactive_hit_rate": ahead_hits / drafts_ahead if drafts_ahead else 0.0,
        "cost": mode_cost(emitted, busy, edge_busy, config.server_price_per_hour, config.edge_price_per_hour),
    }


def run_bench(config: BenchConfig, modes: tuple[str, ...] = MODES, workload: Workload | None = None) -> dict:
    """Every mode at `config.clients` users, side by side: figures, ratios and the bound."""
    info = hub_info(config)
    workload = workload or prepare_workload(config, modes)
    users = [SimulatedUser(i, config, workload.edges, info, workload.stop_ids) for i in range(config.clients)]
    results = {}
    for mode in modes:
        results[mode] = run_mode(mode, config, users, workload.prompt_tokens)
        results[mode]["lossless"] = all(u.replies == workload.replies for u in users)
    return {
        "modes": results,
        "ratios": ratios(results),
        "bound": bound_from_runs(results, config.clients),
        "config": _config_record(config, info.model, workload),
    }


def _config_record(config: BenchConfig, target: str, workload: Workload) -> dict[str, Any]:
    return {
        "hub": config.hub_url,
        "target": target,
        "draft": config.draft.name,
        "clients": config.clients,
        "rtt_ms": config.rtt_ms,
        "max_tokens": config.max_tokens,
        "draft_len": config.draft_len,
        "prompts": len(config.prompts),
        "cpu_count": os.cpu_count(),
        "edge_tps": round(workload.edges.tokens_per_second, 1),
        "proactive": config.proactive,
        "server_price_per_hour": config.server_price_per_hour,
        "edge_price_per_hour": config.edge_price_per_hour,
    }


def ratio(a: float, b: float) -> float:
    """a / b to three places (0 when b is 0)."""
    return round(a / b, 3) if b else 0.0


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """SpecEdge against each baseline that ran: throughput, latency and cost efficiency."""
    spec, ar, sos = results.get("specedge"), results.get("autoregressive"), results.get("server_only_spec")
    found: dict[str, float] = {}
    if spec and ar:
        found["throughput_vs_autoregressive"] = ratio(spec["server_throughput"], ar["server_throughput"])
    if spec and sos:
        found["throughput_vs_server_only_spec"] = ratio(spec["server_throughput"], sos["server_throughput"])
        found["itl_vs_server_only_spec"] = ratio(spec["itl_ms_mean"], sos["itl_ms_mean"])
    return found | cost_ratios(results)

"""The bound: what the hardware allows at a run's load.

Tokens per verify x the cost of a one-token pass over all N sessions / that of a verify pass
over all N. With a hub the bench started, measured directly after the runs (`PassProbe`, on the
same device, dtype and cores); against a running hub, through its API: N sessions send one-token
and verify requests back to back, and /metrics counts the passes they make by size. Prompts fed
in passes of their own are counted apart (`prefill_busy_s`), and the share of the bound compares
decode throughput without them: both modes feed the same prompts.
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
from dataclasses import replace
from functools import partial
from typing import Any

from specedge_bench.config import BenchConfig
from specedge_bench.metrics import MetricsPage, pass_ms_by_sessions
from specedge_bench.users import connect, open_session, run_all
from specedge_bench.workload import Workload
from specedge_cli.errors import HubError
from specedge_cli.remote.client import HubClient

PassTable = dict[int, list[float]]  # {sessions in a pass: [passes, mean device ms]}


def pass_ms_at(table: PassTable, sessions: int) -> float:
    """A pass's device time with `sessions` sessions in it: a line through the passes seen
    (least squares, weighted by how often each size ran), or their mean where one size ran."""
    total = sum(count for count, _ in table.values())
    if not total:
        return 0.0
    mean_size = sum(size * count for size, (count, _) in table.items()) / total
    mean_ms = sum(ms * count for count, ms in table.values()) / total
    spread = sum(count * (size - mean_size) ** 2 for size, (count, _) in table.items())
    if not spread:
        return mean_ms
    slope = sum(count * (size - mean_size) * (ms - mean_ms) for size, (count, ms) in table.items()) / spread
    return mean_ms + slope * (sessions - mean_size)


def bound_from_runs(results: dict[str, dict[str, Any]], clients: int) -> dict:
    """The bound read off the passes each mode ran (a line through their sizes). An
    extrapolation where a mode never ran full passes, so a bench that started its hub replaces
    it with `probe_bounds`, and one against a running hub with `probe_bounds_through_hub`."""
    spec, ar = results.get("specedge"), results.get("autoregressive")
    if not (spec and ar):
        return {}
    one_token_ms = pass_ms_at(ar["pass_ms_by_sessions"], clients)
    verify_ms = pass_ms_at(spec["pass_ms_by_sessions"], clients)
    if not (one_token_ms > 0 and verify_ms > 0):
        return {}
    return bound_from(results, clients, one_token_ms, verify_ms, "passes seen")


def bound_from(
    results: dict[str, dict[str, Any]], clients: int, one_token_ms: float, verify_ms: float, measured: str
) -> dict:
    """The bound from the two pass costs at `clients` sessions, and each mode's share of it."""
    spec, ar = results["specedge"], results["autoregressive"]
    bound = spec["tokens_per_verify"] * one_token_ms / verify_ms
    # The bound counts passes only, so the share of it compares decoding alone: the prompts'
    # prefill, the same work in both modes, would otherwise pull any ratio towards 1.
    decode_ratio = spec["decode_throughput"] / ar["decode_throughput"] if ar["decode_throughput"] else 0.0
    return {
        "throughput_vs_autoregressive": round(bound, 3),
        "measured": measured,
        "sessions_per_pass": clients,
        "one_token_pass_ms": round(one_token_ms, 2),
        "verify_pass_ms": round(verify_ms, 2),
        "decode_throughput_vs_autoregressive": round(decode_ratio, 3),
        "share_of_bound": round(decode_ratio / bound, 3) if bound else 0.0,
        # The share's two halves: each mode's decoding against full passes at the probe's cost.
        "specedge_share_of_full_passes": round(
            spec["decode_throughput"] * verify_ms / (1000 * clients * spec["tokens_per_verify"]), 3
        ),
        "autoregressive_share_of_full_passes": round(ar["decode_throughput"] * one_token_ms / (1000 * clients), 3),
    }


def probe_bounds(runs: list[dict], model: str, device: str, dtype: str, workload: Workload, cores: set[int]) -> None:
    """Measure each run's bound directly, once the hub this bench started has stopped: a
    one-token pass and a verify pass over all N sessions on the hub's own runner, with the same
    device, dtype and cores, with contexts spread like the runs' (from the prompt to the reply's
    end: a pass is as wide as its longest past)."""
    import torch

    from hub_server.engine.probe import PassProbe

    if cores:
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(len(cores))
    config = runs[0]["config"]
    prompt = statistics.fmean(len(p) for p in workload.prompt_tokens)
    context = int(prompt + config["max_tokens"] / 2)
    spread = config["max_tokens"]  # users are anywhere between their prompt and its reply's end
    probe = PassProbe(
        model,
        device=device,
        dtype=dtype,
        sessions=max(run["config"]["clients"] for run in runs),
        context=context,
        draft_tokens=config["draft_len"],
        spread=spread,
    )
    for run in runs:
        results, clients = run["modes"], run["config"]["clients"]
        if "specedge" in results and "autoregressive" in results:
            one_token_ms, verify_ms = probe.pass_pair_ms(clients, config["draft_len"])
            measured = f"probe: contexts {context - spread // 2}-{context + spread // 2}"
            run["bound"] = bound_from(results, clients, one_token_ms, verify_ms, measured)


def probe_bounds_through_hub(
    runs: list[dict], config: BenchConfig, workload: Workload, rounds: int = 4, verifies: int = 3
) -> None:
    """Measure each run's bound on a hub this bench did not start, through its public API.

    N sessions, each holding one of the prompts, send verifies back to back with no round trip,
    in turns of `verifies` each: with empty drafts (one-token passes) and with `draft_len` random
    draft tokens (verify passes; what a pass costs does not depend on what it accepts). Users
    due back at once share passes (the hub's merge wait), so most passes hold all N, and each
    kind's cost at N is read off its own passes in /metrics, turn by turn, so that a machine
    speeding up or slowing down moves both alike. Other users of the hub join those passes too:
    measure a quiet hub.
    """
    for run in runs:
        results, clients = run["modes"], run["config"]["clients"]
        if not ("specedge" in results and "autoregressive" in results):
            continue
        one_token, verify = _passes_through_hub(replace(config, clients=clients), workload, rounds, verifies)
        one_token_ms, verify_ms = pass_ms_at(one_token, clients), pass_ms_at(verify, clients)
        if one_token_ms > 0 and verify_ms > 0:
            sizes = "/".join(str(size) for size in sorted(set(one_token) | set(verify)))
            measured = f"through the hub's API: passes of {sizes} sessions"
            run["bound"] = bound_from(results, clients, one_token_ms, verify_ms, measured)


def _passes_through_hub(
    config: BenchConfig, workload: Workload, rounds: int, verifies: int
) -> tuple[PassTable, PassTable]:
    """The one-token passes and the verify passes that `probe_bounds_through_hub` has the hub run."""
    rng = random.Random(0)
    users = [connect(config) for _ in range(config.clients)]  # a connection each, as users have
    sessions: list[str] = []
    try:
        info = users[0].info()
        for user in users:
            sessions.append(open_session(user, info))
        prompts = workload.prompt_tokens
        run_all([partial(u.verify, s, prompts[i % len(prompts)], []) for i, (u, s) in enumerate(zip(users, sessions))])
        seen: dict[int, PassTable] = {0: {}, config.draft_len: {}}
        for _ in range(rounds):
            for draft_len, table in seen.items():
                drafts = [[rng.randrange(10, info.vocab_size) for _ in range(draft_len)] for _ in users]
                before = MetricsPage.parse(users[0].metrics())
                run_all([partial(_verify_turn, u, s, d, verifies) for u, s, d in zip(users, sessions, drafts)])
                _add_passes(table, pass_ms_by_sessions(MetricsPage.parse(users[0].metrics()).since(before)))
    finally:
        _close_all(users, sessions)
    return seen[0], seen[config.draft_len]


def _verify_turn(user: HubClient, session: str, draft: list[int], verifies: int) -> None:
    """`verifies` verifies of the same random draft, back to back: little of it is accepted, and
    what a pass costs does not depend on what it accepts."""
    for _ in range(verifies):
        user.verify(session, [], draft)


def _close_all(users: list[HubClient], sessions: list[str]) -> None:
    """Close what was opened, also when the hub refused something midway."""
    for user, session in zip(users, sessions):
        with contextlib.suppress(HubError):  # the hub is gone; it ends idle sessions itself
            user.close_session(session)
    for user in users:
        user.close()


def _add_passes(table: PassTable, more: PassTable) -> None:
    """Fold `more` ({sessions: [passes, mean ms]}) into `table`."""
    for size, (count, ms) in more.items():
        had, had_ms = table.get(size, [0, 0.0])
        table[size] = [had + count, round((had * had_ms + count * ms) / (had + count), 2)]

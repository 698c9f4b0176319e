"""Past one machine, by simulation: many users over many workers, the hub's real scheduler and placement.

    .venv/bin/python benchmarks/fleet_sim.py [--pair gemma|qwen] [--workers 16] [--users 1000] [--rtt-ms 14 50]
        [--sweep 1 2 4 8 16 32 48 64 96 128] [--sweep-workers 4] [--json docs/bench/fleet-sim.json]
        [--plot docs/bench/fleet-sim.png] [--skip-fleet] [--slots 1024] [--max-batch 64]

Torch-free and model-free (`specedge_bench/fleet.py` says what is real, measured and modelled).
For each round trip: the fleet (`--users` over `--workers`) with SpecEdge users and with
server-only autoregressive serving on the same workers; then a sweep of users per worker
(`--sweep`, on `--sweep-workers` workers) for how many users a worker holds before its ITL p95
is twice what one user sees.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path

from specedge_bench.fleet import PAIRS, FleetConfig, simulate, with_users

MODES = ("specedge", "autoregressive")


def fleet_rows(base: FleetConfig, pair_name: str, rtts: list[float]) -> list[dict]:
    return [simulate(replace(base, mode=mode, rtt_ms=rtt), PAIRS[pair_name]) for rtt in rtts for mode in MODES]


def sweep(base: FleetConfig, pair_name: str, rtts: list[float], per_worker: list[int], workers: int) -> list[dict]:
    small = replace(base, workers=workers)
    return [
        simulate(with_users(replace(small, mode=mode, rtt_ms=rtt), n), PAIRS[pair_name]) | {"users_per_worker": n}
        for rtt in rtts
        for mode in MODES
        for n in per_worker
    ]


def doubling(rows: list[dict], mode: str, rtt: float) -> dict:
    """Users per worker at which ITL p95 reaches twice its one-user value (linear between the
    sweep's points; None when the sweep never got there)."""
    points = sorted((r["users_per_worker"], r["itl_ms_p95"]) for r in rows if r["mode"] == mode and r["rtt_ms"] == rtt)
    alone = points[0][1]
    for (n0, p0), (n1, p1) in itertools.pairwise(points):
        if p1 >= 2 * alone:
            at = n0 + (n1 - n0) * (2 * alone - p0) / (p1 - p0) if p1 > p0 else n1
            return {"mode": mode, "rtt_ms": rtt, "itl_p95_alone_ms": alone, "users_per_worker_at_2x": round(at, 1)}
    return {"mode": mode, "rtt_ms": rtt, "itl_p95_alone_ms": alone, "users_per_worker_at_2x": None}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in MODES:
        for rtt in sorted({r["rtt_ms"] for r in rows}):
            mine = sorted(
                (r for r in rows if r["mode"] == mode and r["rtt_ms"] == rtt), key=lambda r: r["users_per_worker"]
            )
            n = [r["users_per_worker"] for r in mine]
            label = f"{mode}, RTT {rtt:g} ms"
            style = "-" if mode == "specedge" else "--"
            left.plot(n, [r["itl_ms_p95"] for r in mine], style, marker="o", label=label)
            right.plot(n, [r["fleet_tokens_per_s"] / r["workers"] for r in mine], style, marker="o", label=label)
    left.set(xlabel="users per worker", ylabel="ITL p95 (ms)", title="Inter-token latency, p95", xscale="log")
    right.set(xlabel="users per worker", ylabel="tokens / s per worker", title="Throughput per worker", xscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="gemma")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[14.0, 50.0])
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
    parser.add_argument("--sweep-workers", type=int, default=4)
    parser.add_argument("--duration-s", type=float, default=40.0)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--slots", type=int, default=1024, help="KV slots per worker (sessions it can hold)")
    parser.add_argument("--max-batch", type=int, default=64, help="sessions in a pass at most (measured up to 64)")
    parser.add_argument("--skip-fleet", action="store_true", help="only the sweep")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    base = FleetConfig(
        workers=args.workers,
        users=args.users,
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        slots=args.slots,
        max_batch=args.max_batch,
    )
    fleet = [] if args.skip_fleet else fleet_rows(base, args.pair, args.rtt_ms)
    for row in fleet:
        print(_line(row))
    swept = sweep(base, args.pair, args.rtt_ms, args.sweep, args.sweep_workers) if args.sweep else []
    thresholds = [doubling(swept, mode, rtt) for rtt in args.rtt_ms for mode in MODES] if swept else []
    for found in thresholds:
        at = found["users_per_worker_at_2x"]
        workers = math.ceil(args.users / at) if at else None
        found["workers_for_users"] = workers
        print(
            f"{found['mode']:<15} RTT {found['rtt_ms']:g} ms: ITL p95 alone {found['itl_p95_alone_ms']:.1f} ms, "
            f"doubles at {at} users per worker -> {workers} workers for {args.users} users"
        )
    result = {
        "pair": PAIRS[args.pair].name,
        "measured": PAIRS[args.pair].source,
        "config": base.__dict__,
        "fleet": fleet,
        "sweep": swept,
        "doubling": thresholds,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot and swept:
        plot(swept, args.plot, f"{PAIRS[args.pair].name}: {args.sweep_workers} workers, simulated")
    if not args.json:
        print(json.dumps(result))


def _line(row: dict) -> str:
    return (
        f"{row['mode']:<15} RTT {row['rtt_ms']:>4g} ms  {row['users']} users / {row['workers']} workers: "
        f"{row['fleet_tokens_per_s']:8.0f} tok/s  server {row['server_throughput']:6.0f} tok/busy-s  "
        f"ITL p50 {row['itl_ms_p50']:5.1f} p95 {row['itl_ms_p95']:5.1f} ms  "
        f"{row['sessions_per_pass']:5.1f} sessions/pass  busy {row['busy_fraction']:.0%}  "
        f"balance (max/mean tokens) {row['worker_tokens_max_over_mean']:.3f}  "
        f"${row['usd_per_million_tokens_busy']:.2f}/Mtok busy, ${row['usd_per_million_tokens_rented']:.2f} rented"
    )


if __name__ == "__main__":
    main()

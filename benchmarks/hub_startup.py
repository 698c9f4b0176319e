"""Start-to-ready of `hub_server serve` (one in-process worker) for two source trees, alternated.

    .venv/bin/python benchmarks/hub_startup.py --model TARGET --tree main=/work/main --tree mine=. [--runs 4]
    .venv/bin/python benchmarks/hub_startup.py --model TARGET --tree old=/tmp/old --tree new=. \
        --runs 2 --serve-args "--compile on"    # a compiled hub: its first start, then restarts

Each run starts the hub from one tree (run from inside it, so that its own `hub_server` is the one
imported), waits for /health to answer 200 and stops it; the trees take turns, so a shared
machine's load falls on both alike. Each tree keeps one cache directory across its runs: its first
start fills it (converted weights, compiled passes), the later ones find it. Prints each run as
it ends, then each tree's first start and the median of the others.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import tempfile
import time
from pathlib import Path

from specedge_common.launcher import HubProcess

READY_TIMEOUT_S = 3600  # a compiled hub's first start on two busy cores: 7 to over 30 minutes


def start_to_ready_s(model: str, tree: Path, cache_dir: Path, serve_args: list[str], log: Path) -> float:
    started = time.perf_counter()
    args = ["--model", model, "--no-auth", "--cache-dir", str(cache_dir), *serve_args]
    hub = HubProcess(args, env={"PYTHONPATH": str(tree)}, cwd=tree, log_path=log)
    try:
        hub.wait_ready(READY_TIMEOUT_S)
        return time.perf_counter() - started
    finally:
        hub.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--serve-args", default="", help="more arguments for `hub_server serve`, one string")
    args = parser.parse_args()
    trees = {name: Path(path).resolve() for name, path in (item.split("=", 1) for item in args.tree)}
    model = str(Path(args.model).resolve())
    times: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(args.runs):
            for name, tree in trees.items():
                cache, log = Path(scratch) / name, Path(scratch) / f"{name}-{run}.log"
                seconds = start_to_ready_s(model, tree, cache, shlex.split(args.serve_args), log)
                times[name].append(seconds)
                print(f"{name} run {run + 1}: ready in {seconds:.1f} s", flush=True)
    for name, measured in times.items():
        later = measured[1:]
        median = f", later starts median {statistics.median(later):.1f} s" if later else ""
        print(f"{name}: first start {measured[0]:.1f} s{median} (each: {[round(t, 1) for t in measured]})")


if __name__ == "__main__":
    main()

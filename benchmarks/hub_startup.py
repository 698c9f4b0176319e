"""Start-to-ready of `hub_server serve` (one in-process worker) for two source trees, alternated.

    .venv/bin/python benchmarks/hub_startup.py --model TARGET --tree main=/work/main --tree mine=. [--runs 4]

Each run starts the hub from one tree (its PYTHONPATH), waits for /health to answer 200 and stops
it; the trees take turns, so a shared machine's load falls on both alike. Prints each tree's times
and median.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from specedge_common.launcher import HubProcess


def start_to_ready_s(model: str, tree: str, cache_dir: Path) -> float:
    started = time.perf_counter()
    hub = HubProcess(["--model", model, "--no-auth", "--cache-dir", str(cache_dir)], env={"PYTHONPATH": tree})
    try:
        hub.wait_ready(300)
        return time.perf_counter() - started
    finally:
        hub.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source tree")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.tree)
    times: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as cache:
        for _ in range(args.runs):
            for name, tree in trees.items():
                times[name].append(start_to_ready_s(args.model, str(Path(tree).resolve()), Path(cache)))
    for name, measured in times.items():
        rounded = [round(t, 1) for t in measured]
        print(f"{name}: start-to-ready s {rounded} median {statistics.median(measured):.2f}")


if __name__ == "__main__":
    main()

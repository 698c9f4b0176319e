"""What an idle hub with Ray workers costs: the CPU of its whole process tree over a window, and
the addresses its processes listen on.

    .venv/bin/python benchmarks/idle_hub.py --model FOLDER [--workers 2] [--window 30]

Starts `hub_server serve --workers N --device cpu --no-auth` on loopback, waits until it is ready
and a few seconds more, then reads /proc: each process of the tree (the front end, Ray's GCS,
raylet, agents and the engine workers) with its share of a core over the window, the total, and
every TCP address the tree listens on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specedge_common.launcher import HubProcess
from tests.test_ray_workers import cpu_seconds, listening_addresses, process_tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="target folder (benchmarks/dispatch_target.py builds one)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--window", type=float, default=30.0, help="seconds measured")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        serve = ["--model", args.model, "--workers", str(args.workers), "--device", "cpu", "--no-auth"]
        with HubProcess([*serve, "--cache-dir", cache], log_path=Path(cache) / "hub.log") as hub:
            hub.wait_ready(timeout_s=600)
            time.sleep(5)  # what start-up set going settles
            before = {pid: cpu_seconds(pid) for pid in process_tree(hub.pid)}
            time.sleep(args.window)
            tree = process_tree(hub.pid)
            total = 0.0
            for pid in tree:
                used = cpu_seconds(pid) - before.get(pid, 0.0)
                total += used
                name = Path(f"/proc/{pid}/comm").read_text().strip() if Path(f"/proc/{pid}/comm").exists() else "?"
                print(f"{pid:>8} {name:<18} {100 * used / args.window:5.1f}%")
            print(f"total {100 * total / args.window:.1f}% of a core over {args.window:g} s, {len(tree)} processes")
            print("listening on:", ", ".join(sorted(listening_addresses(tree))))


if __name__ == "__main__":
    main()

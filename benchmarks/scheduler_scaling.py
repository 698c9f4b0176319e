"""What a pass's scheduling costs the engine's loop as the sessions it holds grow.

    .venv/bin/python benchmarks/scheduler_scaling.py [--sessions 16 128 512 2048] [--tree OTHER ...]

Before every pass the scheduler asks whether a client session is due back soon enough to hold
the batch for it (the merge wait), and after it records each session's way back. A GPU hub holds
hundreds of sessions between their passes, so what these cost per pass, as sessions grow, is
engine-loop time no device work hides. This times one verify's whole trip through a scheduler
driven by hand (`worker=False`, as the fleet simulation drives it): `submit`, the decision
(`poll`), `finish`, with every other session on its way back and none due (the common case: a
session spends most of its time drafting). `--tree` also runs it on other checkouts (each with its
own `hub_server` on the path), side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRIPS = 3000


def microseconds_a_trip(sessions: int) -> float:
    """The median over 5 runs of TRIPS trips' mean, with `sessions` others away."""
    from hub_server.scheduler import Scheduler, Step

    now = [0.0]
    scheduler = Scheduler(lambda jobs: None, worker=False, clock=lambda: now[0], pass_fixed_s=lambda: 0.01)

    def trip(key: object, after_s: float, held: bool = False) -> None:
        now[0] += after_s
        scheduler.submit("job", key=key)
        while not isinstance(step := scheduler.poll(), Step):  # held for someone due: wait it out
            assert held and isinstance(step, float), "a measured trip must not be held: nobody is due"
            now[0] = step
        scheduler.finish()

    for key in range(sessions):  # each has come back once, slowly: due back 300 s after its pass
        trip(key, 0.0, held=True)
    now[0] += 300.0
    for key in range(sessions):
        trip(key, 0.0, held=True)
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(TRIPS):
            trip("measured", 0.001)
        runs.append((time.perf_counter() - started) / TRIPS * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[16, 128, 512, 2048])
    parser.add_argument("--tree", type=Path, action="append", default=[], help="another checkout to time too")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # in a tree's own interpreter
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({n: microseconds_a_trip(n) for n in args.sessions}))
        return
    print("tree".ljust(40) + "".join(f"{n:>10} sessions" for n in args.sessions) + "   (us a verify's trip)")
    for tree in [REPO, *args.tree]:
        env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
        sizes = [str(n) for n in args.sessions]
        command = [sys.executable, __file__, "--measure", "--sessions", *sizes]
        found = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True, check=True)
        figures = json.loads(found.stdout)
        print(str(tree)[:40].ljust(40) + "".join(f"{figures[str(n)]:>19.1f}" for n in args.sessions))


if __name__ == "__main__":
    main()

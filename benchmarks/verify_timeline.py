"""Where a verify's round trip goes, step by step: one verify at a time over the session stream,
with moments noted in the client, the front end and the engine process.

    .venv/bin/python benchmarks/verify_timeline.py [--target dispatch|MODEL] [--verifies 1000] [--json OUT]

Starts a hub on loopback as `verify_overhead.py` does (as it configures itself, `--no-auth`;
pinned to half the cores, this client to the rest) with `timeline_hooks/` on its PYTHONPATH:
there, as each process of the hub loads the hub's modules, a few of their functions are wrapped
to note when they start or end (`verify_timeline_marks.WRAPPED`; the product's code is not
changed). This client's stream is wrapped the same way. Then it sends `--verifies` verifies over
the stream, one at a time, and reads every process's moments on the machine's one monotonic
clock. For each verify, the moments between the client's send and its answer, in the order
they came, form its path; over the verifies whose path is the most common one, the median time
between each two moments. Everything but the pass is what the hub and its libraries add:
the hops between processes (the client and the front end over loopback TCP, the front end and
the engine over a Unix socket) and each process's own steps. Each wrapped call costs ~1 us.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOOKS = Path(__file__).resolve().parent / "timeline_hooks"
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(HOOKS)]

import verify_timeline_marks as marks  # noqa: E402
from verify_overhead import DRAFT, PROMPT, resolve  # noqa: E402

from specedge_bench.local_hub import split_cores  # noqa: E402
from specedge_bench.users import open_session  # noqa: E402
from specedge_cli.remote.client import HubClient  # noqa: E402
from specedge_cli.remote.stream import open_stream  # noqa: E402
from specedge_common.launcher import HubProcess  # noqa: E402

WARM_UP = 50
# Verifies after the counted ones, not counted: the hub's processes write their moments every
# FLUSH_EVERY moments, ~100 verifies (and lose the rest when stopped), so every counted verify's
# are written.
TAIL = 200
REOPEN_EVERY = 200  # verifies on one session: its context grows by up to 5 tokens a verify
FIRST, LAST = "client sends", "client has the answer"
PASS = ("engine pass begins", "engine pass ends")


def read_moments(folder: Path) -> list[tuple[int, str]]:
    moments = []
    for path in folder.glob("*.txt"):
        for line in path.read_text().splitlines():
            event, at = line.split("\t")
            moments.append((int(at), event))
    return sorted(moments)


def paths(moments: list[tuple[int, str]], since: int, until: int) -> list[list[tuple[int, str]]]:
    """Each verify's moments, its client's send to its answer, of the verifies sent in [since, until)."""
    found, current = [], None
    for at, event in moments:
        if event == FIRST and since <= at < until:
            current = [(at, event)]
        elif current is not None:
            current.append((at, event))
            if event == LAST:
                found.append(current)
                current = None
    return found


def steps(found: list[list[tuple[int, str]]]) -> tuple[int, list[tuple[str, str, float]], float]:
    """The most common path: how many verifies took it, the median us between each two of its
    moments, and the median round trip (us)."""
    shapes = collections.Counter(tuple(event for _, event in path) for path in found)
    shape, count = shapes.most_common(1)[0]
    alike = [path for path in found if tuple(event for _, event in path) == shape]
    medians = [
        (shape[k], shape[k + 1], statistics.median((path[k + 1][0] - path[k][0]) / 1000 for path in alike))
        for k in range(len(shape) - 1)
    ]
    return count, medians, statistics.median((path[-1][0] - path[0][0]) / 1000 for path in alike)


def verify(client: HubClient, verifies: int) -> tuple[int, int]:
    """WARM_UP verifies, then `verifies` counted, then TAIL more, one at a time over the stream (a
    new session every REOPEN_EVERY); returns when the counted ones began and ended."""
    info = client.info()
    since = until = 0
    for begun in range(0, WARM_UP + verifies + TAIL, REOPEN_EVERY):
        session = open_session(client, info)
        client.feed(session, PROMPT)
        stream = open_stream(client, session)
        for done in range(begun, min(begun + REOPEN_EVERY, WARM_UP + verifies + TAIL)):
            if done == WARM_UP:
                since = time.perf_counter_ns()
            if done == WARM_UP + verifies:
                until = time.perf_counter_ns()
            stream.verify([], DRAFT)
        stream.close()
        client.close_session(session)
    return since, until


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="dispatch", help="a model folder or GGUF; `dispatch`: the random Llama")
    parser.add_argument("--verifies", type=int, default=1000)
    parser.add_argument("--serve-arg", action="append", default=[], help="a flag for `hub_server serve` (repeat)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="specedge-timeline-"))
    os.environ["SPECEDGE_TIMELINE"] = str(folder)
    marks.install()  # this client's stream too (its module loaded already: wrapped now)

    hub_cores, client_cores = split_cores()
    python_path = os.pathsep.join([str(HOOKS), str(REPO)])
    hub = HubProcess(
        ["--model", resolve(args.target), "--no-auth", *args.serve_arg],
        cores=hub_cores,
        env={"PYTHONPATH": python_path},
        cwd=REPO,
    )
    try:
        if client_cores:
            os.sched_setaffinity(0, client_cores)
        hub.wait_ready(timeout_s=900)
        with HubClient(hub.url) as client:
            since, until = verify(client, args.verifies)
        marks.flush()
    finally:
        hub.stop(timeout_s=30)
    found = paths(read_moments(folder), since, until)
    shutil.rmtree(folder, ignore_errors=True)
    count, medians, trip = steps(found)
    pass_us = sum(us for start, end, us in medians if (start, end) == PASS)
    print(
        f"{count} of {len(found)} verifies took the most common path; "
        f"round trip p50 {trip / 1000:.3f} ms, pass {pass_us / 1000:.3f} ms"
    )
    for start, end, us in medians:
        print(f"{us:9.1f} us  {start} -> {end}")
    print(f"{trip - pass_us:9.1f} us  all but the pass (round trip p50 - pass p50)")
    if args.json:
        steps_out = [{"from": start, "to": end, "us": round(us, 1)} for start, end, us in medians]
        args.json.write_text(json.dumps({"verifies": count, "round_trip_us": trip, "steps": steps_out}, indent=1))


if __name__ == "__main__":
    main()

"""Overhead per verify, one at a time: HTTP and the session stream side by side in one run.

    .venv/bin/python benchmarks/verify_overhead.py [--target dispatch|MODEL] [--rounds 600] [--json OUT]

Starts a hub on loopback as it configures itself (`--no-auth` only; `--serve-arg` adds flags),
pinned to half the cores and this client to the other half, and opens one session per way of
sending a verify:
- `http`: the standard library's http.client on one keep-alive connection (the hub's own cost,
  with the least a client can add);
- `http (specedge)`: the specedge client over HTTP (`HubClient.verify`, httpx);
- `stream (specedge)`: the specedge client over the session's stream (`SessionStream.verify`).
The ways take turns in blocks of `PASS_BLOCK` verifies, one at a time (so all three meet the same
machine), the hub's device busy time read from /metrics before and after each block: nothing else
uses the hub, so the time gained over a block is its passes. (A read after each verify would slow
the next verify's pass and its overhead by about a third here: its work leaves the hub's processes
cold.) Overhead = round trip - pass: everything the hub and the client add (framing, parsing,
checks, the hand-off to the scheduler and back, the reply).
The reply's `verify_ms` (the hub's verify call) splits it: around the pass (queueing, hops,
applying the result; a block's mean) and outside the call (HTTP or the stream, routing, the client,
loopback; each verify's own).
The sessions are reopened every 200 verifies of a way so that their contexts stay short.

Then the hub's CPU time per verify of each way, in its front end (the way a verify arrives and
leaves: HTTP or the stream) and in its engine process (the same work for every way, the pass
included), in blocks of verifies of one way at a time, the ways taking turns: figures a loaded
machine inflates far less than a round trip, and the ones that bound a hub's verifies per CPU-second.

Last, the floor (`stream_floor.py`): the same three processes with the hub's libraries and none of
its logic, around a pass as long as the stream's measured one: what any stream on these libraries
would add here (`--floor-verifies 0` leaves it out).

The default target is the dispatch-bound random Llama (`benchmarks/dispatch_target.py`): its
pass costs what launching its operators costs, as a small target's pass on a GPU does.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from stream_floor import floor_overhead  # noqa: E402

from specedge_bench.local_hub import split_cores  # noqa: E402
from specedge_bench.metrics import MetricsPage  # noqa: E402
from specedge_bench.users import open_session  # noqa: E402
from specedge_cli.remote import protocol as wire  # noqa: E402
from specedge_cli.remote.client import HubClient  # noqa: E402
from specedge_cli.remote.stream import SessionStream, open_stream  # noqa: E402
from specedge_common import metric_names as names  # noqa: E402
from specedge_common.launcher import HubProcess  # noqa: E402
from tests.test_ray_workers import cpu_seconds, is_engine, process_tree  # noqa: E402

PROMPT = [1, 300, 301, 302]
DRAFT = [5, 6, 7, 8]
REOPEN_EVERY = 200  # verifies of each way: contexts grow by up to 5 tokens a verify
PASS_BLOCK = 20  # verifies of one way between two readings of the device's busy time
CPU_BLOCK = 100  # verifies of one way between two readings of the hub's CPU time (ticks of 10 ms)
WAYS = ("http", "http (specedge)", "stream (specedge)")


def resolve(target: str) -> str:
    if target != "dispatch":
        return target
    from dispatch_target import build_dispatch_target

    return str(build_dispatch_target(Path(tempfile.gettempdir()) / "specedge-bench-targets"))


class RawHttp:
    """Verifies through http.client on one keep-alive connection; also reads /metrics."""

    def __init__(self, url: str):
        address = urlsplit(url)
        self.connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port)

    def verify(self, session: str) -> float:
        """The reply's verify_ms."""
        body = json.dumps({"tokens": [], "draft": DRAFT}).encode()
        headers = {"Content-Type": "application/json"}
        self.connection.request("POST", f"/v1/sessions/{session}/verify", body=body, headers=headers)
        response = self.connection.getresponse()
        reply = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"verify answered {response.status}: {reply}")
        return reply["verify_ms"]

    def device_busy_ms(self) -> float:
        self.connection.request("GET", "/metrics")
        page = MetricsPage.parse(self.connection.getresponse().read().decode())
        if not page.has(names.DEVICE_BUSY_SECONDS):
            raise RuntimeError("the hub's /metrics has no device busy time")
        return page.value(names.DEVICE_BUSY_SECONDS) * 1000


class Ways:
    """One session per way of sending a verify; each way a call that verifies once on its session."""

    def __init__(self, url: str, client: HubClient):
        self.client, self.raw, self.info = client, RawHttp(url), client.info()
        self.sessions: dict[str, str] = {}
        self.stream: SessionStream | None = None

    def reopen(self) -> None:
        for session in self.sessions.values():
            self.client.close_session(session)
        if self.stream is not None:
            self.stream.close()
        self.sessions = {way: open_session(self.client, self.info) for way in WAYS}
        for session in self.sessions.values():
            self.client.feed(session, PROMPT)
        self.stream = open_stream(self.client, self.sessions["stream (specedge)"])

    def calls(self) -> dict[str, Callable[[], float]]:
        stream, sessions = self.stream, self.sessions
        assert stream is not None
        return {
            "http": lambda: self.raw.verify(sessions["http"]),
            "http (specedge)": lambda: self.client.verify(sessions["http (specedge)"], [], DRAFT).verify_ms,
            "stream (specedge)": lambda: stream.verify([], DRAFT).verify_ms,
        }


def measure(ways: Ways, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per way and verify: its round trip, the hub's verify_ms, and its block's means of the pass
    (device ms) and of the time around it (verify_ms - pass: exact over a block, as a verify's
    pass is not)."""
    figures: dict[str, dict[str, list[float]]] = {
        way: {"trip": [], "call": [], "pass": [], "around": []} for way in WAYS
    }
    for block in range(max(1, rounds // PASS_BLOCK)):
        if block * PASS_BLOCK % REOPEN_EVERY == 0:
            ways.reopen()
        for way, call in ways.calls().items():
            busy, calls = ways.raw.device_busy_ms(), []
            for _ in range(PASS_BLOCK):
                started = time.perf_counter()
                calls.append(call())
                figures[way]["trip"].append((time.perf_counter() - started) * 1000)
            forward = (ways.raw.device_busy_ms() - busy) / PASS_BLOCK
            figures[way]["call"] += calls
            figures[way]["pass"] += [forward] * PASS_BLOCK
            figures[way]["around"] += [statistics.fmean(calls) - forward] * PASS_BLOCK
    return figures


def hub_cpu_ms(ways: Ways, hub_pid: int, rounds: int) -> dict[str, tuple[float, float]]:
    """Per way: the CPU milliseconds per verify of the hub's front end and of its engine process,
    over about `rounds` verifies of it."""
    used = {way: [0.0, 0.0] for way in WAYS}
    counted = dict.fromkeys(WAYS, 0)
    for block in range(max(1, rounds // CPU_BLOCK)):
        if block * CPU_BLOCK % REOPEN_EVERY == 0:
            ways.reopen()
        for way, call in ways.calls().items():
            before = tree_cpu_s(hub_pid)
            for _ in range(CPU_BLOCK):
                call()
            after = tree_cpu_s(hub_pid)
            used[way] = [total + (now - then) * 1000 for total, now, then in zip(used[way], after, before)]
            counted[way] += CPU_BLOCK
    return {way: (used[way][0] / counted[way], used[way][1] / counted[way]) for way in WAYS}


def tree_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of the hub's front end (every process but the engine's) and of its engine process."""
    front_end = engine = 0.0
    for child in process_tree(pid):
        try:
            in_engine = is_engine(child)
        except OSError:  # a process that ended meanwhile
            continue
        if in_engine:
            engine += cpu_seconds(child)
        else:
            front_end += cpu_seconds(child)
    return front_end, engine


def percentile(values: list[float], share: float) -> float:
    return sorted(values)[int(share * (len(values) - 1))]


def summary(figures: dict[str, list[float]], cpu_ms: tuple[float, float]) -> dict[str, float]:
    trips, calls, passes, around = figures["trip"], figures["call"], figures["pass"], figures["around"]
    # Outside the call, each verify's own; around the pass, its block's.
    overheads = [trip - call + near for trip, call, near in zip(trips, calls, around)]
    return {
        "verifies": len(trips),
        "round_trip_p50_ms": statistics.median(trips),
        "pass_p50_ms": statistics.median(passes),
        "overhead_p50_ms": statistics.median(overheads),
        "overhead_p95_ms": percentile(overheads, 0.95),
        "around_the_pass_p50_ms": statistics.median(around),
        "outside_the_call_p50_ms": statistics.median([trip - call for trip, call in zip(trips, calls)]),
        "front_end_cpu_ms_per_verify": cpu_ms[0],
        "engine_cpu_ms_per_verify": cpu_ms[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="dispatch", help="a model folder or GGUF; `dispatch`: the random Llama")
    parser.add_argument("--rounds", type=int, default=600, help="verifies of each way")
    parser.add_argument("--serve-arg", action="append", default=[], help="a flag for `hub_server serve` (repeat)")
    parser.add_argument("--floor-verifies", type=int, default=2000, help="verifies of the floor (0: none)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    hub_cores, client_cores = split_cores()
    load_before = os.getloadavg()[0]
    hub = HubProcess(["--model", resolve(args.target), "--no-auth", *args.serve_arg], cores=hub_cores)
    try:
        if client_cores:
            os.sched_setaffinity(0, client_cores)
        hub.wait_ready(timeout_s=900)
        with HubClient(hub.url) as client:
            ways = Ways(hub.url, client)
            if client.info().protocol_version < wire.PROTOCOL_VERSION:
                raise SystemExit("this hub offers no session stream")
            measure(ways, 20)  # warm-up, not counted
            figures = measure(ways, args.rounds)
            cpu_ms = hub_cpu_ms(ways, hub.pid, args.rounds)
    finally:
        hub.stop(timeout_s=30)
    results = {way: summary(figures[way], cpu_ms[way]) for way in WAYS}
    stream = results["stream (specedge)"]
    if args.floor_verifies:
        stream["floor_overhead_p50_ms"] = floor_overhead(
            stream["pass_p50_ms"], args.floor_verifies, hub_cores, client_cores
        )
    for way, result in results.items():
        print(
            f"{way:>18}: round trip p50 {result['round_trip_p50_ms']:.3f} ms, pass p50 {result['pass_p50_ms']:.3f} ms, "
            f"overhead p50 {result['overhead_p50_ms']:.3f} ms p95 {result['overhead_p95_ms']:.3f} ms "
            f"(around the pass {result['around_the_pass_p50_ms']:.3f}, outside the call "
            f"{result['outside_the_call_p50_ms']:.3f}); CPU a verify: front end "
            f"{result['front_end_cpu_ms_per_verify']:.3f} ms, engine {result['engine_cpu_ms_per_verify']:.3f} ms"
        )
    if "floor_overhead_p50_ms" in stream:
        print(
            f"{'stream floor':>18}: overhead p50 {stream['floor_overhead_p50_ms']:.3f} ms around a "
            f"{stream['pass_p50_ms']:.3f} ms pass (the hub's libraries, none of its logic: stream_floor.py)"
        )
    load = f"{load_before:.1f}-{os.getloadavg()[0]:.1f}"  # on a loaded machine only the ratios mean much
    print(f"load average {load}")
    if args.json:
        run = {"target": args.target, "serve_args": args.serve_arg, "commit": commit(), "load": load}
        args.json.write_text(json.dumps({**run, **results}, indent=1) + "\n")


def commit() -> str:
    """The commit the measured tree is at (a tree outside git: unknown)."""
    try:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return found.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()

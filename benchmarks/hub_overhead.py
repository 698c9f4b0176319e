"""Hub overhead per verify (HTTP, scheduling, serialisation: everything but the forward pass).

    .venv/bin/python benchmarks/hub_overhead.py --target MODEL_DIR_OR_GGUF --draft DRAFT.gguf [--sessions 64] [--rounds 5] [--workers 2]

Starts a hub on loopback with the serving defaults (`--max-batch 16`, `--batch-wait-ms 2`),
pinned to half the cores and this client to the other half; opens N sessions with a short prompt
each, then sends verifies one at a time round-robin (so nothing queues). After each verify it
reads the hub's device busy time from /metrics (everything the runner does holding the device:
the pass, masks, KV writes), so each verify's forward time is its own, not an average; overhead =
round trip - forward time holds everything else: HTTP both ways, parsing, checks, the hand-off to
the scheduler and back, serialisation, metrics and logging. The reply's own `verify_ms` (the
hub's verify call, from its checks to the applied result) splits that in two: around the pass
(queueing, thread hops, applying the result) and outside the call (HTTP, routing, middleware,
the client, loopback). The timed requests go through the
standard library's http.client on one keep-alive connection, so the client's own cost is small
(and counted as overhead all the same).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
from urllib.parse import urlsplit

from specedge_bench.local_hub import LocalHub
from specedge_bench.metrics import MetricsPage
from specedge_bench.users import open_session
from specedge_cli.remote.client import HubClient
from specedge_common import metric_names as names

SERVE_DEFAULT_MAX_BATCH = 16


def open_sessions(client: HubClient, count: int) -> list[str]:
    """`count` sessions, each holding a short prompt."""
    info = client.info()
    sessions = []
    for _ in range(count):
        session = open_session(client, info)
        client.feed(session, [1, 300, 301, 302])
        sessions.append(session)
    return sessions


class Probe:
    """One keep-alive connection to the hub: timed verifies, untimed reads of its device time."""

    def __init__(self, url: str):
        address = urlsplit(url)
        self.connection = http.client.HTTPConnection(address.hostname, address.port)

    def verify_ms(self, session: str, body: bytes) -> tuple[float, float]:
        """The round trip, and the time the hub's verify call took inside it (its `verify_ms`)."""
        started = time.perf_counter()
        self.connection.request(
            "POST", f"/v1/sessions/{session}/verify", body=body, headers={"Content-Type": "application/json"}
        )
        response = self.connection.getresponse()
        reply = json.loads(response.read())
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200:
            raise RuntimeError(f"verify answered {response.status}: {reply}")
        return elapsed, reply["verify_ms"]

    def device_busy_ms(self) -> float:
        return self.metrics().value(names.DEVICE_BUSY_SECONDS) * 1000

    def metrics(self) -> MetricsPage:
        self.connection.request("GET", "/metrics")
        page = MetricsPage.parse(self.connection.getresponse().read().decode())
        if not page.has(names.DEVICE_BUSY_SECONDS):
            raise RuntimeError("the hub's /metrics has no device busy time")
        return page


def measure(url: str, sessions: list[str], rounds: int) -> tuple[list[float], list[float], list[float], float]:
    """Round trip, time in the hub's verify call and device time (ms) of each of `rounds` verifies
    per session, one at a time; and how many batches the scheduler held meanwhile (merge waits:
    there should be none, since no other user is due back while one verify is out)."""
    probe = Probe(url)
    held = probe.metrics().value(names.MERGE_WAITS)
    body = json.dumps({"tokens": [], "draft": [5, 6, 7, 8]}).encode()
    round_trips, in_hub, forwards = [], [], []
    busy = probe.device_busy_ms()
    for _ in range(rounds):
        for session in sessions:
            trip, hub = probe.verify_ms(session, body)
            round_trips.append(trip)
            in_hub.append(hub)
            # Nothing else uses the hub, so the device time gained is this verify's own.
            busy, before = probe.device_busy_ms(), busy
            forwards.append(busy - before)
    held = probe.metrics().value(names.MERGE_WAITS) - held
    probe.connection.close()
    return round_trips, in_hub, forwards, held


def percentile(values: list[float], share: float) -> float:
    return sorted(values)[int(share * (len(values) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True, help="any .gguf of the target's family (the local hub loads it)")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1, help="engine workers (more than one: on Ray)")
    args = parser.parse_args()
    serve_args = ("--workers", str(args.workers))
    with (
        LocalHub.maybe(
            args.target, args.draft, "auto", max_batch=SERVE_DEFAULT_MAX_BATCH, serve_args=serve_args
        ) as hub,
        HubClient(hub.url) as client,
    ):
        sessions = open_sessions(client, args.sessions)
        measure(hub.url, sessions[:4], 2)  # warm-up, not counted
        round_trips, in_hub, forwards, held = measure(hub.url, sessions, args.rounds)
    overheads = [trip - forward for trip, forward in zip(round_trips, forwards)]
    # Where the overhead is: around the pass inside the hub's verify call (queueing, the hops to
    # the scheduler's thread and back, applying the result), or outside that call (HTTP both ways,
    # routing, checks, serialisation, the access log, the client and loopback).
    around_pass = [hub - forward for hub, forward in zip(in_hub, forwards)]
    outside_call = [trip - hub for trip, hub in zip(round_trips, in_hub)]
    print(
        f"workers={args.workers} sessions={args.sessions} verifies={len(round_trips)} "
        f"round trip p50={statistics.median(round_trips):.2f} ms p95={percentile(round_trips, 0.95):.2f} ms "
        f"forward p50={statistics.median(forwards):.2f} ms "
        f"overhead p50={statistics.median(overheads):.2f} ms p95={percentile(overheads, 0.95):.2f} ms "
        f"(around the pass p50={statistics.median(around_pass):.2f} ms, "
        f"outside the verify call p50={statistics.median(outside_call):.2f} ms) merge waits={held:g}"
    )


if __name__ == "__main__":
    main()

"""Hub overhead per verify (HTTP, scheduling, serialisation: everything but the forward pass).

    .venv/bin/python benchmarks/hub_overhead.py --target MODEL_DIR_OR_GGUF [--sessions 64] [--rounds 5]

Starts a hub on loopback, opens N sessions with a short prompt each, then sends verifies one at a
time round-robin (so nothing queues) and compares the client's round trip with the device time
the hub's /metrics reports for those passes. Prints p50/p95 round trip, mean forward time, and
the overhead at p50 = p50 round trip - mean forward time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from hub_server.bench import _scrape
from hub_server.local_hub import LocalHub


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True, help="any .gguf of the target's family (the local hub loads it)")
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with LocalHub.maybe(args.target, args.draft, "auto", max_batch=1) as hub, httpx.Client(base_url=hub.url) as http:
        info = http.get("/v1/info").json()
        sessions = []
        for _ in range(args.sessions):
            body = {"protocol_version": info["protocol_version"], "vocab_size": info["vocab_size"],
                    "vocab_fingerprint": info["vocab_fingerprint"]}
            session = http.post("/v1/sessions", json=body).json()["session_id"]
            http.post(f"/v1/sessions/{session}/feed", json={"tokens": [1, 300, 301, 302]})
            sessions.append(session)
        before = _scrape(http)
        latencies = []
        for _ in range(args.rounds):
            for session in sessions:
                started = time.perf_counter()
                http.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": [5, 6, 7, 8]}).raise_for_status()
                latencies.append((time.perf_counter() - started) * 1000)
        after = _scrape(http)
    forward_ms = 1000 * (after["specedge_device_busy_seconds_total"] - before["specedge_device_busy_seconds_total"]) / len(latencies)
    p50 = statistics.median(latencies)
    p95 = sorted(latencies)[int(0.95 * (len(latencies) - 1))]
    print(f"sessions={args.sessions} verifies={len(latencies)} round trip p50={p50:.2f} ms p95={p95:.2f} ms "
          f"forward mean={forward_ms:.2f} ms overhead p50={p50 - forward_ms:.2f} ms")


if __name__ == "__main__":
    main()

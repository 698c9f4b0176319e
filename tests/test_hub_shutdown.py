"""SIGTERM: the hub stops taking connections, lets the request in flight finish, and exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from hub_server.protocol import PROTOCOL_VERSION
from tests.conftest import RunningHub


def test_sigterm_finishes_in_flight_requests_and_exits_0(tiny, tmp_path):
    # Time enough for the whole reply on a loaded machine (it took 60 s with 20 processes on 2 cores).
    hub = RunningHub(tiny.hf_dir, tmp_path, "--shutdown-timeout", "300")
    with httpx.Client(base_url=hub.url, timeout=300) as client:
        info = client.get("/v1/info").json()
        session = client.post(
            "/v1/sessions",
            json={
                "protocol_version": PROTOCOL_VERSION,
                "vocab_size": info["vocab_size"],
                "vocab_fingerprint": info["vocab_fingerprint"],
            },
        ).json()["session_id"]
        chunks: list[dict] = []
        first_chunk = threading.Event()

        def stream_a_long_reply() -> None:
            body = {"tokens": [1, 20, 30], "max_tokens": info["max_context"] - 8}
            with client.stream("POST", f"/v1/sessions/{session}/generate", json=body) as response:
                for line in response.iter_lines():
                    chunks.append(json.loads(line))
                    first_chunk.set()

        reader = threading.Thread(target=stream_a_long_reply)
        reader.start()
        assert first_chunk.wait(30)
        hub.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # uvicorn closes its listening socket at once
        still_streaming = not chunks[-1]["done"]
        try:
            httpx.get(f"{hub.url}/health", timeout=2)
            refused = False
        except httpx.TransportError:
            refused = True
        reader.join(300)
    assert refused, "the hub still took new connections after SIGTERM"
    assert still_streaming, "the reply finished before the signal could interrupt it; make it longer"
    assert chunks[-1]["done"] and sum(len(c["tokens"]) for c in chunks) == info["max_context"] - 8
    assert hub.process.wait(timeout=300) == 0, hub.log.read_text()

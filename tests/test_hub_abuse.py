"""No user can hang, stall or starve a hub: many requests on one session, a dropped stream,
oversized headers, refused requests against the token budget, an accounts file replaced under a
running hub, a stop while requests wait. Real hubs on loopback, real sockets, real SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import threading
import time

import httpx
import pytest

from hub_server.protocol import PROTOCOL_VERSION
from tests.conftest import AuthHub, RunningHub, hub_admin


def open_session(client: httpx.Client) -> str:
    info = client.get("/v1/info").json()
    body = {
        "protocol_version": PROTOCOL_VERSION,
        "vocab_size": info["vocab_size"],
        "vocab_fingerprint": info["vocab_fingerprint"],
    }
    answer = client.post("/v1/sessions", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["session_id"]


def health_within(url: str, seconds: float) -> float:
    """How long /health took; fails past `seconds`."""
    started = time.perf_counter()
    answer = httpx.get(f"{url}/health", timeout=seconds)
    assert answer.status_code == 200
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def busy_hub(tiny, tmp_path_factory):
    running = RunningHub(tiny.hf_dir, tmp_path_factory.mktemp("busy-hub"))
    yield running
    running.stop()


async def _flood(url: str, session: str, verifies: int, generations: int, max_tokens: int = 20) -> list[int]:
    """Many requests on one session at once; their statuses."""
    limits = httpx.Limits(max_connections=verifies + generations + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def verify() -> int:
            answer = await client.post(f"/v1/sessions/{session}/verify", json={"tokens": [3], "draft": [4, 5]})
            return answer.status_code

        async def generate() -> int:
            body = {"tokens": [6], "max_tokens": max_tokens}
            async with client.stream("POST", f"/v1/sessions/{session}/generate", json=body) as answer:
                await answer.aread()
                return answer.status_code

        jobs = [verify() for _ in range(verifies)] + [generate() for _ in range(generations)]
        return list(await asyncio.gather(*jobs))


def test_a_hundred_verifies_and_forty_generations_on_one_session_leave_the_hub_serving(busy_hub):
    with httpx.Client(base_url=busy_hub.url, timeout=60) as client:
        session = open_session(client)
        assert client.post(f"/v1/sessions/{session}/feed", json={"tokens": [1, 2]}).status_code == 200
        statuses: list[int] = []
        flood = threading.Thread(target=lambda: statuses.extend(asyncio.run(_flood(busy_hub.url, session, 100, 40))))
        flood.start()
        time.sleep(0.5)  # they are all in (or waiting) now
        slowest = max(health_within(busy_hub.url, 1.0) for _ in range(5))
        other = open_session(client)  # another user of the hub is served meanwhile
        answer = client.post(f"/v1/sessions/{other}/verify", json={"tokens": [1, 2], "draft": [3]})
        assert answer.status_code == 200, answer.text
        flood.join(120)
        assert not flood.is_alive()
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 1, statuses
        # The session itself still serves its user once the flood is over.
        again = client.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": [7]})
        assert again.status_code == 200, again.text
        busy = client.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": []})
        assert busy.status_code == 200
    assert slowest < 1.0


def test_a_session_answers_within_a_second_after_its_stream_is_dropped(busy_hub, tiny):
    with httpx.Client(base_url=busy_hub.url, timeout=30) as client:
        session = open_session(client)
    host, port = busy_hub.url.removeprefix("http://").split(":")
    body = json.dumps({"tokens": [1, 2, 3], "max_tokens": 900}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(
            f"POST /v1/sessions/{session}/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"\n{") < 5:  # a few chunks in
            received += raw.recv(4096)
    started = time.perf_counter()
    with httpx.Client(base_url=busy_hub.url, timeout=10) as client:
        answer = client.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": [9]})
        assert answer.status_code == 200, answer.text
        assert time.perf_counter() - started < 1.0
        closed = client.delete(f"/v1/sessions/{session}")
        assert closed.status_code == 204


def test_a_huge_header_is_refused_431_without_stalling_others(busy_hub):
    host, port = busy_hub.url.removeprefix("http://").split(":")
    value = b"a" * (150 << 20)
    timings: list[float] = []
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sender = threading.Thread(target=lambda: _send_until_closed(raw, value))
        sender.start()
        for _ in range(5):
            timings.append(health_within(busy_hub.url, 1.0))
        sender.join(60)
        answer = raw.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert max(timings) < 0.1, timings


def _send_until_closed(raw: socket.socket, data: bytes) -> None:
    try:
        raw.sendall(data)
    except OSError:  # the hub closed the connection: what it answered is still to be read
        pass


def test_refused_requests_cost_the_user_no_tokens(tiny, tmp_path):
    hub = AuthHub(tiny.hf_dir, tmp_path, ("ada",), "--tokens-per-minute", "60")
    try:
        with hub.client("ada") as ada:
            session = open_session(ada)
            max_context = ada.get("/v1/info").json()["max_context"]
            refused = [
                ada.post(f"/v1/sessions/{session}/generate", json={"tokens": [1], "max_tokens": 65536}),
                ada.post(f"/v1/sessions/{session}/verify", json={"tokens": [1] * (max_context + 5), "draft": []}),
                ada.post(f"/v1/sessions/{session}/feed", json={"tokens": [1] * (max_context + 5)}),
                ada.post(f"/v1/sessions/{session}/verify", json={"tokens": [10**9], "draft": []}),
            ]
            assert [answer.status_code for answer in refused] == [422, 422, 422, 422], [a.text for a in refused]
            assert ada.get("/v1/whoami").json()["tokens_left"] == 60
            assert ada.post(f"/v1/sessions/{session}/verify", json={"tokens": [1, 2], "draft": [3]}).status_code == 200
            assert ada.get("/v1/whoami").json()["tokens_left"] <= 57  # 2 sent, 1 drafted, 1 bonus (and a refill)
    finally:
        hub.stop()


def test_a_replaced_accounts_file_is_read_again_by_the_running_hub(tiny, tmp_path):
    hub = AuthHub(tiny.hf_dir, tmp_path, ("ada", "bob"))
    try:
        path = hub.data_dir / "accounts.sqlite3"
        backup = tmp_path / "backup.sqlite3"
        shutil.copy(path, backup)  # taken while nothing writes: whole
        replacement = path.with_suffix(".new")
        shutil.copy(backup, replacement)
        os.replace(replacement, path)  # restored by `mv`
        with hub.client("ada") as ada, hub.client("bob") as bob:
            assert ada.get("/v1/whoami").status_code == 200
            token_id = hub_admin(hub.data_dir, "tokens", "list", "--user", "bob")[0]["token_id"]
            hub_admin(hub.data_dir, "tokens", "revoke", token_id)
            assert _status_within(bob, 401, 3.0), "a revocation in the restored file was ignored"
            path.unlink()
            assert _status_within(ada, 503, 3.0)
            shutil.copy(backup, replacement)
            os.replace(replacement, path)  # deleted, then restored: served again without a restart
            assert _status_within(ada, 200, 3.0)
    finally:
        hub.stop()


def _status_within(client: httpx.Client, status: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client.get("/v1/whoami").status_code == status:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_ends_a_hub_within_its_shutdown_timeout_while_requests_wait_on_a_session(tiny, tmp_path):
    hub = RunningHub(tiny.hf_dir, tmp_path, "--shutdown-timeout", "2")
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        session = open_session(client)
    flood = threading.Thread(target=lambda: _flood_quietly(hub.url, session))
    flood.start()
    time.sleep(1.0)
    stopped_at = time.monotonic()
    hub.process.send_signal(signal.SIGTERM)
    hub.process.wait(timeout=2 + 10)
    assert time.monotonic() - stopped_at < 2 + 8
    flood.join(30)


def _flood_quietly(url: str, session: str) -> None:
    try:
        asyncio.run(_flood(url, session, 0, 40, max_tokens=900))
    except httpx.HTTPError:  # the hub went away mid-flood: expected
        pass

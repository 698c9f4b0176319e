"""The faults a week of attacks found, each mended: a damaged accounts database, slow clients,
undeclared answers, a shutdown that cuts replies, tokens that never expire, /metrics for everyone.
Real hubs on loopback, real SQLite files, real sockets."""

from __future__ import annotations

import json
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from hub_server.protocol import PROTOCOL_VERSION
from tests.conftest import REPO, AuthHub, RunningHub, hub_admin

PAGE = 4096


def open_body(info: dict, **sampling) -> dict:
    return {
        "protocol_version": PROTOCOL_VERSION,
        "vocab_size": info["vocab_size"],
        "vocab_fingerprint": info["vocab_fingerprint"],
        **({"sampling": sampling} if sampling else {}),
    }


def make_accounts(data_dir: Path) -> Path:
    """An accounts database with a few users and tokens, made by the admin commands."""
    for name in ("ada", "bob", "cy"):
        hub_admin(data_dir, "users", "add", name)
        hub_admin(data_dir, "tokens", "create", "--user", name)
    return data_dir / "accounts.sqlite3"


def root_page(path: Path, name: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
    finally:
        db.close()


def scribble(path: Path, page: int) -> None:
    """Random bytes over one page of the file, as a failing disk or a stray write would leave it."""
    data = bytearray(path.read_bytes())
    data[(page - 1) * PAGE : page * PAGE] = random.Random(page).randbytes(PAGE)
    path.write_bytes(bytes(data))


def damage(path: Path, how: str) -> None:
    if how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("these are not the accounts you are looking for\n" * 200)
    else:  # a b-tree's page: the token index, the users table, the tokens table
        scribble(path, root_page(path, how))


DAMAGES = ["sqlite_autoindex_tokens_2", "users", "tokens", "empty", "text"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_accounts_database_stops_serve_with_one_line(tiny, tmp_path, how):
    path = make_accounts(tmp_path / "data")
    damage(path, how)
    damaged = path.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "hub_server", "serve", "--model", str(tiny.hf_dir), "--data-dir", str(path.parent)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "is damaged" in lines[0] and "restore it from a backup" in lines[0] and "move it aside" in lines[0]
    listed = subprocess.run(
        [sys.executable, "-m", "hub_server", "users", "list", "--data-dir", str(path.parent)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 1 and listed.stderr.strip().splitlines() == lines
    assert path.read_bytes() == damaged  # left as found, for whoever restores it


def test_accounts_damaged_under_a_running_hub_answer_503_not_500(tiny, tmp_path):
    hub = AuthHub(tiny.hf_dir, tmp_path, ("ada",))
    try:
        path = hub.data_dir / "accounts.sqlite3"
        with hub.client("ada") as ada:
            assert ada.get("/v1/whoami").status_code == 200
            scribble(path, root_page(path, "sqlite_autoindex_tokens_2"))
            # Another process writes: the hub's connection drops its cached pages and reads the damage.
            writer = sqlite3.connect(path)
            writer.execute("INSERT INTO migrations VALUES ('unrelated-write', 'now')")
            writer.commit()
            writer.close()
            answer = ada.get("/v1/whoami")
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "accounts_unavailable" and "restore" in error["message"]
            assert int(answer.headers["Retry-After"]) > 0
            assert ada.get("/health").status_code == 200
    finally:
        hub.stop()
    assert "Traceback" not in hub.log.read_text()


# --- slow clients ---------------------------------------------------------------------


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the hub closed the connection within `seconds`, and what it said first."""
    sock.settimeout(seconds)
    said = b""
    try:
        while chunk := sock.recv(4096):
            said += chunk
    except TimeoutError:
        return False, said
    except ConnectionResetError:
        pass
    return True, said


def test_slow_requests_are_closed_and_connections_capped(tiny, tmp_path):
    hub = RunningHub(tiny.hf_dir, tmp_path, "--request-timeout-s", "2", "--max-connections", "12")
    try:
        trickling_headers = [_connect(hub.url) for _ in range(4)]
        for sock in trickling_headers:
            sock.sendall(b"GET /v1/info HTTP/1.1\r\nHost: hub\r\nX-Slow: ")
        trickling_bodies = [_connect(hub.url) for _ in range(4)]
        for sock in trickling_bodies:
            sock.sendall(
                b"POST /v1/sessions HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"prot'
            )
        silent = [_connect(hub.url) for _ in range(3)]
        time.sleep(0.3)
        # 11 connections open; the 12th is allowed, the 13th is refused at once.
        allowed, refused = _connect(hub.url), _connect(hub.url)
        closed, said = _closed_within(refused, 2)
        assert closed and said.startswith(b"HTTP/1.1 503") and b"hub_full" in said
        allowed.close()
        started = time.monotonic()
        for sock in trickling_headers:
            closed, said = _closed_within(sock, 5)
            assert closed and said.startswith(b"HTTP/1.1 408") and b"request_timeout" in said
        for sock in trickling_bodies + silent:
            assert _closed_within(sock, 5)[0]
        assert time.monotonic() - started < 5
        # A client that sends its request whole is served as ever, and a long answer is not cut.
        with httpx.Client(base_url=hub.url, timeout=30) as client:
            info = client.get("/v1/info").json()
            session = client.post("/v1/sessions", json=open_body(info)).json()["session_id"]
            body = {"tokens": [1, 20, 30], "max_tokens": 40}
            with client.stream("POST", f"/v1/sessions/{session}/generate", json=body) as stream:
                chunks = []
                for line in stream.iter_lines():
                    chunks.append(json.loads(line))
                    time.sleep(0.1)  # read slowly: 40 tokens take longer than the request timeout
            assert chunks[-1]["done"] and sum(len(c["tokens"]) for c in chunks) == 40
            assert _metric(client, 'specedge_refusals_total{code="request_timeout"}') >= 4
            assert _metric(client, 'specedge_refusals_total{code="hub_full"}') >= 1
    finally:
        hub.stop()
    assert "Traceback" not in hub.log.read_text()


# --- smaller faults --------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(hub):
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        yield client


@pytest.mark.parametrize("body", [b'{"tokens": [1], "draft": ["\xff\xfe"]}', b"[" * 100_000 + b"]" * 100_000])
def test_bytes_that_are_not_utf8_json_and_json_nested_too_deep_answer_422(http, body):
    info = http.get("/v1/info").json()
    session = http.post("/v1/sessions", json=open_body(info)).json()["session_id"]
    answer = http.post(f"/v1/sessions/{session}/verify", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"] == "bad_request" and "malformed request" in answer.json()["error"]["message"]


def test_a_wrong_method_answers_405_with_allow(http):
    answer = http.get("/v1/sessions/any/verify")
    assert answer.status_code == 405 and answer.headers["Allow"] == "POST"
    assert answer.json()["error"]["code"] == "method_not_allowed"


def test_the_schema_declares_every_answer_and_its_media_type(http):
    schema = http.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths["/v1/sessions"]["post"]["responses"]) >= {"200", "401", "409", "413", "422", "429"}
    for route in ("feed", "verify", "generate"):
        assert set(paths[f"/v1/sessions/{{session_id}}/{route}"]["post"]["responses"]) >= {"401", "404", "413", "422"}
    assert set(paths["/v1/sessions/{session_id}"]["delete"]["responses"]) >= {"204", "404"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    generate = paths["/v1/sessions/{session_id}/generate"]["post"]["responses"]
    assert list(generate["200"]["content"]) == ["application/x-ndjson"]
    assert list(generate["404"]["content"]) == ["application/json"]  # a refusal is a JSON error body


@pytest.mark.parametrize("timeout_s", ["1", "0"])
def test_a_shutdown_timeout_that_cuts_a_reply_exits_non_zero(tiny, tmp_path, timeout_s):
    hub = RunningHub(tiny.hf_dir, tmp_path, "--shutdown-timeout", timeout_s)
    with httpx.Client(base_url=hub.url, timeout=60) as client:
        info = client.get("/v1/info").json()
        session = client.post("/v1/sessions", json=open_body(info)).json()["session_id"]
        first_chunk, cut = threading.Event(), threading.Event()

        def stream_a_long_reply() -> None:
            body = {"tokens": [1, 20, 30], "max_tokens": info["max_context"] - 8}
            try:
                with client.stream("POST", f"/v1/sessions/{session}/generate", json=body) as response:
                    for line in response.iter_lines():
                        first_chunk.set()
                        time.sleep(0.05)  # a slow reader: the reply outlasts the shutdown timeout
                        if json.loads(line)["done"]:
                            return
            except httpx.HTTPError:
                pass
            cut.set()

        reader = threading.Thread(target=stream_a_long_reply)
        reader.start()
        assert first_chunk.wait(30)
        hub.process.send_signal(signal.SIGTERM)
        status = hub.process.wait(timeout=60)
        reader.join(60)
    assert cut.is_set(), "the reply finished before the shutdown timeout; make it longer"
    assert status == 1, hub.log.read_text()
    assert "cut replies still in flight" in hub.log.read_text()


# --- token expiry and operators -----------------------------------------------------------


def test_tokens_expire_and_say_so(tiny, tmp_path):
    hub = AuthHub(tiny.hf_dir, tmp_path, ("ada",))
    try:
        long = hub_admin(hub.data_dir, "tokens", "create", "--user", "ada", "--expires-at", "2099-01-31")
        # Long enough to be used once even on a loaded machine (the command itself takes seconds there).
        short = hub_admin(hub.data_dir, "tokens", "create", "--user", "ada", "--expires-in", "10s")
        assert long["expires_at"] == "2099-01-31T00:00:00+00:00" and short["expires_at"]
        headers = {"Authorization": f"Bearer {short['token']}"}
        assert httpx.get(f"{hub.url}/v1/whoami", headers=headers).status_code == 200
        expires = datetime.fromisoformat(short["expires_at"]).timestamp()
        time.sleep(max(0.0, expires - time.time()) + 0.5)
        answer = httpx.get(f"{hub.url}/v1/whoami", headers=headers)
        assert answer.status_code == 401 and "expired at" in answer.json()["error"]["message"]
        listed = subprocess.run(
            [sys.executable, "-m", "hub_server", "tokens", "list", "--data-dir", str(hub.data_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert f"expired {short['expires_at']}" in listed and "expires 2099-01-31T00:00:00+00:00" in listed
        for flags in (
            ["--expires-at", "2001-01-01"],
            ["--expires-in", "soon"],
            ["--expires-in", "1d", "--expires-at", "2099-01-01"],
        ):
            refused = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "hub_server",
                    "tokens",
                    "create",
                    "--user",
                    "ada",
                    *flags,
                    "--data-dir",
                    str(hub.data_dir),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert refused.returncode != 0 and "Traceback" not in refused.stderr
    finally:
        hub.stop()


def test_metrics_are_for_operators(auth_hub, hub):
    with auth_hub.client("ada") as ada, auth_hub.client("ops") as ops:
        refused = ada.get("/metrics")
        assert refused.status_code == 403 and "--role operator" in refused.json()["error"]["message"]
        page = ops.get("/metrics")
        assert page.status_code == 200 and "specedge_active_sessions" in page.text
    assert httpx.get(f"{hub.url}/metrics").status_code == 200  # a hub without accounts: its one user operates it


@pytest.mark.parametrize("temperature", [1e-308, 5e-324])
def test_a_tiny_temperature_decodes_as_the_target_alone_does(http, target_alone, temperature):
    info = http.get("/v1/info").json()
    prompt = [1, 20, 30, 40]
    expected = target_alone.decode(prompt, 12, temperature=temperature, seed=7)
    assert expected == target_alone.decode(prompt, 12)  # the top token every time: greedy
    session = http.post("/v1/sessions", json=open_body(info, temperature=temperature, seed=7)).json()["session_id"]
    first = http.post(f"/v1/sessions/{session}/verify", json={"tokens": prompt, "draft": expected[:3]}).json()
    assert first["tokens"] == expected[:4]
    body = {"max_tokens": 8}
    lines = http.post(f"/v1/sessions/{session}/generate", json=body).text.splitlines()
    assert [t for line in lines for t in json.loads(line)["tokens"]] == expected[4:12]


def test_a_removed_users_sessions_close_and_a_new_account_of_that_name_cannot_see_them(tiny, tmp_path):
    hub = AuthHub(tiny.hf_dir, tmp_path, ("carol",), operators=("ops",))
    try:
        with hub.client("carol") as carol, hub.client("ops") as ops:
            info = carol.get("/v1/info").json()
            old = carol.post("/v1/sessions", json=open_body(info)).json()["session_id"]
            assert carol.post(f"/v1/sessions/{old}/feed", json={"tokens": [1, 20, 30]}).status_code == 200
            kv_held = _metric(ops, "specedge_kv_bytes")
            hub_admin(hub.data_dir, "users", "remove", "carol")
            hub_admin(hub.data_dir, "users", "add", "carol")
            token = hub_admin(hub.data_dir, "tokens", "create", "--user", "carol")["token"]
            again = {"Authorization": f"Bearer {token}"}
            answer = httpx.post(f"{hub.url}/v1/sessions/{old}/verify", json={"tokens": [], "draft": [5]}, headers=again)
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "session_not_found"
            deadline = time.monotonic() + 15
            while _metric(ops, "specedge_active_sessions") and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _metric(ops, "specedge_active_sessions") == 0
            assert _metric(ops, "specedge_sessions_closed_account_removed_total") == 1
            assert _metric(ops, "specedge_kv_bytes") < kv_held or kv_held == 0
    finally:
        hub.stop()


def _metric(client: httpx.Client, series: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} is not on the page")

"""A hub with accounts: only token holders get in, each sees only their own sessions, tokens are
never stored or logged in clear, limits answer 429 and recover. Real hubs on loopback, real SQLite."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest

from hub_server.accounts import token_digest
from hub_server.protocol import PROTOCOL_VERSION
from tests.conftest import REPO, AuthHub, hub_admin


def open_body(info: dict) -> dict:
    return {
        "protocol_version": PROTOCOL_VERSION,
        "vocab_size": info["vocab_size"],
        "vocab_fingerprint": info["vocab_fingerprint"],
    }


def open_session(client: httpx.Client) -> str:
    info = client.get("/v1/info").json()
    response = client.post("/v1/sessions", json=open_body(info))
    assert response.status_code == 200, response.text
    return response.json()["session_id"]


def test_no_route_but_health_answers_without_a_token(auth_hub):
    with auth_hub.client("ada") as ada:
        schema = ada.get("/openapi.json").json()
    routes = [
        (method.upper(), path.replace("{session_id}", "any"))
        for path, methods in schema["paths"].items()
        for method in methods
    ]
    routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/metrics"), ("GET", "/v1/whoami")]
    assert ("POST", "/v1/sessions/any/verify") in routes
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {auth_hub.tokens['ada']}"}):
        with httpx.Client(base_url=auth_hub.url, headers=headers, timeout=30) as stranger:
            for method, path in routes:
                response = stranger.request(method, path, json={})
                if path == "/health":
                    assert response.status_code == 200
                    continue
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["WWW-Authenticate"] == "Bearer"
                assert "token" in response.json()["error"]["message"]


def test_whoami_names_the_user_and_limits(auth_hub):
    with auth_hub.client("bob") as bob:
        answer = bob.get("/v1/whoami").json()
    assert answer == {
        "user": "bob",
        "sessions": 0,
        "tokens_left": None,
        "limits": {"max_sessions_per_user": 0, "tokens_per_minute": 0},
    }


def test_one_users_session_is_invisible_to_another(auth_hub):
    with auth_hub.client("ada") as ada, auth_hub.client("bob") as bob:
        session = open_session(ada)
        assert ada.post(f"/v1/sessions/{session}/feed", json={"tokens": [1, 20, 30]}).status_code == 200
        for method, path, body in [
            ("POST", "feed", {"tokens": [5]}),
            ("POST", "verify", {"tokens": [5], "draft": []}),
            ("POST", "generate", {"max_tokens": 2}),
            ("DELETE", "", None),
        ]:
            response = bob.request(method, f"/v1/sessions/{session}/{path}".rstrip("/"), json=body)
            assert response.status_code == 404, response.text
            assert response.json()["error"]["code"] == "session_not_found"
        assert bob.get("/v1/whoami").json()["sessions"] == 0
        verify = ada.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": [40]})
        assert verify.status_code == 200 and verify.json()["context_len"] == 3 + len(verify.json()["tokens"])
        assert ada.delete(f"/v1/sessions/{session}").status_code == 204


def test_revocation_takes_effect_on_the_next_request(auth_hub):
    created = hub_admin(auth_hub.data_dir, "tokens", "create", "--user", "ada")
    with httpx.Client(base_url=auth_hub.url, headers={"Authorization": f"Bearer {created['token']}"}) as client:
        assert client.get("/v1/whoami").json()["user"] == "ada"
        revoked = hub_admin(auth_hub.data_dir, "tokens", "revoke", created["token_id"])
        assert revoked["revoked_at"]
        assert client.get("/v1/whoami").status_code == 401
    listed = hub_admin(auth_hub.data_dir, "tokens", "list", "--user", "ada")
    assert created["token_id"] in {t["token_id"] for t in listed} and "token" not in listed[0]


def test_tokens_are_stored_only_as_hashes(auth_hub):
    stored = b"".join(path.read_bytes() for path in auth_hub.data_dir.iterdir() if path.is_file())
    with sqlite3.connect(auth_hub.data_dir / "accounts.sqlite3") as db:
        digests = {row[0] for row in db.execute("SELECT sha256 FROM tokens")}
    for token in auth_hub.tokens.values():
        assert token.encode() not in stored
        assert token_digest(token) in digests
    assert oct((auth_hub.data_dir / "accounts.sqlite3").stat().st_mode & 0o777) == "0o600"


def test_logs_are_json_with_request_ids_and_no_token(auth_hub):
    wrong = "seh_wrong_token_that_must_not_be_logged"
    with auth_hub.client("ada") as ada:
        answer = ada.get("/v1/whoami", headers={"X-Request-ID": "trace-me-42"})
        ada.get("/v1/whoami", headers={"Authorization": f"Bearer {wrong}"})
        ada.get(f"/v1/info?token={wrong}")
    assert answer.headers["X-Request-ID"] == "trace-me-42"
    time.sleep(0.2)
    log = auth_hub.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("request_id") == "trace-me-42"]
    assert access and access[-1]["user"] == "ada" and access[-1]["status"] == 200 and access[-1]["path"] == "/v1/whoami"
    for token in [*auth_hub.tokens.values(), wrong]:
        assert token not in log


def test_a_verify_answered_is_not_logged_and_a_refused_one_is(auth_hub):
    """A session verifies many times a second: /metrics counts those answered, the log keeps the refused."""
    with auth_hub.client("ada") as ada:
        session = open_session(ada)
        fine = ada.post(f"/v1/sessions/{session}/verify", json={"tokens": [2, 3, 4], "draft": [5]})
        refused = ada.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": [-1]})
        ada.delete(f"/v1/sessions/{session}")
    assert fine.status_code == 200 and refused.status_code == 422
    time.sleep(0.2)
    lines = [json.loads(line) for line in auth_hub.log.read_text().splitlines() if line.startswith("{")]
    logged = [line["status"] for line in lines if line.get("path") == f"/v1/sessions/{session}/verify"]
    assert logged == [422]
    assert [line["status"] for line in lines if line.get("path") == f"/v1/sessions/{session}"] == [204]


def test_no_auth_is_refused_off_loopback(tiny):
    result = subprocess.run(
        [sys.executable, "-m", "hub_server", "serve", "--model", str(tiny.hf_dir), "--host", "0.0.0.0", "--no-auth"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--no-auth is only allowed on a loopback address" in result.stderr


def test_an_unwritable_data_dir_is_one_clear_error(tiny):
    for command in (["users", "list"], ["serve", "--model", str(tiny.hf_dir)]):
        result = subprocess.run(
            [sys.executable, "-m", "hub_server", *command, "--data-dir", "/proc/no-such-dir"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "cannot open the accounts database" in result.stderr and "--data-dir" in result.stderr


@pytest.fixture(scope="module")
def limited_hub(tiny, tmp_path_factory):
    running = AuthHub(
        tiny.hf_dir,
        tmp_path_factory.mktemp("limited-hub"),
        ("ada", "bob", "cy"),
        "--max-sessions-per-user",
        "2",
        "--tokens-per-minute",
        "60",
    )
    yield running
    running.stop()


def assert_limited(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    return int(response.headers["Retry-After"])


def test_sessions_per_user_answer_429_and_recover(limited_hub):
    with limited_hub.client("ada") as ada, limited_hub.client("bob") as bob:
        first, _ = open_session(ada), open_session(ada)
        info = ada.get("/v1/info").json()
        assert assert_limited(ada.post("/v1/sessions", json=open_body(info))) > 0
        open_session(bob)  # another user's limit is their own
        assert ada.delete(f"/v1/sessions/{first}").status_code == 204
        open_session(ada)
        assert ada.get("/v1/whoami").json()["sessions"] == 2


def test_tokens_per_minute_answer_429_and_recover(limited_hub):
    with limited_hub.client("cy") as cy:
        session = open_session(cy)
        assert cy.post(f"/v1/sessions/{session}/feed", json={"tokens": [7] * 61}).status_code == 200
        wait_s = assert_limited(cy.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": [5]}))
        assert cy.get("/v1/whoami").json()["tokens_left"] == 0
        time.sleep(wait_s)
        assert cy.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": [5]}).status_code == 200


def test_embedded_hub_takes_a_per_process_token_from_its_environment(tiny, tmp_path):
    from specedge_cli.remote.embedded import EmbeddedHub

    with EmbeddedHub(tiny.gguf_f32, tmp_path / "embedded.log") as embedded:
        embedded.wait_ready()
        with open(f"/proc/{embedded.pid}/cmdline", "rb") as seen_by_ps:
            assert embedded.token.encode() not in seen_by_ps.read()
        assert httpx.get(f"{embedded.url}/v1/info").status_code == 401
        who = httpx.get(f"{embedded.url}/v1/whoami", headers={"Authorization": f"Bearer {embedded.token}"})
        assert who.json()["user"] == "local"
    assert len(embedded.token) >= 40


def test_requests_past_the_queue_cap_answer_429_and_recover(tiny, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import RunningHub

    hub = RunningHub(tiny.hf_dir, tmp_path, "--max-queue-depth", "1")
    try:
        with httpx.Client(base_url=hub.url, timeout=60, limits=httpx.Limits(max_connections=16)) as client:
            sessions = [open_session(client) for _ in range(12)]

            def feed(session: str) -> httpx.Response:
                return client.post(f"/v1/sessions/{session}/feed", json={"tokens": [7] * 900})

            with ThreadPoolExecutor(len(sessions)) as pool:  # twelve long prefills at once
                answers = list(pool.map(feed, sessions))
            statuses = [answer.status_code for answer in answers]
            assert 200 in statuses and set(statuses) <= {200, 429}, statuses
            refused = next(answer for answer in answers if answer.status_code == 429)
            assert refused.json()["error"]["code"] == "hub_full" and int(refused.headers["Retry-After"]) > 0
            retry = next(s for s, answer in zip(sessions, answers) if answer.status_code == 429)
            assert feed(retry).status_code == 200  # one at a time passes
    finally:
        hub.stop()


def hub_workers(auth_hub, *args: str, token: str) -> subprocess.CompletedProcess:
    """`hub_server workers ... --hub URL` as an operator types it, the token in SPECEDGE_TOKEN."""
    return subprocess.run(
        [sys.executable, "-m", "hub_server", "workers", *args, "--hub", auth_hub.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SPECEDGE_TOKEN": token},
    )


def test_operators_list_drain_and_undrain_workers_from_the_command_line(auth_hub):
    ops, ada = auth_hub.tokens["ops"], auth_hub.tokens["ada"]
    listed = hub_workers(auth_hub, token=ops)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["worker_id", "state", "device"] and row.split()[:2] == ["0", "ready"]
    drained = hub_workers(auth_hub, "drain", "0", "--json", token=ops)
    assert json.loads(drained.stdout)["state"] == "draining"
    info = auth_hub.client("ada").post("/v1/sessions", json={"protocol_version": PROTOCOL_VERSION, **_vocab(auth_hub)})
    assert (info.status_code, info.json()["error"]["code"]) == (429, "hub_full")  # its only worker drains
    assert "worker 0 draining" in info.json()["error"]["message"]
    assert hub_workers(auth_hub, "undrain", "0", token=ops).stdout.strip() == "worker 0 is ready"
    assert json.loads(hub_workers(auth_hub, "--json", token=ops).stdout)[0]["state"] == "ready"
    refused = hub_workers(auth_hub, "drain", "0", token=ada)
    assert refused.returncode == 1 and "403" in refused.stderr and "operator" in refused.stderr
    unknown = hub_workers(auth_hub, "undrain", "9", token=ops)
    assert unknown.returncode == 1 and "no worker '9'" in unknown.stderr


def _vocab(auth_hub) -> dict:
    info = auth_hub.client("ada").get("/v1/info").json()
    return {"vocab_size": info["vocab_size"], "vocab_fingerprint": info["vocab_fingerprint"]}

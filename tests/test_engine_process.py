"""The hub's engine in a process of its own, as `hub_server serve` runs it: the workers list names
that process, a child of the front end; killed mid-reply it costs no reply (restarted, the chat
client reopens its session and the tokens equal the target alone); silent, the front end answers
for it within seconds; Ctrl+C reaches only the front end, which stops the engine; a front end
killed takes its engine with it."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hub_server.engine_link import PING_S, SILENT_LIMIT_S
from specedge_cli.drafting.engine import DraftEngine
from tests.conftest import AuthHub, RunningHub, hub_admin
from tests.replies import ask_disturbed, expected, pid_alive, wait_for, workers_of

PROMPT = "once upon a time there was"


@pytest.fixture(scope="module")
def own_hub(tiny, tmp_path_factory) -> Iterator[RunningHub]:
    """A hub of these tests alone: they stop and kill its engine."""
    hub = RunningHub(tiny.hf_dir, tmp_path_factory.mktemp("engine-process"), "--max-draft-tokens", "16")
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def draft(tiny) -> DraftEngine:
    return DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=1)  # imperfect: rejections happen


def engine_pid(url: str) -> int:
    return workers_of(url)[0]["pid"]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def serving(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_the_workers_list_names_the_engine_process_a_child_of_the_front_end(own_hub):
    pid = engine_pid(own_hub.url)
    assert pid != own_hub.process.pid
    assert parent_of(pid) == own_hub.process.pid


def test_both_processes_freeze_their_start_up_heap_once_serving(own_hub):
    # Full collections would otherwise scan the model's libraries' objects (~240 ms a collection).
    log = own_hub.log.read_text()
    for process in ("engine process", "front end"):
        frozen = re.search(rf"{process}: (\d+) objects of its start-up frozen", log)
        assert frozen and int(frozen[1]) > 10_000, log


def test_an_engine_killed_mid_reply_costs_no_reply(own_hub, draft, target_alone):
    killed: list[int] = []

    def kill_the_engine() -> None:
        killed.append(engine_pid(own_hub.url))
        os.kill(killed[0], signal.SIGKILL)

    reply, reconnects = ask_disturbed(own_hub.url, draft, PROMPT, kill_the_engine)
    assert killed and reconnects >= 1
    assert reply.token_ids == expected(target_alone, draft, reply, 0.9)
    assert engine_pid(own_hub.url) not in killed  # a new engine process serves


def test_a_silent_engine_is_answered_for_within_seconds(own_hub):
    wait_for(lambda: serving(own_hub.url), 120, "the hub serving")
    pid = engine_pid(own_hub.url)
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        answer = httpx.get(f"{own_hub.url}/v1/info", timeout=60)
        waited = time.monotonic() - started
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
        assert answer.headers["Retry-After"]
        assert waited < SILENT_LIMIT_S + 4 * PING_S + 5
        assert httpx.get(f"{own_hub.url}/health", timeout=10).status_code == 503
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: serving(own_hub.url), 30, "the engine answering again")
    assert engine_pid(own_hub.url) == pid  # the same process: stopped, not lost


def test_ctrl_c_reaches_the_front_end_which_stops_its_engine(tiny, tmp_path):
    hub = RunningHub(tiny.hf_dir, tmp_path)
    try:
        pid = engine_pid(hub.url)
        os.kill(pid, signal.SIGINT)  # a terminal's Ctrl+C reaches every process of its group
        os.kill(hub.process.pid, signal.SIGINT)
        assert hub.process.wait(timeout=60) == 0
        wait_for(lambda: not pid_alive(pid), 15, "the engine process ending")
    finally:
        hub.stop()


def test_a_front_end_killed_takes_its_engine_with_it(tiny, tmp_path):
    hub = RunningHub(tiny.hf_dir, tmp_path)
    try:
        pid = engine_pid(hub.url)
        os.kill(hub.process.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 15, "the orphaned engine process ending")
    finally:
        hub.stop()


def front_ends_of(supervisor: int) -> list[int]:
    """The front-end processes `hub_server serve --api-servers N` started."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"hub_server.front_ends" in command and parent_of(int(entry)) == supervisor:
            found.append(int(entry))
    return found


def test_a_front_end_killed_mid_reply_costs_no_reply_while_the_other_serves(tiny, tmp_path, draft, target_alone):
    hub = RunningHub(tiny.hf_dir, tmp_path, "--api-servers", "2", "--max-draft-tokens", "16")
    try:
        front_ends = front_ends_of(hub.process.pid)
        assert len(front_ends) == 2 and engine_pid(hub.url) not in front_ends + [hub.process.pid]
        answers: list[int] = []

        def kill_a_front_end() -> None:
            os.kill(front_ends[0], signal.SIGKILL)
            # Fresh connections at once: the other front end takes them all.
            answers.extend(httpx.get(f"{hub.url}/v1/info", timeout=30).status_code for _ in range(10))

        reply, _ = ask_disturbed(hub.url, draft, PROMPT, kill_a_front_end)
        assert answers == [200] * 10
        assert reply.token_ids == expected(target_alone, draft, reply, 0.9)
        wait_for(lambda: len(front_ends_of(hub.process.pid)) == 2, 30, "a front end replacing the killed one")
    finally:
        hub.stop()


def test_front_ends_share_accounts_and_budgets(tiny, tmp_path):
    """Two front ends: a revoked token is refused by both from the next request on, and a user's
    token budget is counted once, whichever front end each request reaches."""
    hub = AuthHub(tiny.hf_dir, tmp_path, ("ada",), "--api-servers", "2", "--tokens-per-minute", "40")
    try:
        assert len(front_ends_of(hub.process.pid)) == 2

        def fresh(method: str, path: str, **kwargs) -> httpx.Response:  # a new connection: either front end
            with hub.client("ada") as client:
                return client.request(method, path, **kwargs)

        info = fresh("GET", "/v1/info").json()
        body = {key: info[key] for key in ("protocol_version", "vocab_size", "vocab_fingerprint")}
        session = fresh("POST", "/v1/sessions", json=body).json()["session_id"]
        # 60 tokens through two feeds, on whichever front ends: the bucket of 40 is empty after them.
        for _ in range(2):
            assert fresh("POST", f"/v1/sessions/{session}/feed", json={"tokens": list(range(3, 33))}).status_code == 200
        refused = [fresh("POST", f"/v1/sessions/{session}/feed", json={"tokens": [3, 4]}) for _ in range(4)]
        assert all(r.status_code == 429 and r.json()["error"]["code"] == "rate_limited" for r in refused)

        token_id = hub_admin(hub.data_dir, "tokens", "list", "--user", "ada")[0]["token_id"]
        hub_admin(hub.data_dir, "tokens", "revoke", token_id)
        assert {fresh("GET", "/v1/whoami").status_code for _ in range(10)} == {401}
    finally:
        hub.stop()


def test_a_number_too_big_for_the_boundary_is_refused_alone(own_hub):
    """A token id past 64 bits passes the body's schema (an int) but not msgpack: that request
    gets 422, and requests sent beside it are answered as usual."""
    wait_for(lambda: serving(own_hub.url), 120, "the hub serving")
    with httpx.Client(base_url=own_hub.url, timeout=60) as client:
        info = client.get("/v1/info").json()
        body = {key: info[key] for key in ("protocol_version", "vocab_size", "vocab_fingerprint")}
        session = client.post("/v1/sessions", json=body).json()["session_id"]
        refused = client.post(f"/v1/sessions/{session}/feed", json={"tokens": [1, 2**70]})
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "bad_request"
        assert client.post(f"/v1/sessions/{session}/feed", json={"tokens": [1, 300]}).status_code == 200
        assert client.delete(f"/v1/sessions/{session}").status_code == 204

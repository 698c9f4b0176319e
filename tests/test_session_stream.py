"""A session's verify stream (one WebSocket, msgpack frames) against real hubs on loopback: a chat
through it equals the target alone; against a hub of protocol version 1 the client verifies over
HTTP and the chat is the same; errors carry HTTP's statuses and codes; a dropped stream frees the
session's turn."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from hub_server.protocol import PROTOCOL_VERSION
from hub_server.stream import TOKEN_RECHECK_S
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.errors import HubRejected, SessionLost
from specedge_cli.remote.client import HubClient
from specedge_cli.remote.stream import OPEN_TIMEOUT_S, StreamRefused, open_stream
from tests.conftest import AuthHub, hub_admin, hub_of_commit
from tests.test_lossless import plain_template

# The last commit whose hub speaks protocol version 1 (no stream): a hub not yet upgraded.
VERSION_1_HUB = "aecbc93"
REQUEST_TIMEOUT_S = 3  # the hub's per-request deadline: a stream outlives it


@pytest.fixture(scope="module")
def stream_hub(tiny, tmp_path_factory):
    """A hub with accounts (ada, bob) and JSON logs, whose log this module alone writes."""
    running = AuthHub(
        tiny.hf_dir,
        tmp_path_factory.mktemp("stream-hub"),
        ("ada", "bob"),
        *("--max-draft-tokens", "16", "--log-format", "json", "--request-timeout-s", str(REQUEST_TIMEOUT_S)),
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def version_1_hub(tiny, tmp_path_factory):
    """The hub as it was before the stream, run from that commit's files."""
    yield from hub_of_commit(VERSION_1_HUB, tiny, tmp_path_factory.mktemp("version-1-hub"))


@pytest.fixture(scope="module")
def draft(tiny):
    return DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2)


def log_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def chat(url: str, token: str | None, engine: DraftEngine, prompts: list[str], temperature: float):
    settings = DecodeSettings(max_tokens=40, temperature=temperature, seed=5, draft_len=3)
    with HubClient(url, token) as client:
        conversation = Conversation(engine, client, plain_template(engine), settings)
        try:
            turns = [conversation.ask(prompt) for prompt in prompts]
            session_id = conversation.session_id
        finally:
            conversation.close()
    return turns, session_id


def assert_equal_to_target_alone(turns, engine, target_alone, temperature):
    stop = frozenset(engine.vocab.stop_token_ids())
    before: list[int] = []
    for turn in turns:
        context = before + turn.prompt_token_ids
        assert turn.token_ids == target_alone.decode(context, 40, stop, temperature=temperature, seed=5)
        before = context + turn.token_ids


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_chat_through_the_stream_equals_the_target_alone(temperature, stream_hub, draft, target_alone):
    turns, session_id = chat(stream_hub.url, stream_hub.tokens["ada"], draft, ["the cat sat", "and then"], temperature)
    assert_equal_to_target_alone(turns, draft, target_alone, temperature)
    time.sleep(0.5)  # the hub writes the stream's last line as the close reaches it
    lines = log_lines(stream_hub.log)
    closed = [line["message"] for line in lines if line["message"].startswith(f"stream closed: session {session_id}")]
    rounds = sum(turn.stats.verify_rounds for turn in turns)
    assert len(closed) == 1 and f", {rounds} verifies in" in closed[0]  # every verify of the chat: none over HTTP


def test_a_stream_the_hub_closed_between_verifies_is_opened_again_and_the_session_kept(stream_hub, draft, target_alone):
    settings = DecodeSettings(max_tokens=40, seed=5, draft_len=3)
    with HubClient(stream_hub.url, stream_hub.tokens["ada"]) as client:
        conversation = Conversation(draft, client, plain_template(draft), settings)
        try:
            first = conversation.ask("the cat sat")
            session_id = conversation.session_id
            with stream_of(stream_hub, session_id):  # takes the session over: the hub closes the client's stream
                time.sleep(0.5)
            second = conversation.ask("and then")
            assert (conversation.session_id, conversation.reconnects) == (session_id, 0)
        finally:
            conversation.close()
    assert_equal_to_target_alone([first, second], draft, target_alone, 0.0)
    opened = [line for line in log_lines(stream_hub.log) if line["message"] == f"stream opened: session {session_id}"]
    assert len(opened) == 3  # the client's, the one that took over, the client's again


def test_a_hub_of_protocol_version_1_is_verified_over_http(version_1_hub, draft, target_alone):
    turns, session_id = chat(version_1_hub.url, None, draft, ["the cat sat", "and then"], 0.0)
    assert_equal_to_target_alone(turns, draft, target_alone, 0.0)
    assert f"POST /v1/sessions/{session_id}/verify 200" in version_1_hub.log_path.read_text()


def test_an_upgrade_the_hub_refuses_is_a_stream_it_does_not_offer(version_1_hub):
    with HubClient(version_1_hub.url) as client:
        assert client.info().protocol_version == 1 < PROTOCOL_VERSION
        with pytest.raises(StreamRefused):
            open_stream(client, "any-session")


def test_an_upgrade_left_unanswered_is_taken_for_refused():
    with socket.socket() as silent:  # takes the connection, never answers it
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        with HubClient(f"http://127.0.0.1:{silent.getsockname()[1]}") as client:
            started = time.monotonic()
            with pytest.raises(StreamRefused):
                open_stream(client, "any-session")
    assert time.monotonic() - started < OPEN_TIMEOUT_S + 5


# --- frames and their errors -----------------------------------------------------------------------


def open_session(hub: AuthHub, user: str = "ada") -> str:
    with hub.client(user) as http:
        info = http.get("/v1/info").json()
        body = {key: info[key] for key in ("protocol_version", "vocab_size", "vocab_fingerprint")}
        session_id = http.post("/v1/sessions", json=body).json()["session_id"]
        assert http.post(f"/v1/sessions/{session_id}/feed", json={"tokens": [1, 300, 301]}).status_code == 200
    return session_id


def stream_of(hub: AuthHub, session_id: str, user: str = "ada") -> ClientConnection:
    url = hub.url.replace("http", "ws", 1) + f"/v1/sessions/{session_id}/stream"
    headers = {"Authorization": f"Bearer {hub.tokens[user]}"}
    return connect(url, additional_headers=headers, compression=None, open_timeout=30, legacy=True)


def exchange(stream: ClientConnection, frame: dict | bytes | str) -> dict:
    stream.send(frame if isinstance(frame, bytes | str) else msgpack.packb(frame))
    return msgpack.unpackb(stream.recv(timeout=30))


def http_error(hub: AuthHub, session_id: str, body: dict, user: str = "ada") -> tuple[int, str]:
    with hub.client(user) as http:
        answer = http.post(f"/v1/sessions/{session_id}/verify", json=body)
    return answer.status_code, answer.json()["error"]["code"]


def test_a_frame_is_answered_as_the_http_route_answers(stream_hub):
    session_id = open_session(stream_hub)
    with stream_of(stream_hub, session_id) as stream:
        answer = exchange(stream, {"id": 3, "tokens": [302], "draft": [5, 6]})
    assert answer["id"] == 3 and set(answer) == {"id", "accepted", "tokens", "context_len", "verify_ms"}
    assert answer["context_len"] == 4 + answer["accepted"] + 1 == 4 + len(answer["tokens"])
    with stream_hub.client("ada") as http:  # the same session over HTTP goes on from there
        after = http.post(f"/v1/sessions/{session_id}/verify", json={"draft": [7]}).json()
    assert after["context_len"] == answer["context_len"] + len(after["tokens"])


@pytest.mark.parametrize(
    "body, code",
    [
        ({"draft": [10**9]}, "bad_request"),  # a token id out of the vocabulary
        ({"draft": [5], "parents": [3]}, "bad_request"),  # a tree that is not one
        ({"draft": [5], "logits": True}, "bad_request"),  # a field the protocol has not
        ({"draft": list(range(17))}, "bad_request"),  # longer than --max-draft-tokens
    ],
)
def test_a_refused_frame_carries_http_status_and_code_and_keeps_the_stream(stream_hub, body, code):
    session_id = open_session(stream_hub)
    status, http_code = http_error(stream_hub, session_id, body)
    assert http_code == code
    with stream_of(stream_hub, session_id) as stream:
        refused = exchange(stream, {"id": 1, **body})
        assert refused["id"] == 1 and refused["error"]["status"] == status and refused["error"]["code"] == code
        assert refused["error"]["message"]
        assert "accepted" in exchange(stream, {"id": 2, "draft": [5]})  # still open, the session intact


def test_frames_that_are_not_verify_requests_are_refused_and_the_stream_kept(stream_hub):
    session_id = open_session(stream_hub)
    with stream_of(stream_hub, session_id) as stream:
        assert exchange(stream, b"\xc1")["error"]["code"] == "bad_request"  # not msgpack
        assert exchange(stream, msgpack.packb([1, 2]))["error"]["code"] == "bad_request"  # not a map
        assert exchange(stream, {"draft": [5]})["error"]["code"] == "bad_request"  # no id
        assert exchange(stream, "text")["error"]["code"] == "bad_request"  # a text frame
        too_large = exchange(stream, {"id": 9, "draft": [5], "pad": b"x" * (1 << 20)})
        assert (too_large["id"], too_large["error"]["status"], too_large["error"]["code"]) == (9, 413, "body_too_large")
        assert "accepted" in exchange(stream, {"id": 2, "draft": [5]})


def test_a_frame_past_twice_the_body_limit_closes_the_stream_unread(stream_hub):
    session_id = open_session(stream_hub)
    with stream_of(stream_hub, session_id) as stream, pytest.raises(ConnectionClosed) as closed:
        # The hub closes while the frame is still arriving: the client's send may meet the reset
        # of a socket closed with unread data before it reads the close frame.
        stream.send(msgpack.packb({"id": 0, "draft": [5], "pad": b"x" * (2 << 20)}))
        stream.recv(timeout=30)
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1009  # message too big
    with stream_hub.client("ada") as http:  # the session is as it was
        assert http.post(f"/v1/sessions/{session_id}/verify", json={"draft": [5]}).json()["context_len"] >= 4


def test_a_session_that_is_gone_is_refused_404_and_its_stream_closed(stream_hub):
    for session_id, user in [("no-such-session", "ada"), (open_session(stream_hub, "bob"), "ada")]:
        assert http_error(stream_hub, session_id, {"draft": [5]}, user) == (404, "session_not_found")
        with stream_of(stream_hub, session_id, user) as stream:
            refused = exchange(stream, {"id": 1, "draft": [5]})
            assert (refused["error"]["status"], refused["error"]["code"]) == (404, "session_not_found")
            with pytest.raises(ConnectionClosed) as closed:
                stream.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404


def test_the_client_raises_over_the_stream_what_it_raises_over_http(stream_hub):
    session_id = open_session(stream_hub)
    with HubClient(stream_hub.url, stream_hub.tokens["ada"]) as client:
        stream = open_stream(client, session_id)
        try:
            with pytest.raises(HubRejected) as refused:
                stream.verify([], [10**9])
            assert (refused.value.status, refused.value.code) == (422, "bad_request")
            reply = stream.verify([], [5])
            assert reply.context_len == 3 + len(reply.tokens)  # the fed prompt, then this verify's tokens
        finally:
            stream.close()
        gone = open_stream(client, "no-such-session")
        try:
            with pytest.raises(SessionLost):
                gone.verify([], [5])
        finally:
            gone.close()


@pytest.mark.parametrize("token", [None, "not-a-token"])
def test_an_upgrade_without_a_valid_token_is_answered_401_as_any_route(stream_hub, token):
    session_id = open_session(stream_hub)
    url = stream_hub.url.replace("http", "ws", 1) + f"/v1/sessions/{session_id}/stream"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(InvalidStatus) as refused:
        connect(url, additional_headers=headers, open_timeout=30, legacy=True)
    response = refused.value.response
    assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(response.body)["error"]["code"] == "unauthorized"


def test_a_token_revoked_while_its_stream_is_open_is_refused_within_a_second(stream_hub):
    created = hub_admin(stream_hub.data_dir, "tokens", "create", "--user", "ada")
    session_id = open_session(stream_hub)
    url = stream_hub.url.replace("http", "ws", 1) + f"/v1/sessions/{session_id}/stream"
    headers = {"Authorization": f"Bearer {created['token']}"}
    with connect(url, additional_headers=headers, compression=None, open_timeout=30, legacy=True) as stream:
        assert "accepted" in exchange(stream, {"id": 0, "draft": [5]})
        hub_admin(stream_hub.data_dir, "tokens", "revoke", created["token_id"])
        time.sleep(TOKEN_RECHECK_S + 0.2)
        refused = exchange(stream, {"id": 1, "draft": [5]})
        assert (refused["id"], refused["error"]["status"], refused["error"]["code"]) == (1, 401, "unauthorized")
    with stream_hub.client("ada") as http:  # the session itself is the account's, as before
        assert http.post(f"/v1/sessions/{session_id}/verify", json={"draft": [5]}).status_code == 200


# --- turns ---------------------------------------------------------------------------------------


def test_frames_wait_for_the_session_turn_and_past_eight_are_busy(stream_hub):
    session_id = open_session(stream_hub)
    with stream_of(stream_hub, session_id) as stream:
        for frame_id in range(30):  # all at once: one is served, 8 wait, the rest are refused at once
            stream.send(msgpack.packb({"id": frame_id, "draft": [5]}))
        answers = [msgpack.unpackb(stream.recv(timeout=30)) for _ in range(30)]
    busy = [answer for answer in answers if "error" in answer]
    assert {answer["id"] for answer in answers} == set(range(30))
    assert busy and all(a["error"]["code"] == "session_busy" and a["error"]["retry_after"] == 1 for a in busy)
    served = sorted((a for a in answers if "error" not in a), key=lambda answer: answer["id"])
    # served in arrival order, each going on from the last
    assert [a["context_len"] for a in served] == sorted(a["context_len"] for a in served)
    assert served[-1]["context_len"] == 3 + sum(len(a["tokens"]) for a in served)


def test_a_dropped_stream_frees_the_session_turn(stream_hub):
    session_id = open_session(stream_hub)
    stream = stream_of(stream_hub, session_id)
    for frame_id in range(9):  # one in a pass, the rest waiting for the turn
        stream.send(msgpack.packb({"id": frame_id, "draft": [5, 6, 7]}))
    stream.socket.shutdown(socket.SHUT_RDWR)  # gone without a close frame
    stream.close()
    with stream_hub.client("ada") as http:
        # The turn comes free: eight verifies at once (one served, seven in line) are all answered.
        answers: list = []
        threads = [
            threading.Thread(
                target=lambda: answers.append(http.post(f"/v1/sessions/{session_id}/verify", json={"draft": [5]}))
            )
            for _ in range(8)
        ]
        time.sleep(1.0)  # the hub has seen the drop
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert [answer.status_code for answer in answers] == [200] * 8
    with stream_of(stream_hub, session_id) as again:  # and a new stream serves the session
        assert "accepted" in exchange(again, {"id": 0, "draft": [5]})


def test_a_newer_stream_takes_the_session_over(stream_hub):
    session_id = open_session(stream_hub)
    with stream_of(stream_hub, session_id) as first, stream_of(stream_hub, session_id) as second:
        with pytest.raises(ConnectionClosed) as closed:
            first.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409
        assert "accepted" in exchange(second, {"id": 0, "draft": [5]})


def test_a_stream_outlives_the_hub_request_deadline(stream_hub):
    session_id = open_session(stream_hub)
    with stream_of(stream_hub, session_id) as stream:
        assert "accepted" in exchange(stream, {"id": 0, "draft": [5]})
        time.sleep(REQUEST_TIMEOUT_S + 1.5)
        assert "accepted" in exchange(stream, {"id": 1, "draft": [5]})

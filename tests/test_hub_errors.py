"""Bad input gets a 4xx that says what to do, and the hub keeps serving."""

from __future__ import annotations

import httpx
import pytest

from hub_server.protocol import PROTOCOL_VERSION


@pytest.fixture(scope="module")
def http(hub):
    with httpx.Client(base_url=hub.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def info(http):
    return http.get("/v1/info").json()


def open_body(info, **changes) -> dict:
    body = {
        "protocol_version": PROTOCOL_VERSION,
        "vocab_size": info["vocab_size"],
        "vocab_fingerprint": info["vocab_fingerprint"],
        "sampling": {"temperature": 0.0, "seed": 0},
    }
    body.update(changes)
    return body


@pytest.fixture()
def session(http, info):
    response = http.post("/v1/sessions", json=open_body(info))
    assert response.status_code == 200, response.text
    session_id = response.json()["session_id"]
    yield session_id
    http.delete(f"/v1/sessions/{session_id}")


def assert_error(response: httpx.Response, status: int, code: str, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert words in error["message"]


def test_vocabulary_mismatch_is_refused(http, info):
    response = http.post("/v1/sessions", json=open_body(info, vocab_fingerprint="0" * 64, draft_model="other.gguf"))
    assert_error(response, 409, "vocab_mismatch", "other.gguf")
    response = http.post("/v1/sessions", json=open_body(info, vocab_size=info["vocab_size"] + 1))
    assert_error(response, 409, "vocab_mismatch", "draft model")


def test_wrong_protocol_version_is_refused(http, info):
    assert_error(
        http.post("/v1/sessions", json=open_body(info, protocol_version=99)), 422, "bad_request", "protocol version"
    )


@pytest.mark.parametrize("ids", [[-1], [10**9], [3, 512]])
def test_token_ids_out_of_range(http, session, ids):
    response = http.post(f"/v1/sessions/{session}/verify", json={"tokens": ids, "draft": []})
    assert_error(response, 422, "bad_request", "outside this model's vocabulary")
    response = http.post(f"/v1/sessions/{session}/verify", json={"tokens": [5], "draft": ids})
    assert_error(response, 422, "bad_request", "outside this model's vocabulary")


def test_draft_over_the_limit(http, session, info):
    draft = [5] * (info["max_draft_tokens"] + 1)
    response = http.post(f"/v1/sessions/{session}/verify", json={"tokens": [5], "draft": draft})
    assert_error(response, 422, "bad_request", "longer than this hub's limit")


def test_context_past_the_model_limit(http, session, info):
    response = http.post(f"/v1/sessions/{session}/feed", json={"tokens": [5] * (info["max_context"] + 1)})
    assert_error(response, 422, "context_too_long", "start a new conversation")


def test_verify_on_empty_context(http, session):
    assert_error(
        http.post(f"/v1/sessions/{session}/verify", json={"tokens": [], "draft": [5]}), 422, "bad_request", "no context"
    )


def test_unknown_session(http):
    assert_error(
        http.post("/v1/sessions/nope/verify", json={"tokens": [5], "draft": []}), 404, "session_not_found", "nope"
    )
    assert_error(http.delete("/v1/sessions/nope"), 404, "session_not_found", "nope")


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"tokens": "abc", "draft": []}',
        b'{"tokens": [1.5], "draft": []}',
        b'{"tokens": [true], "draft": []}',
        b'{"tokens": [1], "draft": [], "surprise": 1}',
    ],
)
def test_malformed_bodies(http, session, body):
    response = http.post(f"/v1/sessions/{session}/verify", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "bad_request", "malformed request")


@pytest.mark.parametrize(
    ("content_type", "body", "said"),
    [
        ("text/plain", b'{"tokens": [1], "draft": []}', "must be JSON"),
        ("application/json", b"\xff\xfe{}", "malformed request"),  # not UTF-8
        ("application/json", b"", "malformed request"),
    ],
)
def test_a_verify_body_that_is_not_json_is_refused_422(http, session, content_type, body, said):
    response = http.post(f"/v1/sessions/{session}/verify", content=body, headers={"content-type": content_type})
    assert_error(response, 422, "bad_request", said)
    assert http.post(f"/v1/sessions/{session}/verify", json={"tokens": [5], "draft": [5]}).status_code == 200


def test_body_too_large(http, session):
    response = http.post(
        f"/v1/sessions/{session}/verify", content=b"1" * (2 << 20), headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "body_too_large", "limited")


def test_chunked_body_too_large(http, session):
    chunks = (b"[" + b"1," * 100_000 for _ in range(12))  # no Content-Length: sent chunked
    response = http.post(f"/v1/sessions/{session}/verify", content=chunks, headers={"content-type": "application/json"})
    assert_error(response, 413, "body_too_large", "limited")


@pytest.mark.parametrize(
    "draft, parents, words",
    [
        ([6, 7], [0, 0], "parents[0] = 0"),  # a node its own parent: a cycle
        ([6, 7, 8], [-1, 2, 1], "parents[1] = 2"),  # a forward reference
        ([6, 7], [-1, -7], "parents[1] = -7"),
        ([6, 7], [-1], "one per token"),
    ],
)
def test_bad_trees(http, session, draft, parents, words):
    response = http.post(f"/v1/sessions/{session}/verify", json={"tokens": [5], "draft": draft, "parents": parents})
    assert_error(response, 422, "bad_request", words)


def test_hub_keeps_serving_after_bad_input(http, session):
    http.post(f"/v1/sessions/{session}/verify", content=b"{", headers={"content-type": "application/json"})
    assert http.get("/health").status_code == 200
    response = http.post(f"/v1/sessions/{session}/verify", json={"tokens": [1, 20, 30], "draft": [40]})
    assert response.status_code == 200
    assert response.json()["context_len"] == 3 + len(response.json()["tokens"])

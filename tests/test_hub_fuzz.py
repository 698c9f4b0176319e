"""Thousands of generated requests against a real hub on loopback: wrong types, negative and
huge ids, huge lists, unknown fields, bad trees, junk bytes, bad tokens. None may answer 5xx, every
error must be our JSON error body, and the hub must still serve a well-formed request afterwards."""

from __future__ import annotations

import json
import time
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub_server.protocol import PROTOCOL_VERSION

EXAMPLES = 1000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
token_ids = st.integers(-5, 600) | st.integers(-(2**70), 2**70)
id_lists = st.lists(token_ids, max_size=24) | st.lists(st.integers(0, 511), min_size=500, max_size=3000)
parents = st.lists(st.integers(-3, 30), max_size=24)


def field(valid):
    """A field's value: usually plausible, sometimes any JSON at all."""
    return st.one_of(valid, valid, json_values)


known_fields = {
    "tokens": field(id_lists),
    "draft": field(id_lists),
    "parents": field(st.none() | parents),
    "protocol_version": field(st.sampled_from([PROTOCOL_VERSION, 0, -1, 99])),
    "vocab_size": field(st.integers(-5, 1000)),
    "vocab_fingerprint": field(st.text(max_size=200)),
    "draft_model": field(st.text(max_size=300)),
    "stop_token_ids": field(id_lists),
    "sampling": field(
        st.fixed_dictionaries({}, optional={"temperature": field(st.floats(-1, 200)), "seed": field(token_ids)})
    ),
    "mode": field(st.sampled_from(["autoregressive", "speculative", "greedy", ""])),
    "max_tokens": field(st.integers(-3, 12) | st.integers(2000, 10**6)),
    "draft_len": field(st.integers(-3, 80)),
}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={**known_fields, "surprise": json_values}),
    json_values,
    st.binary(max_size=64),
)
routes = st.sampled_from(
    [
        ("POST", "/v1/sessions"),
        ("POST", "/v1/sessions/{s}/feed"),
        ("POST", "/v1/sessions/{s}/verify"),
        ("POST", "/v1/sessions/{s}/generate"),
        ("DELETE", "/v1/sessions/{s}"),
        ("GET", "/v1/info"),
        ("GET", "/v1/whoami"),
        ("PUT", "/v1/sessions/{s}/verify"),
        ("GET", "/v1/sessions/{s}"),
    ]
)
session_ids = st.sampled_from(["live", "live", "live", "nope", "..", "%00", "a" * 300]) | st.text(
    min_size=1, max_size=20
)
credentials = st.sampled_from(["ada", "ada", "ada", "bob", "none", "junk"])


@pytest.fixture(scope="module")
def fuzz_target(auth_hub):
    clients = {name: auth_hub.client(name) for name in ("ada", "bob")}
    clients["none"] = httpx.Client(base_url=auth_hub.url, timeout=30)
    clients["junk"] = httpx.Client(base_url=auth_hub.url, timeout=30, headers={"Authorization": "Bearer seh_junk"})
    info = clients["ada"].get("/v1/info").json()
    yield clients, info
    for client in clients.values():
        client.close()


def test_generated_requests_never_answer_5xx(fuzz_target):
    clients, info = fuzz_target
    ada = clients["ada"]
    opening = {
        "protocol_version": PROTOCOL_VERSION,
        "vocab_size": info["vocab_size"],
        "vocab_fingerprint": info["vocab_fingerprint"],
    }
    sent: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(route=routes, body=bodies, session_id=session_ids, who=credentials, prompt=st.booleans())
    def one_request(route, body, session_id, who, prompt):
        method, template = route
        live = ada.post("/v1/sessions", json=opening).json()["session_id"] if session_id == "live" else None
        if live and prompt:
            ada.post(f"/v1/sessions/{live}/feed", json={"tokens": [1, 20, 30]})
        path = template.replace("{s}", live or quote(session_id, safe=""))
        # Encoded here, not by httpx, so that NaN and Infinity reach the hub too.
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = clients[who].request(method, path, content=content, headers={"content-type": "application/json"})
        sent.append(response.status_code)
        assert response.status_code < 500, (method, path, body, response.text)
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["code"] and error["message"]
        if live:
            ada.delete(f"/v1/sessions/{live}")

    started = time.monotonic()
    one_request()
    statuses = sorted(set(sent))
    print(
        f"\nfuzz: {len(sent)} generated requests to a real hub in {time.monotonic() - started:.0f} s, "
        f"statuses seen {statuses}"
    )
    assert len(sent) >= 1000
    assert 200 in sent and 422 in sent and 401 in sent and 404 in sent
    session = ada.post("/v1/sessions", json=opening).json()["session_id"]
    verify = ada.post(f"/v1/sessions/{session}/verify", json={"tokens": [1, 20, 30], "draft": [40]})
    assert verify.status_code == 200 and ada.get("/health").status_code == 200
    ada.delete(f"/v1/sessions/{session}")

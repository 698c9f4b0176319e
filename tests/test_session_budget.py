"""Session budget: a full hub answers 429 with Retry-After; idle sessions are evicted, and a
client that re-sends its own token history continues with identical results."""

from __future__ import annotations

import time

import pytest

from specedge_cli.errors import HubBusy, SessionLost
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient
from tests.conftest import RunningHub

PROMPT = [1, 300, 301, 302, 303]


@pytest.fixture(scope="module")
def small_hub(tiny, tmp_path_factory):
    running = RunningHub(
        tiny.hf_dir, tmp_path_factory.mktemp("hub-small"), "--max-sessions", "2", "--session-idle-s", "1"
    )
    yield running
    running.stop()


def open_session(client: HubClient) -> str:
    info = client.info()
    return client.open_session(
        wire.OpenSessionRequest(vocab_size=info.vocab_size, vocab_fingerprint=info.vocab_fingerprint)
    ).session_id


def test_full_hub_answers_429_with_retry_after_and_recovers(small_hub):
    with HubClient(small_hub.url) as client:
        first, second = open_session(client), open_session(client)
        with pytest.raises(HubBusy) as refused:
            open_session(client)
        assert refused.value.status == 429 and refused.value.retry_after_s > 0
        client.close_session(first)
        third = open_session(client)
        for session in (second, third):
            client.close_session(session)


def test_evicted_session_resumes_from_the_clients_history(small_hub, target_alone):
    expected = target_alone.decode(PROMPT, 12)
    with HubClient(small_hub.url) as client:
        session = open_session(client)
        reply = client.verify(session, tokens=PROMPT, draft=expected[:3])
        history = PROMPT + reply.tokens
        time.sleep(2.5)  # idle past --session-idle-s: the hub drops the session and its KV
        with pytest.raises(SessionLost):
            client.verify(session, tokens=[], draft=[])
        resumed = open_session(client)
        client.feed(resumed, history)
        generated = list(reply.tokens)
        while len(generated) < 12:
            step = client.verify(resumed, tokens=[], draft=expected[len(generated) : len(generated) + 2])
            generated += step.tokens
        client.close_session(resumed)
    assert generated[:12] == expected

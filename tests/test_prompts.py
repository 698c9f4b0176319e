"""Prompts scheduled in chunks beside other sessions' verifies: every reply still equals the
target alone, a feed whose client leaves frees its session, an over-long prompt takes nothing.
A real hub on loopback with small chunks (`--max-pass-tokens`), so prompts span many steps."""

from __future__ import annotations

import contextlib
import json
import random
import threading

import httpx
import pytest

from hub_server.engine_api import VerifyJob
from hub_server.prompts import FIRST_PROMPT_TOKENS, PromptBudget
from tests.conftest import RunningHub
from tests.test_hub_abuse import open_session

CHUNK = 24


@pytest.fixture(scope="module")
def chunked_hub(tiny, tmp_path_factory):
    running = RunningHub(tiny.hf_dir, tmp_path_factory.mktemp("chunked-hub"), "--max-pass-tokens", str(CHUNK))
    yield running
    running.stop()


def prompt(seed: int, length: int) -> list[int]:
    return random.Random(seed).choices(range(3, 500), k=length)


def generate(client: httpx.Client, session: str, tokens: list[int], max_tokens: int) -> list[int]:
    body = {"tokens": tokens, "max_tokens": max_tokens, "mode": "autoregressive"}
    answer = client.post(f"/v1/sessions/{session}/generate", json=body)
    assert answer.status_code == 200, answer.text
    return [token for line in answer.text.splitlines() if line for token in json.loads(line)["tokens"]]


def verify_back_to_back(url: str, stop: threading.Event, replies: list[list[int]], seed: int) -> None:
    """A user verifying one-token drafts back to back on a session of their own (a chain of the
    target's own tokens: each reply's bonus token is the next context)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        session = open_session(client)
        tokens = prompt(seed, 5)
        emitted: list[int] = []
        while not stop.is_set():
            answer = client.post(f"/v1/sessions/{session}/verify", json={"tokens": tokens, "draft": []})
            assert answer.status_code == 200, answer.text
            tokens = []
            emitted += answer.json()["tokens"]
        replies.append(prompt(seed, 5) + emitted)


def test_prompts_fed_in_chunks_beside_other_verifies_give_the_target_alones_tokens(chunked_hub, target_alone):
    stop = threading.Event()
    replies: list[list[int]] = []
    users = [threading.Thread(target=verify_back_to_back, args=(chunked_hub.url, stop, replies, s)) for s in (1, 2)]
    for user in users:
        user.start()
    try:
        with httpx.Client(base_url=chunked_hub.url, timeout=120) as client:
            fed, sent = open_session(client), open_session(client)
            long_prompt, other_prompt = prompt(10, 10 * CHUNK + 7), prompt(11, 8 * CHUNK + 3)
            answer = client.post(f"/v1/sessions/{fed}/feed", json={"tokens": long_prompt})
            assert answer.status_code == 200 and answer.json()["context_len"] == len(long_prompt)
            # The prompt of a generation goes in chunks too.
            by_feed = generate(client, fed, [], 12)
            by_generate = generate(client, sent, other_prompt, 12)
    finally:
        stop.set()
        for user in users:
            user.join(60)
    assert by_feed == target_alone.decode(long_prompt, 12)
    assert by_generate == target_alone.decode(other_prompt, 12)
    assert len(replies) == 2
    for reply in replies:  # every verify beside the prompts answered what the target alone says
        assert reply[5:] == target_alone.decode(reply[:5], len(reply) - 5)


def test_a_verify_that_brings_a_long_prompt_feeds_it_in_chunks_and_stays_lossless(chunked_hub, target_alone):
    with httpx.Client(base_url=chunked_hub.url, timeout=120) as client:
        session = open_session(client)
        context = prompt(20, 6 * CHUNK + 5)
        expected = target_alone.decode(context, 4)
        answer = client.post(f"/v1/sessions/{session}/verify", json={"tokens": context, "draft": expected[:3]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["tokens"] == expected


def test_a_feed_whose_client_leaves_frees_its_session_which_stays_consistent(chunked_hub, target_alone):
    with httpx.Client(base_url=chunked_hub.url, timeout=120) as client:
        session = open_session(client)
        long_prompt = prompt(30, 900)
        with contextlib.suppress(httpx.ReadTimeout):  # gives up while the prompt goes in (or just after)
            client.post(f"/v1/sessions/{session}/feed", json={"tokens": long_prompt}, timeout=0.05)
        # Its session answers again (after at most the chunk that was on the device), and what it
        # holds is the whole prompt it was sent: the next pass brings in the rest.
        assert generate(client, session, [], 6) == target_alone.decode(long_prompt, 6)


def test_a_prompt_over_the_context_is_refused_before_any_work(chunked_hub):
    with httpx.Client(base_url=chunked_hub.url, timeout=30) as client:
        session = open_session(client)
        limit = client.get("/v1/info").json()["max_context"]
        answer = client.post(f"/v1/sessions/{session}/feed", json={"tokens": [5] * (limit + 1)})
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "context_too_long"
        assert str(limit) in answer.json()["error"]["message"]
        kept = client.post(f"/v1/sessions/{session}/feed", json={"tokens": [5, 6]})
        assert kept.json()["context_len"] == 2  # nothing of the refused prompt was taken


def test_a_verify_or_generation_bringing_a_prompt_over_the_context_is_refused_before_any_work(chunked_hub):
    with httpx.Client(base_url=chunked_hub.url, timeout=30) as client:
        session = open_session(client)
        limit = client.get("/v1/info").json()["max_context"]
        client.post(f"/v1/sessions/{session}/feed", json={"tokens": [5, 6, 7]})
        too_long = [5] * (limit - 2)  # with the 3 already in, one past the limit
        refusals = [
            client.post(f"/v1/sessions/{session}/verify", json={"tokens": too_long, "draft": []}),
            client.post(f"/v1/sessions/{session}/generate", json={"tokens": too_long, "max_tokens": 1}),
        ]
        for answer in refusals:
            assert answer.status_code == 422 and answer.json()["error"]["code"] == "context_too_long", answer.text
        kept = client.post(f"/v1/sessions/{session}/feed", json={"tokens": [8]})
        assert kept.json()["context_len"] == 4  # nothing of the refused prompts was taken


def test_the_measured_budget_gives_a_steps_prompts_about_one_verify_pass():
    budget = PromptBudget()
    assert budget([]) == FIRST_PROMPT_TOKENS  # nothing timed yet
    budget.record_verify(0.300)
    budget.record_chunk(128, 0.400)  # 3.125 ms a token, its fixed part included
    assert budget([]) in (95, 96)  # 300 ms of prompt (float rounding)
    for _ in range(50):
        budget.record_chunk(128, 0.0128)  # tokens turn cheap: the estimate may double, no more
    assert budget([]) == 256
    fixed = PromptBudget(max_pass_tokens=100)
    assert fixed([VerifyJob(None, [1], [2, 3], [-1, 0], 0.0, 0, frozenset())]) == 97  # the verify's 3 tokens first

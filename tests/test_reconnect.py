"""A hub that dies mid-reply and comes back: the reply goes on and equals an uninterrupted one."""

from __future__ import annotations

import threading

import pytest

from specedge_cli.decoding import Conversation, DecodeSettings
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.errors import HubUnreachable
from specedge_cli.remote.client import HubClient
from tests.conftest import RunningHub
from tests.test_lossless import plain_template

PROMPTS = ["once upon a time there was", "the cat sat on"]


@pytest.fixture
def own_hub(tiny, tmp_path):
    running = RunningHub(tiny.hf_dir, tmp_path / "hub", "--max-draft-tokens", "16")
    yield running
    running.stop()


def restart_later(hub: RunningHub, tiny, tmp_path, started: list) -> threading.Thread:
    """Kill the hub now (SIGKILL: no goodbye) and start a new one on the same port in the background."""
    hub.process.kill()
    hub.process.wait()
    port = int(hub.url.rsplit(":", 1)[1])
    thread = threading.Thread(
        target=lambda: started.append(
            RunningHub(tiny.hf_dir, tmp_path / "hub-again", "--max-draft-tokens", "16", port=port)
        )
    )
    thread.start()
    return thread


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_reply_survives_a_hub_restart_and_equals_target_alone(temperature, tiny, own_hub, target_alone, tmp_path):
    engine = DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2)
    settings = DecodeSettings(max_tokens=60, temperature=temperature, seed=7, draft_len=3)
    stop = frozenset(engine.stop_token_ids())
    started: list[RunningHub] = []
    rounds = {"n": 0}

    def kill_after_two_rounds(tokens):
        rounds["n"] += 1
        if rounds["n"] == 2:
            restart_later(own_hub, tiny, tmp_path, started)

    with HubClient(own_hub.url) as client:
        conversation = Conversation(engine, client, plain_template(engine), settings)
        try:
            first = conversation.ask(PROMPTS[0], on_tokens=kill_after_two_rounds)
            assert conversation.reconnects >= 1
            second = conversation.ask(PROMPTS[1])  # the new session holds the whole conversation
        finally:
            conversation.close()
            for hub in started:
                hub.stop()
    sampling = {"temperature": temperature, "seed": 7}
    assert first.token_ids == target_alone.decode(first.prompt_token_ids, 60, stop, **sampling)
    before_second = first.prompt_token_ids + first.token_ids
    assert second.token_ids == target_alone.decode(before_second + second.prompt_token_ids, 60, stop, **sampling)


def test_a_hub_that_stays_away_is_reported_after_bounded_retries(tiny, own_hub):
    engine = DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=2)
    settings = DecodeSettings(max_tokens=30, draft_len=2, reconnect_s=1.5)

    def kill_hub(tokens):
        own_hub.process.kill()
        own_hub.process.wait()

    with HubClient(own_hub.url) as client:
        conversation = Conversation(engine, client, plain_template(engine), settings)
        first = conversation.ask("hello")
        with pytest.raises(HubUnreachable, match="did not come back.*specedge chat --continue"):
            conversation.ask("anyone there?", on_tokens=kill_hub)
    # The half reply is forgotten: what is kept is what a resumed conversation would feed.
    assert [turn.token_ids for turn in conversation.turns] == [first.token_ids]
    assert conversation.history == first.prompt_token_ids + first.token_ids

"""A hub that dies mid-reply and comes back: the reply goes on and equals an uninterrupted one."""

from __future__ import annotations

import io
import threading

import pytest

from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.errors import HubUnreachable
from specedge_cli.history import ConversationLog, History
from specedge_cli.remote.client import HubClient
from specedge_cli.remote.session import ReconnectNotice
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
    # a generous window: a hub restarting on a loaded machine may take minutes to load again
    settings = DecodeSettings(max_tokens=60, temperature=temperature, seed=7, draft_len=3, reconnect_s=600)
    stop = frozenset(engine.vocab.stop_token_ids())
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


def test_a_hub_that_stays_away_is_reported_and_the_accepted_tokens_are_kept(tiny, own_hub, target_alone, tmp_path):
    engine = DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=2)
    settings = DecodeSettings(max_tokens=30, draft_len=2, reconnect_s=1.5)
    history = History(tmp_path / "logs.db")
    notices = io.StringIO()  # not a terminal: the outage is one line, however many attempts

    def kill_hub(tokens):
        own_hub.process.kill()
        own_hub.process.wait()

    with HubClient(own_hub.url) as client:
        conversation = Conversation(
            engine, client, plain_template(engine), settings, on_reconnect=ReconnectNotice(notices)
        )
        conversation.log = ConversationLog(history, "tiny", own_hub.url, "", conversation.vocab_fingerprint())
        first = conversation.ask("hello")
        with pytest.raises(HubUnreachable, match="did not come back.*specedge chat --continue"):
            conversation.ask("anyone there?", on_tokens=kill_hub)
    assert notices.getvalue().strip().splitlines() == [
        "hub unreachable; reconnecting (attempt 1, retrying for up to 2 s)"
    ]
    assert conversation.reconnects >= 2
    # The tokens accepted before the outage are kept: in the conversation, in the log, and so in
    # the context `specedge chat --continue` feeds; they are the target's own tokens.
    cut = conversation.turns[-1]
    assert len(conversation.turns) == 2 and cut.interrupted and cut.token_ids
    stop = frozenset(engine.vocab.stop_token_ids())
    before = first.prompt_token_ids + first.token_ids
    assert cut.token_ids == target_alone.decode(before + cut.prompt_token_ids, 30, stop)[: len(cut.token_ids)]
    saved = history.load(conversation.log.conversation_id)
    assert [(t.prompt, t.token_ids, t.interrupted) for t in saved.turns] == [
        ("hello", first.token_ids, False),
        ("anyone there?", cut.token_ids, True),
    ]
    assert saved.turns[1].reply == cut.reply != ""


class KillingLog(ConversationLog):
    """A conversation log that kills the hub as the second prompt is written, before it is sent."""

    def __init__(self, hub: RunningHub, *args):
        super().__init__(*args)
        self.doomed_hub, self.prompts = hub, 0

    def prompt_sent(self, turn):
        super().prompt_sent(turn)
        self.prompts += 1
        if self.prompts == 2:
            self.doomed_hub.process.kill()
            self.doomed_hub.process.wait()


def test_a_prompt_the_outage_left_unanswered_stays_in_the_context(tiny, own_hub, target_alone, tmp_path):
    engine = DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=2)
    settings = DecodeSettings(max_tokens=20, draft_len=2, reconnect_s=1.0)
    history = History(tmp_path / "logs.db")
    with HubClient(own_hub.url) as client:
        conversation = Conversation(engine, client, plain_template(engine), settings, on_reconnect=lambda event: None)
        conversation.log = KillingLog(own_hub, history, "tiny", own_hub.url, "", conversation.vocab_fingerprint())
        first = conversation.ask("hello")
        with pytest.raises(HubUnreachable):
            conversation.ask("are you there?")
    saved = history.load(conversation.log.conversation_id)
    assert [(t.prompt, t.token_ids) for t in saved.turns] == [("hello", first.token_ids), ("are you there?", [])]
    # `--continue` on a hub that is back: the unanswered prompt is part of what the new session holds.
    again = RunningHub(tiny.hf_dir, tmp_path / "hub-again", "--max-draft-tokens", "16")
    try:
        with HubClient(again.url) as client:
            resumed = Conversation(engine, client, plain_template(engine), settings)
            resumed.restore(saved.turns)
            reply = resumed.ask("hello again")
            resumed.close()
    finally:
        again.stop()
    context = [t for turn in saved.turns for t in turn.prompt_token_ids + turn.token_ids]
    assert saved.turns[1].prompt_token_ids and context[-len(saved.turns[1].prompt_token_ids) :] == (
        saved.turns[1].prompt_token_ids
    )
    stop = frozenset(engine.vocab.stop_token_ids())
    assert reply.token_ids == target_alone.decode(context + reply.prompt_token_ids, 20, stop)

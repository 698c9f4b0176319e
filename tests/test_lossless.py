"""Decoding through a real hub on loopback equals the target decoding alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote.client import HubClient

PROMPTS = ["the cat sat on", "once upon a time there was", "numbers: one two three"]


def plain_template(engine: DraftEngine) -> ChatTemplate:
    bos = engine.vocab.detokenize([engine.vocab.bos_token_id], special=True).decode()
    return ChatTemplate(BUILTIN_TEMPLATES["plain"], bos_token=bos, eos_token="")


@pytest.fixture(scope="module")
def drafts(tiny, unrelated):
    return {
        "perfect": DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=2),
        "imperfect": DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2),
        "unrelated": DraftEngine(unrelated.gguf_f32, n_ctx=1024, n_threads=2),
    }


def chat_turns(engine, hub, settings, prompts, system=""):
    """Run a multi-turn chat; yields (history before the turn, reply) per turn."""
    with HubClient(hub.url) as client:
        conversation = Conversation(engine, client, plain_template(engine), settings, system)
        session_ids = set()
        for prompt in prompts:
            before = list(conversation.history)
            reply = conversation.ask(prompt)
            assert conversation.history == before + reply.prompt_token_ids + reply.token_ids
            session_ids.add(conversation.session_id)
            # One hub session serves the whole chat: a round never reopens it and re-sends the history.
            assert len(session_ids) == 1 and conversation.reconnects == 0
            yield before, reply
        conversation.close()


SHAPES = {  # all but the last draft proactively while each verify is in flight
    "chain": DecodeSettings(max_tokens=40, temperature=0.0, draft_len=6),
    "tree": DecodeSettings(max_tokens=40, temperature=0.0, draft_len=6, tree_budget=12, tree_width=3),
    "auto-chain": DecodeSettings(max_tokens=40, temperature=0.0),
    "auto-tree": DecodeSettings(max_tokens=40, temperature=0.0, tree_budget=12, tree_width=3),
    "chain-not-proactive": DecodeSettings(max_tokens=40, temperature=0.0, draft_len=6, proactive=False),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["perfect", "imperfect", "unrelated"])
def test_greedy_multi_turn_equals_target_alone(kind, shape, drafts, hub, target_alone):
    engine = drafts[kind]
    settings = SHAPES[shape]
    stop = frozenset(engine.vocab.stop_token_ids())
    accepted = rounds = hits = drafted = 0
    for before, reply in chat_turns(engine, hub, settings, PROMPTS, system="be brief"):
        expected = target_alone.decode(before + reply.prompt_token_ids, 40, stop)
        assert reply.token_ids == expected
        accepted += reply.stats.accepted_tokens
        drafted += reply.stats.draft_tokens
        rounds += reply.stats.verify_rounds
        hits += reply.stats.proactive_hits
    # The three drafts must exercise what they are meant to: full, partial and near-zero acceptance.
    # (An automatic depth follows this machine's timings, so only fixed depths bound tokens per verify.)
    accepted_per_verify = accepted / rounds
    if kind == "perfect":
        assert accepted_per_verify > (2 if settings.draft_len else 0.5)
        if not settings.tree_budget:
            assert accepted / drafted > 0.8
        assert (hits > 0) == settings.proactive  # proactive drafts were sent, so the path is exercised
    elif kind == "unrelated":
        assert accepted_per_verify < 1


def test_later_turns_send_only_their_own_tokens(drafts, hub):
    engine = drafts["perfect"]
    turns = list(chat_turns(engine, hub, DecodeSettings(max_tokens=8), PROMPTS[:2]))
    (_, first), (before_second, second) = turns
    assert second.prompt_token_ids[0] != engine.vocab.bos_token_id
    assert len(before_second) == len(first.prompt_token_ids) + len(first.token_ids)
    assert "User: " + PROMPTS[1] in engine.vocab.detokenize(second.prompt_token_ids).decode()


@pytest.mark.parametrize("tree_budget", [0, 10])
@pytest.mark.parametrize("kind", ["perfect", "imperfect"])
def test_seeded_sampling_is_reproducible_and_equals_target_sampling(drafts, hub, target_alone, tree_budget, kind):
    engine = drafts[kind]
    settings = DecodeSettings(max_tokens=30, temperature=0.9, seed=1234, draft_len=5, tree_budget=tree_budget)
    stop = frozenset(engine.vocab.stop_token_ids())
    runs = [[reply for _, reply in chat_turns(engine, hub, settings, PROMPTS[:2])] for _ in range(2)]
    assert [r.token_ids for r in runs[0]] == [r.token_ids for r in runs[1]]
    first = runs[0][0]
    assert first.token_ids == target_alone.decode(first.prompt_token_ids, 30, stop, temperature=0.9, seed=1234)
    if kind == "perfect" and not tree_budget:  # the draft samples with the hub's position-keyed uniform
        assert first.stats.acceptance > 0.9  # so the same model draws the same tokens


def test_sampled_tokens_follow_the_target_distribution(drafts, hub, target_alone):
    """Chi-square goodness of fit of the first sampled token over 400 seeds.

    Test level alpha = 0.001: a correct implementation fails this test once in a thousand runs.
    The seeds are fixed, so in practice the outcome is deterministic for a given model.
    """
    engine = drafts["perfect"]
    temperature, n_seeds = 1.5, 400
    prompt_ids = None
    counts: dict[int, int] = {}
    for seed in range(n_seeds):
        settings = DecodeSettings(max_tokens=2, temperature=temperature, seed=seed, draft_len=1)
        ((_, reply),) = chat_turns(engine, hub, settings, [PROMPTS[0]])
        prompt_ids = reply.prompt_token_ids
        counts[reply.token_ids[0]] = counts.get(reply.token_ids[0], 0) + 1
    probs = torch.softmax(target_alone.next_logits(prompt_ids).double() / temperature, dim=-1).numpy()
    observed, expected = _binned(counts, probs, n_seeds)
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 0.001, (p_value, observed, expected)


def _binned(counts: dict[int, int], probs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens expected at least 5 times get a bin each; the rest share one bin."""
    expected = probs * n
    big = np.flatnonzero(expected >= 5)
    observed = [counts.get(int(t), 0) for t in big]
    expected_big = list(expected[big])
    rest_observed = n - sum(observed)
    rest_expected = n - sum(expected_big)
    if rest_expected > 0:
        observed.append(rest_observed)
        expected_big.append(rest_expected)
    return np.array(observed, dtype=float), np.array(expected_big)

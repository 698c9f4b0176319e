"""Structured output verified at the hub, and the target's logprobs: every reply under a grammar equals
the target alone decoded under the same grammar (llguidance's mask applied to plain transformers
logits), greedy and seeded, chains and trees; logprobs are log_softmax of the target alone's logits.

The reference decodes with llguidance's own matcher and numpy mask kernel, so it shares only the
grammar's tokenizer (`grammar_tokenizer`: the vocabulary's bytes) with the code under test.
"""

from __future__ import annotations

import json
import secrets
import threading
import time

import httpx
import llguidance
import llguidance.numpy
import numpy as np
import pytest
import torch

from hub_server.engine.sampling import sample_row
from hub_server.tree import position_uniform
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.errors import HubRejected
from specedge_cli.remote.client import HubClient
from specedge_common.grammar import (
    Constraint,
    grammar_tokenizer,
    json_schema_grammar,
    prepare_grammar_tokenizer,
    token_bytes,
)
from tests.conftest import hub_of_commit
from tests.test_lossless import plain_template

# Enums, a boolean and a bounded integer: a random model's reply under it ends within a few tokens.
PAINT = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "glossy": {"type": "boolean"},
        "coats": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["color", "glossy", "coats"],
    "additionalProperties": False,
}
PROMPTS = ["paint the fence", "numbers: one two three"]
SHAPES = {
    "chain": DecodeSettings(max_tokens=48, draft_len=6),
    "tree": DecodeSettings(max_tokens=48, draft_len=6, tree_budget=12, tree_width=3),
    "auto-chain": DecodeSettings(max_tokens=48),
}
# A hub that speaks protocol version 2 (no grammars, no logprobs): the last commit before the engine
# ran in a process of its own, whose link needed a package (pyzmq) the project no longer installs.
VERSION_2_HUB = "cdfb612"


@pytest.fixture(scope="module")
def drafts(tiny):
    return {
        "perfect": DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=2),
        "imperfect": DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2),
    }


def tokenizer_of(engine: DraftEngine):
    return grammar_tokenizer(engine.vocab.fingerprint(), engine.vocab.pieces(), engine.vocab.stop_token_ids())


def target_under_grammar(
    target, engine: DraftEngine, context: list[int], grammar: str, max_tokens: int, temperature=0.0, seed=0
) -> list[int]:
    """The target alone, every token drawn from its logits with llguidance's mask applied."""
    matcher = llguidance.LLMatcher(tokenizer_of(engine), grammar, log_level=0)
    bitmask = llguidance.numpy.allocate_token_bitmask(1, engine.vocab.size)
    stops = frozenset(engine.vocab.stop_token_ids())
    context, out = list(context), []
    while len(out) < max_tokens:
        logits = target.next_logits(context).numpy().copy()[None, :]
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
        llguidance.numpy.apply_token_bitmask_inplace(logits, bitmask)
        row = torch.from_numpy(logits[0])
        token = (
            int(row.argmax())
            if temperature == 0
            else sample_row(row, temperature, position_uniform(seed, len(context)))
        )
        assert matcher.consume_token(token), matcher.get_error()
        context.append(token)
        out.append(token)
        if token in stops:
            break
    return out


def ask_all(engine, hub, settings, prompts):
    """(context before the reply, reply) for each prompt of one conversation."""
    with HubClient(hub.url) as client:
        conversation = Conversation(engine, client, plain_template(engine), settings)
        for prompt in prompts:
            before = list(conversation.history)
            reply = conversation.ask(prompt)
            yield before + reply.prompt_token_ids, reply
        conversation.close()


# --- the grammar's tokens, and its masks along a draft ------------------------------------------------
def test_token_bytes_read_both_kinds_of_vocabulary():
    spm = ["<unk>", "<s>", "</s>", "<0x0A>", "▁the", "cat", "<start_of_turn>", "<div>"]
    assert token_bytes(spm) == [
        b"\xff<unk>",
        b"\xff<s>",
        b"\xff</s>",
        b"\n",
        b" the",
        b"cat",
        b"\xff<start_of_turn>",
        b"<div>",
    ]
    byte_level = ["Ġthe", "Ċ", "cat", "<|im_end|>", "Ã©"]
    assert token_bytes(byte_level) == [b" the", b"\n", b"cat", b"\xff<|im_end|>", "é".encode()]


def test_a_grammar_tokenizer_prepared_in_the_background_is_the_one_a_reply_then_takes():
    built_on: list[str] = []

    def pieces() -> list[str]:
        built_on.append(threading.current_thread().name)
        return ["<|end|>", "a", "b", "ab"]

    fingerprint = f"prepared-{secrets.token_hex(4)}"  # a vocabulary no other test builds
    prepare_grammar_tokenizer(fingerprint, pieces, [0])
    prepare_grammar_tokenizer(fingerprint, pieces, [0])  # once a process
    deadline = time.monotonic() + 30
    while not built_on and time.monotonic() < deadline:  # its build has started (and holds the cache)
        time.sleep(0.01)
    tokenizer = grammar_tokenizer(fingerprint, lambda: pytest.fail("built a second time"), [0])
    assert built_on == ["grammar-vocabulary"] and tokenizer.vocab_size == 4 and tokenizer.eos_tokens == [0]


def test_a_drafts_masks_are_the_masks_after_each_of_its_paths(drafts, target_alone):
    engine = drafts["perfect"]
    grammar = json_schema_grammar(PAINT)
    context = engine.vocab.tokenize("paint", add_bos=True)
    reply = target_under_grammar(target_alone, engine, context, grammar, 12)
    # A tree along the reply with wrong siblings at each level (some the grammar forbids).
    draft, parents, parent = [], [], -1
    for token in reply[:8]:
        for sibling in (token, (token + 7) % engine.vocab.size):
            draft.append(sibling)
            parents.append(parent)
        parent = len(draft) - 2
    constraint = Constraint(tokenizer_of(engine), grammar, start=len(context))
    constraint.advance(context)
    masks = constraint.tree_masks(draft, parents)
    matcher = llguidance.LLMatcher(tokenizer_of(engine), grammar, log_level=0)
    stops = frozenset(engine.vocab.stop_token_ids())
    checked = 0
    for node in range(-1, len(draft)):
        path, at = [], node
        while at >= 0:
            path.insert(0, draft[at])
            at = parents[at]
        expected = mask_after(matcher, path, stops)
        if expected is not None:  # else a node the grammar forbids: its row is never read
            assert np.array_equal(masks[node + 1], expected), node
            checked += 1
    assert checked > len(reply[:8])  # the reply's own path, and some siblings
    assert constraint.consumed == 0  # the masks left the grammar where the context is


def mask_after(matcher, path: list[int], stops: frozenset[int]) -> np.ndarray | None:
    """llguidance's mask after `path`, each of whose tokens its mask allowed; None if one was not."""
    matcher.reset()
    for token in path:
        allowed = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        if not allowed[token] or token in stops:
            return None
        assert matcher.consume_token(token)
    return np.frombuffer(matcher.compute_bitmask(), dtype=np.int32)


# --- lossless under the grammar -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["perfect", "imperfect"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_replies_under_a_schema_equal_the_target_alone_under_it(kind, shape, temperature, drafts, hub, target_alone):
    engine, grammar = drafts[kind], json_schema_grammar(PAINT)
    settings = DecodeSettings(**{**vars(SHAPES[shape]), "grammar": grammar, "temperature": temperature, "seed": 5})
    for context, reply in ask_all(engine, hub, settings, PROMPTS):
        expected = target_under_grammar(target_alone, engine, context, grammar, 48, temperature, 5)
        assert reply.token_ids == expected
        assert reply.finish_reason == "stop"  # the grammar ends the reply with a stop token
        value = json.loads(reply.text)
        assert value["color"] in ("red", "green", "blue") and isinstance(value["glossy"], bool)
        if kind == "perfect" and shape == "chain":
            assert reply.stats.accepted_tokens > reply.stats.verify_rounds  # the draft drafts under the grammar


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_any_json_object_equals_the_target_alone_under_it(temperature, drafts, hub, target_alone):
    engine, grammar = drafts["imperfect"], json_schema_grammar({"type": "object"})
    settings = DecodeSettings(max_tokens=40, draft_len=4, tree_budget=8, tree_width=2, grammar=grammar)
    settings = DecodeSettings(**{**vars(settings), "temperature": temperature})
    for context, reply in ask_all(engine, hub, settings, PROMPTS[:1]):
        assert reply.token_ids == target_under_grammar(target_alone, engine, context, grammar, 40, temperature)
        assert reply.text.startswith("{")


# --- logprobs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("grammar", [False, True])
def test_logprobs_are_the_targets_own(grammar, drafts, hub, target_alone):
    engine = drafts["imperfect"]
    schema = json_schema_grammar(PAINT) if grammar else ""
    settings = DecodeSettings(max_tokens=24, draft_len=5, top_logprobs=3, grammar=schema)
    for context, reply in ask_all(engine, hub, settings, PROMPTS[:1]):
        assert len(reply.logprobs) == len(reply.token_ids)
        for at, (token, given) in enumerate(zip(reply.token_ids, reply.logprobs)):
            # Before temperature and grammar, as OpenAI reports them.
            expected = torch.log_softmax(target_alone.next_logits(context + reply.token_ids[:at]).double(), dim=-1)
            assert given.logprob == pytest.approx(float(expected[token]), abs=1e-4)
            top = torch.topk(expected, 3)
            assert given.top_tokens == top.indices.tolist()
            assert given.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)


def test_answers_carry_no_logprobs_unless_asked(hub):
    info = httpx.get(f"{hub.url}/v1/info").json()
    body = {"protocol_version": 3, "vocab_size": info["vocab_size"], "vocab_fingerprint": info["vocab_fingerprint"]}
    session = httpx.post(f"{hub.url}/v1/sessions", json=body).json()["session_id"]
    verify = httpx.post(f"{hub.url}/v1/sessions/{session}/verify", json={"tokens": [1, 5, 6], "draft": [7]}).json()
    assert set(verify) == {"accepted", "tokens", "context_len", "verify_ms"}  # token ids only


# --- what a hub refuses, and an older hub ---------------------------------------------------------------
def test_the_hub_refuses_what_it_cannot_apply(drafts, hub):
    engine = drafts["imperfect"]
    vocab = {"vocab_size": engine.vocab.size, "vocab_fingerprint": engine.vocab.fingerprint(), "stop_token_ids": [2]}
    grammar = json_schema_grammar(PAINT)

    def refused(body: dict, why: str) -> None:
        answer = httpx.post(f"{hub.url}/v1/sessions", json={"protocol_version": 3, **vocab, **body})
        assert answer.status_code == 422 and why in answer.json()["error"]["message"], answer.text

    refused({"protocol_version": 2, "constraint": {"grammar": grammar, "start": 0}}, "came in protocol version 3")
    refused({"constraint": {"grammar": "start: (", "start": 0}}, "cannot be compiled")
    refused({"constraint": {"grammar": grammar, "start": 0}, "stop_token_ids": []}, "needs stop_token_ids")
    refused({"top_logprobs": 21}, "top_logprobs")
    opened = httpx.post(
        f"{hub.url}/v1/sessions", json={"protocol_version": 3, **vocab, "constraint": {"grammar": grammar, "start": 2}}
    )
    session = opened.json()["session_id"]
    fed = httpx.post(f"{hub.url}/v1/sessions/{session}/feed", json={"tokens": [1, 5, ord("x") + 3]})
    assert fed.status_code == 422 and "breaks the session's grammar" in fed.json()["error"]["message"]
    fed = httpx.post(f"{hub.url}/v1/sessions/{session}/feed", json={"tokens": [1, 5]})
    assert fed.status_code == 200  # the refused feed left the session as it was


@pytest.fixture(scope="module")
def version_2_hub(tiny, tmp_path_factory):
    """The hub as it was before grammars, run from that commit's files."""
    yield from hub_of_commit(VERSION_2_HUB, tiny, tmp_path_factory.mktemp("version-2-hub"))


def test_an_older_hub_is_never_asked_for_an_unconstrained_reply(version_2_hub, drafts, target_alone):
    engine = drafts["imperfect"]
    with HubClient(version_2_hub.url) as client:
        assert client.info().protocol_version == 2
        conversation = Conversation(
            engine, client, plain_template(engine), DecodeSettings(max_tokens=8, grammar=json_schema_grammar(PAINT))
        )
        with pytest.raises(HubRejected, match="protocol version 2.*need version 3") as refused:
            conversation.ask("paint the fence")
        assert refused.value.code == "hub_lacks_grammars"
        conversation.change_settings(DecodeSettings(max_tokens=8))  # plain replies still go to it
        reply = conversation.ask("paint the fence")
        assert reply.token_ids == target_alone.decode(
            reply_context(conversation, reply), 8, frozenset(engine.vocab.stop_token_ids())
        )
        conversation.close()


def reply_context(conversation: Conversation, reply) -> list[int]:
    return conversation.history[: len(conversation.history) - len(reply.token_ids)]

"""Structured outputs and logprobs on `specedge serve`, as real clients ask for them: the openai SDK's
`chat.completions.parse` with a pydantic model, LangChain's `with_structured_output` (its default
method, json_schema) and litellm, against a real `specedge serve` and a real hub on loopback. Every
reply equals the target alone decoded under the same grammar (tests/test_grammar.py's reference).
"""

from __future__ import annotations

import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, Field

from specedge_cli.serve.structured import reply_grammar
from tests.test_grammar import PAINT, target_under_grammar
from tests.test_serve import API_KEY, model_id, reference, served  # noqa: F401  (fixtures)

ASK = [{"role": "user", "content": "paint the fence"}]


class Paint(BaseModel):
    color: Literal["red", "green", "blue"]
    glossy: bool
    coats: int = Field(ge=0, le=99)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "paint", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def expected(reference, target_alone):  # noqa: F811
    """The target alone's reply to ASK under the PAINT schema, and its context (via a chat's layout)."""
    from specedge_cli.decoding import DecodeSettings

    conversation = reference(DecodeSettings(max_tokens=64))
    context = conversation.engine.vocab.tokenize(conversation.template.first_turn_text(ASK, None), add_bos=False)
    grammar = reply_grammar(schema_format(PAINT), None)
    tokens = target_under_grammar(target_alone, conversation.engine, context, grammar, 64)
    stops = conversation.stop_token_ids
    text = conversation.engine.vocab.detokenize([t for t in tokens if t not in stops]).decode()
    return context, tokens, text


def test_a_json_schema_reply_is_the_target_alone_under_the_schema(served, model_id, expected):  # noqa: F811
    context, tokens, text = expected
    answer = served.client().chat.completions.create(
        model=model_id, messages=ASK, response_format=schema_format(PAINT), max_tokens=64, temperature=0
    )
    assert answer.choices[0].message.content == text
    assert answer.usage.prompt_tokens == len(context) and answer.usage.completion_tokens == len(tokens)
    assert answer.choices[0].finish_reason == "stop"
    Paint.model_validate_json(text)


def test_the_openai_sdks_parse_gets_the_pydantic_object(served, model_id, expected):  # noqa: F811
    parsed = served.client().chat.completions.parse(
        model=model_id, messages=ASK, response_format=Paint, max_tokens=64, temperature=0
    )
    # The SDK's strict schema of Paint (titles, "type": "string" on the enum) is the same grammar.
    assert parsed.choices[0].message.parsed == Paint.model_validate_json(expected[2])


def test_langchain_with_structured_output_and_litellm_get_the_object(served, model_id, expected):  # noqa: F811
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=model_id, base_url=f"{served.url}/v1", api_key=API_KEY, temperature=0, max_tokens=64, max_retries=0
    )
    assert chat.with_structured_output(Paint).invoke(ASK[0]["content"]) == Paint.model_validate_json(expected[2])

    import litellm

    answer = litellm.completion(
        model=f"openai/{model_id}",
        api_base=f"{served.url}/v1",
        api_key=API_KEY,
        messages=ASK,
        response_format=Paint,
        max_tokens=64,
        temperature=0,
    )
    assert json.loads(answer.choices[0].message.content) == json.loads(expected[2])


def test_json_object_replies_are_json(served, model_id, reference, target_alone):  # noqa: F811
    answer = served.client().chat.completions.create(
        model=model_id, messages=ASK, response_format={"type": "json_object"}, max_tokens=24, temperature=0
    )
    assert answer.choices[0].message.content.startswith("{")


def test_logprobs_are_the_targets_in_chat_and_completions(served, model_id, expected, target_alone):  # noqa: F811
    context, tokens, text = expected
    request = {
        "model": model_id,
        "messages": ASK,
        "response_format": schema_format(PAINT),
        "max_tokens": 64,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    answer = served.client().chat.completions.create(**request)
    content = answer.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == text
    for at, entry in enumerate(content):
        logprobs = torch.log_softmax(target_alone.next_logits(context + tokens[:at]).double(), dim=-1)
        assert entry.logprob == pytest.approx(float(logprobs[tokens[at]]), abs=1e-4)
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(
            torch.topk(logprobs, 2).values.tolist(), abs=1e-4
        )
    chunks = served.client().chat.completions.create(**request, stream=True)
    pieces = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].logprobs]
    # Each piece carries the logprobs of the tokens whose text it carries (the JSON is ASCII: each
    # token's text is whole), and the reply comes in more than one piece.
    assert all("".join(e.token for e in piece.logprobs.content) == piece.delta.content for piece in pieces)
    assert sum(bool(piece.delta.content) for piece in pieces) > 1
    assert_same_logprobs([entry for piece in pieces for entry in piece.logprobs.content], content)
    completion = served.client().completions.create(model=model_id, prompt="the cat", max_tokens=6, logprobs=1)
    given = completion.choices[0].logprobs
    assert len(given.token_logprobs) == completion.usage.completion_tokens == len(given.tokens)
    assert "".join(given.tokens) == completion.choices[0].text
    streamed = served.client().completions.create(
        model=model_id, prompt="the cat", max_tokens=6, logprobs=1, stream=True
    )
    parts = [chunk.choices[0].logprobs for chunk in streamed if chunk.choices[0].logprobs]
    assert [token for part in parts for token in part.tokens] == given.tokens
    assert [offset for part in parts for offset in part.text_offset] == given.text_offset
    plain = served.client().chat.completions.create(model=model_id, messages=ASK, max_tokens=4)
    assert plain.choices[0].logprobs is None


def assert_same_logprobs(streamed, sent) -> None:
    """The same tokens and top tokens; their logprobs as the passes that computed them rounded
    (another pass, another batch: equal within float error, not bit for bit)."""
    assert [(entry.token, [top.token for top in entry.top_logprobs]) for entry in streamed] == [
        (entry.token, [top.token for top in entry.top_logprobs]) for entry in sent
    ]
    for got, given in zip(streamed, sent):
        assert got.logprob == pytest.approx(given.logprob, abs=1e-4)
        assert [top.logprob for top in got.top_logprobs] == pytest.approx(
            [top.logprob for top in given.top_logprobs], abs=1e-4
        )


def test_responses_report_the_targets_logprobs_streamed_and_not(served, model_id, expected, target_alone):  # noqa: F811
    context, tokens, text = expected
    paint = {"type": "json_schema", "name": "paint", "schema": PAINT, "strict": True}
    ask = {
        "model": model_id,
        "input": ASK,
        "text": {"format": paint},
        "max_output_tokens": 64,
        "temperature": 0,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
    }
    response = served.client().responses.create(**ask)
    assert response.output_text == text and response.top_logprobs == 2
    given = response.output[0].content[0].logprobs
    assert "".join(entry.token for entry in given) == text
    for at, entry in enumerate(given):
        logprobs = torch.log_softmax(target_alone.next_logits(context + tokens[:at]).double(), dim=-1)
        assert entry.logprob == pytest.approx(float(logprobs[tokens[at]]), abs=1e-4)
        assert bytes(entry.bytes) == entry.token.encode()
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx(
            torch.topk(logprobs, 2).values.tolist(), abs=1e-4
        )
    events = list(served.client().responses.create(**ask, stream=True))
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    assert all("".join(e.token for e in delta.logprobs) == delta.delta for delta in deltas) and len(deltas) > 1
    assert_same_logprobs([entry for delta in deltas for entry in delta.logprobs], given)
    done = next(event for event in events if event.type == "response.output_text.done")
    assert [entry.token for entry in done.logprobs] == [entry.token for entry in given]
    assert_same_logprobs(events[-1].response.output[0].content[0].logprobs, given)

    plain = served.client().responses.create(**{**ask, "include": None, "top_logprobs": 2})
    assert plain.output_text == text and plain.output[0].content[0].logprobs == []

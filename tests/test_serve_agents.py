"""Structured-output libraries that people point at a local OpenAI endpoint, against a real `specedge
serve` and a real hub on loopback: instructor (JSON schema and tools modes) and pydantic-ai (an Agent
with a pydantic output type). Each gets its pydantic object, and the reply it was built from is the
target alone decoded under the grammar of the request the library sent (recorded on the wire), so
whatever a library asks for, the answer is lossless. instructor is not a test dependency (its release
and the pinned openai SDK want different jiter versions): its tests run where it is installed beside.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from specedge_cli.serve.structured import reply_grammar
from specedge_cli.serve.tools import read_calls, tool_use
from tests.test_grammar import target_under_grammar
from tests.test_serve import API_KEY
from tests.test_serve_tools import _model, _text, draft, tool_draft, tool_served  # noqa: F401  (fixtures)

ASK = "paint the fence"
MAX_TOKENS = 128  # the tiny models' tokens are short: a call of Paint takes ~80


class Paint(BaseModel):
    # No other keys: in a schema that allows them, a random model writes keys until the token limit.
    model_config = ConfigDict(extra="forbid")
    color: Literal["red", "green", "blue"]
    glossy: bool
    coats: int = Field(ge=0, le=99)


class Wire:
    """The chat completions a client sent and the answers it got, as JSON."""

    def __init__(self) -> None:
        self.exchanges: list[tuple[dict, dict]] = []
        self._sent: dict | None = None

    def sync_client(self, served) -> openai.OpenAI:
        hooks = {"request": [self._request], "response": [self._response]}
        http = httpx.Client(event_hooks=hooks)
        return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, http_client=http)

    def async_client(self, served) -> openai.AsyncOpenAI:
        async def request(request: httpx.Request) -> None:
            self._request(request)

        async def response(response: httpx.Response) -> None:
            await response.aread()
            self._response(response)

        http = httpx.AsyncClient(event_hooks={"request": [request], "response": [response]})
        return openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, http_client=http)

    def _request(self, request: httpx.Request) -> None:
        self._sent = json.loads(request.content) if request.url.path.endswith("/chat/completions") else None

    def _response(self, response: httpx.Response) -> None:
        if self._sent is not None:
            response.read()
            self.exchanges.append((self._sent, response.json()))
            self._sent = None

    @property
    def only(self) -> tuple[dict, dict]:
        assert len(self.exchanges) == 1, [sent for sent, _ in self.exchanges]
        return self.exchanges[0]


def target_reply(sent: dict, draft, target_alone) -> str:  # noqa: F811
    """The reply text the target alone writes to a chat completion request: its messages laid out by
    the chat template (with the tools it shows), a call it must make started in its mouth, then every
    token drawn greedily under the request's grammar."""
    engine, template = draft
    uses = tool_use(sent.get("tools"), sent.get("tool_choice"), sent.get("parallel_tool_calls"))
    messages = [{**m, "content": _content(m.get("content"))} for m in sent["messages"]]
    prompt = engine.vocab.tokenize(template.render(messages, tools=uses.shown if uses else None), add_bos=False)
    start = uses.reply_start() if uses else ""
    start_tokens = engine.vocab.tokenize(start, add_bos=False) if start else []
    grammar = reply_grammar(sent.get("response_format"), uses)
    limit = sent.get("max_completion_tokens", sent.get("max_tokens"))
    return start + _text(engine, target_under_grammar(target_alone, engine, prompt + start_tokens, grammar, limit))


def _content(content) -> str:
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content or [])


def served_calls(answer: dict) -> list[tuple[str, str]]:
    calls = answer["choices"][0]["message"].get("tool_calls") or []
    return [(call["function"]["name"], call["function"]["arguments"]) for call in calls]


# --- instructor ---------------------------------------------------------------------------------------
def _instructor():
    return pytest.importorskip(
        "instructor",
        reason="instructor is not a test dependency: its latest release (1.17.0) requires jiter<0.15 and the pinned "
        "openai 3.51.0 jiter>=0.16; installed beside (pip install --no-deps instructor docstring-parser), these run",
    )


def _instructor_paint(served, mode: str) -> tuple[Any, dict, dict]:
    """instructor's Paint through `served` in `mode` (an `instructor.Mode` name), with the one
    request it sent and the answer it got."""
    instructor, wire = _instructor(), Wire()
    client = instructor.from_openai(wire.sync_client(served), mode=getattr(instructor.Mode, mode))
    paint = client.chat.completions.create(
        model=_model(served),
        messages=[{"role": "user", "content": ASK}],
        response_model=Paint,
        max_tokens=MAX_TOKENS,
        temperature=0,
    )
    sent, answer = wire.only
    return paint, sent, answer


def test_instructor_json_schema_mode_gets_the_object_the_target_alone_writes(tool_served, draft, target_alone):  # noqa: F811
    paint, sent, answer = _instructor_paint(tool_served, "JSON_SCHEMA")
    assert sent["response_format"]["type"] == "json_schema"
    expected = target_reply(sent, draft, target_alone)
    assert answer["choices"][0]["message"]["content"] == expected
    assert isinstance(paint, Paint) and paint.model_dump() == Paint.model_validate_json(expected).model_dump()


def test_instructor_tools_mode_gets_the_call_the_target_alone_makes(tool_served, draft, target_alone):  # noqa: F811
    paint, sent, answer = _instructor_paint(tool_served, "TOOLS")
    assert sent["tool_choice"]["type"] == "function"  # a named function: its arguments under its schema
    content, calls = read_calls(target_reply(sent, draft, target_alone))
    assert served_calls(answer) == [(call.name, call.arguments) for call in calls] and not content
    assert paint.model_dump() == Paint.model_validate_json(calls[0].arguments).model_dump()


# --- pydantic-ai --------------------------------------------------------------------------------------
def _agent_model(wire: Wire, served) -> OpenAIChatModel:
    return OpenAIChatModel(_model(served), provider=OpenAIProvider(openai_client=wire.async_client(served)))


def test_pydantic_ai_agent_gets_its_output_from_the_call_the_target_alone_makes(tool_served, draft, target_alone):  # noqa: F811
    wire = Wire()
    agent = Agent(_agent_model(wire, tool_served), output_type=Paint)
    result = asyncio.run(agent.run(ASK, model_settings={"max_tokens": MAX_TOKENS, "temperature": 0}))
    sent, answer = wire.only
    assert sent["tool_choice"] == "required"  # its output tool, which the reply must call
    names = frozenset(tool["function"]["name"] for tool in sent["tools"])
    content, calls = read_calls(target_reply(sent, draft, target_alone), names)
    assert served_calls(answer) == [(call.name, call.arguments) for call in calls]
    assert (answer["choices"][0]["message"]["content"] or "") == content
    assert result.output == Paint.model_validate_json(calls[0].arguments)


def test_pydantic_ai_native_output_gets_the_object_the_target_alone_writes(tool_served, draft, target_alone):  # noqa: F811
    wire = Wire()
    agent = Agent(_agent_model(wire, tool_served), output_type=NativeOutput(Paint))
    result = asyncio.run(agent.run(ASK, model_settings={"max_tokens": MAX_TOKENS, "temperature": 0}))
    sent, answer = wire.only
    assert sent["response_format"]["type"] == "json_schema"
    expected = target_reply(sent, draft, target_alone)
    assert answer["choices"][0]["message"]["content"] == expected
    assert result.output == Paint.model_validate_json(expected)

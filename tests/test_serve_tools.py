"""Tools, fill-in-the-middle and /v1/responses on `specedge serve`, through the openai SDK against a
real `specedge serve` and a real hub on loopback.

The tiny models write random text, so here they show the layout and the losslessness: the tools
reach the model through its chat template (Qwen 2.5's own, carried in a tiny draft's GGUF), a call
the request requires is started in the model's mouth and continued by the target, tool results go
back in as the template lays them out, and every reply equals the target alone after that context.
Reading real calls out of a real model's reply is tested on the Qwen pair (test_serve_qwen.py)
and, on the text a model writes, here.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import ChatTemplate, template_for
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.models import resolve_model
from specedge_cli.remote.client import HubClient
from specedge_cli.serve.structured import call_grammar
from specedge_cli.serve.tools import CallReader, read_calls, tool_use
from tests.test_grammar import PAINT, target_under_grammar
from tests.test_serve import API_KEY, Served, _stop_ids
from tests.tiny_models import write_chat_draft

QWEN_TEMPLATE = (Path(__file__).parent / "qwen2.5_chat_template.jinja").read_text()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tool_draft(tiny_dir, tiny_tokenizer) -> Path:
    """The tiny target's q8_0 draft, its GGUF carrying Qwen 2.5's chat template (which shows tools)."""
    return write_chat_draft(tiny_dir / "qwen-template" / "tiny-q8_0-chat.gguf", QWEN_TEMPLATE, 0, tiny_tokenizer)


@pytest.fixture(scope="module")
def tool_served(tool_draft, hub, tmp_path_factory):
    running = Served(tool_draft, hub.url, tmp_path_factory.mktemp("tools-home"), "--api-key", API_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def plain_served(tiny, hub, tmp_path_factory):
    """A draft whose GGUF has no chat template (plain completion): no tools."""
    running = Served(tiny.gguf_q8, hub.url, tmp_path_factory.mktemp("plain-home"), "--api-key", API_KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def draft(tool_draft):
    engine = DraftEngine(tool_draft, n_ctx=1024, n_threads=1)
    return engine, template_for(engine.vocab, resolve_model(str(tool_draft), Path("unused")))


def _model(served) -> str:
    return served.client().models.list().data[0].id


def _text(engine: DraftEngine, tokens: list[int]) -> str:
    stops = _stop_ids(engine.path)
    return engine.vocab.detokenize([t for t in tokens if t not in stops]).decode("utf-8", "replace")


# --- reading calls out of a model's text ---------------------------------------------------------------
def test_calls_are_read_alike_whole_and_in_any_pieces():
    text = f"Let me look.\n{CALL_TEXT}\n{CALL_TEXT.replace('Paris', 'Oslo')}\n"
    content, calls = read_calls(text)
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Oslo"}),
    ]
    for size in (1, 2, 3, 5, 11):
        reader, pieces = CallReader(), []
        for at in range(0, len(text), size):
            pieces += reader.add(text[at : at + size])
        pieces += reader.finish()
        assert "".join(p for p in pieces if isinstance(p, str)) == content
        assert [(c.name, c.arguments) for c in reader.calls] == [(c.name, c.arguments) for c in calls]


def test_text_that_is_not_a_call_stays_text():
    for text in ["<tool_call>\nnot json\n</tool_call> then", "a < b and <tool_ca", '<tool_call>{"arguments": {}}']:
        assert read_calls(text) == (text.strip(), [])
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'  # the token limit came first
    assert read_calls(cut) == (cut, [])
    assert read_calls(CALL_TEXT.removesuffix("</tool_call>"))[1][0].name == "get_weather"


def test_a_reply_that_is_only_a_calls_json_is_read_as_the_call_when_the_function_is_offered():
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'  # as Qwen2.5-Coder often answers
    offered = frozenset({"get_weather"})
    for text in [call, f"```json\n{call}\n```", f"[{call}, {call}]"]:
        content, calls = read_calls(text, offered)
        assert content == "" and {(c.name, c.arguments) for c in calls} == {("get_weather", '{"city": "Paris"}')}
    for text in ['{"name": "delete_everything", "arguments": {}}', '{"city": "Paris"}', "```python\nprint(1)\n```"]:
        assert read_calls(text, offered) == (text, [])
    assert read_calls(call) == (call, [])  # no function offered: nothing to call


def test_a_conversation_with_calls_laid_out_turn_by_turn_is_the_templates_whole_render():
    template = ChatTemplate(QWEN_TEMPLATE, "", "")
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny, 24 C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "humid", "tool_call_id": "call_1"},
    ]
    written = template.reply_text(messages[2], [WEATHER])
    assert written == CALL_TEXT
    as_written = [*messages[:2], {"role": "assistant", "content": written}, *messages[3:]]
    turns = template.first_turn_text(messages[:2], [WEATHER]) + written
    turns += template.next_turn_text(as_written, "", [WEATHER], prompt_messages=2)
    assert turns == template.render(messages, tools=[WEATHER])


# --- tools on a real server ---------------------------------------------------------------------------
def test_offered_tools_reach_the_model_through_its_template_and_the_reply_is_the_target_alone(
    tool_served, draft, target_alone
):
    engine, template = draft
    client, model = tool_served.client(), _model(tool_served)
    messages = [{"role": "user", "content": "the weather in paris"}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], max_tokens=16, seed=0)
    prompt = engine.vocab.tokenize(template.render(messages, tools=[WEATHER]), add_bos=False)
    assert answer.usage.prompt_tokens == len(prompt)
    expected = target_alone.decode(prompt, 16, _stop_ids(engine.path))
    assert answer.choices[0].message.content == read_calls(_text(engine, expected))[0]
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason == "length"
    streamed = list(
        client.chat.completions.create(model=model, messages=messages, tools=[WEATHER], max_tokens=16, stream=True)
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content
    # tool_choice none: the model is shown no tools (the template's plain system prompt)
    plain = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=4
    )
    assert plain.usage.prompt_tokens == len(engine.vocab.tokenize(template.render(messages), add_bos=False))


def test_a_named_function_is_started_in_the_models_mouth_and_its_arguments_follow_the_schema(
    tool_served, draft, target_alone
):
    engine, template = draft
    messages = [{"role": "user", "content": "the weather in paris"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    answer = tool_served.client().chat.completions.create(
        model=_model(tool_served), messages=messages, tools=[WEATHER], tool_choice=named, max_tokens=40
    )
    prompt = engine.vocab.tokenize(template.render(messages, tools=[WEATHER]), add_bos=False)
    start = '<tool_call>\n{"name": "get_weather", "arguments":'
    start_tokens = engine.vocab.tokenize(start, add_bos=False)
    # The target alone continues the call's opening under the grammar of the function's arguments.
    grammar = call_grammar(tool_use([WEATHER], named, None))
    expected = target_under_grammar(target_alone, engine, prompt + start_tokens, grammar, 40)
    content, calls = read_calls(start + _text(engine, expected))
    assert (answer.choices[0].message.content or "") == content
    assert [(c.function.name, c.function.arguments) for c in answer.choices[0].message.tool_calls or []] == [
        (c.name, c.arguments) for c in calls
    ]
    assert answer.usage.completion_tokens == len(start_tokens) + len(expected)


def test_a_calls_logprobs_come_beside_it_in_a_stream_as_they_come_whole(tool_served):
    client, model = tool_served.client(), _model(tool_served)
    ask = {
        "model": model,
        "messages": [{"role": "user", "content": "paint the fence"}],
        "tools": [{"type": "function", "function": {"name": "paint", "parameters": PAINT}}],  # a short call
        "tool_choice": {"type": "function", "function": {"name": "paint"}},
        "max_tokens": 80,
        "logprobs": True,
        "top_logprobs": 1,
    }
    whole = client.chat.completions.create(**ask).choices[0]
    chunks = [chunk.choices[0] for chunk in client.chat.completions.create(**ask, stream=True)]
    streamed = [entry.token for chunk in chunks if chunk.logprobs for entry in chunk.logprobs.content]
    assert streamed == [entry.token for entry in whole.logprobs.content] and streamed
    call_chunk = next(chunk for chunk in chunks if chunk.delta.tool_calls)
    assert call_chunk.logprobs.content  # the call's tokens come with the call
    assert whole.message.tool_calls[0].function.name == "paint"


def test_a_required_call_names_an_offered_function_and_follows_its_schema(tool_served, draft, target_alone):
    engine, template = draft
    messages = [{"role": "user", "content": "the weather in paris"}]
    answer = tool_served.client().chat.completions.create(
        model=_model(tool_served), messages=messages, tools=[WEATHER], tool_choice="required", max_tokens=40
    )
    prompt = engine.vocab.tokenize(template.render(messages, tools=[WEATHER]), add_bos=False)
    start = '<tool_call>\n{"name": "'
    start_tokens = engine.vocab.tokenize(start, add_bos=False)
    grammar = call_grammar(tool_use([WEATHER], "required", None))
    expected = target_under_grammar(target_alone, engine, prompt + start_tokens, grammar, 40)
    assert _text(engine, expected).startswith('get_weather", "arguments": {')  # the only function offered
    content, calls = read_calls(start + _text(engine, expected), frozenset({"get_weather"}))
    assert (answer.choices[0].message.content or "") == content
    assert [(c.function.name, c.function.arguments) for c in answer.choices[0].message.tool_calls or []] == [
        (c.name, c.arguments) for c in calls
    ]


def test_tool_results_go_back_in_as_the_template_lays_them_out(tool_served, draft, target_alone, hub):
    engine, template = draft
    call = {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "user", "content": "the weather in paris"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
    ]
    answer = tool_served.client().chat.completions.create(
        model=_model(tool_served), messages=messages, tools=[WEATHER], max_tokens=12
    )
    with HubClient(hub.url) as hub_client:
        reference = Conversation(engine, hub_client, template, DecodeSettings(max_tokens=12))
        reference.reset("", [WEATHER])
        reference.add_exchange("the weather in paris", CALL_TEXT)
        tool_result = ({"role": "tool", "content": "sunny", "tool_call_id": "call_7", "name": "get_weather"},)
        expected = reference.ask(tool_result)
        reference.close()
    assert answer.choices[0].message.content == read_calls(expected.text)[0]
    context = reference.history[: len(reference.history) - len(expected.token_ids)]
    assert answer.usage.prompt_tokens == len(context)
    assert expected.token_ids == target_alone.decode(context, 12, _stop_ids(engine.path))


def test_what_cannot_be_honoured_is_refused_with_a_clear_400(tool_served, plain_served):
    client, model = tool_served.client(), _model(tool_served)
    ask = [{"role": "user", "content": "hi"}]
    cases = [
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "one of them"),
        ({"response_format": {"type": "xml"}}, "response_format.type must be"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}}, "cannot be"),
        ({"tools": [{"type": "function", "function": {**WEATHER["function"], "strict": True}}]}, "strict: true"),
        ({"top_logprobs": 2}, "needs 'logprobs': true"),
        ({"tool_choice": "required"}, "only allowed when 'tools' are given"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
        ({"tools": [{"type": "retrieval"}]}, "must be a function tool"),
    ]
    for extra, why in cases:
        with pytest.raises(openai.BadRequestError, match=why):
            client.chat.completions.create(model=model, messages=ask, max_tokens=2, **extra)
    orphan = [*ask, {"role": "assistant", "content": "hello"}, {"role": "tool", "tool_call_id": "x", "content": "1"}]
    with pytest.raises(openai.BadRequestError, match="must follow the assistant message whose tool_calls"):
        client.chat.completions.create(model=model, messages=orphan, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="does not show tools to the model") as no_tools:
        plain_served.client().chat.completions.create(
            model=_model(plain_served), messages=ask, tools=[WEATHER], max_tokens=2
        )
    assert no_tools.value.code == "tools_not_supported"
    with pytest.raises(openai.BadRequestError, match="no fill-in-the-middle tokens") as no_fim:
        plain_served.client().completions.create(model=_model(plain_served), prompt="def f(", suffix="\n", max_tokens=2)
    assert no_fim.value.code == "fim_not_supported"


# --- /v1/responses ---------------------------------------------------------------------------------------
def test_responses_answer_as_chat_completions_do_streamed_and_not(tool_served):
    client, model = tool_served.client(), _model(tool_served)
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on"}],
        max_tokens=16,
        seed=2,
    )
    text = chat.choices[0].message.content
    response = client.responses.create(
        model=model, instructions="be brief", input="the cat sat on", max_output_tokens=16
    )
    assert response.output_text == text and response.usage.output_tokens == chat.usage.completion_tokens
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    events = list(
        client.responses.create(
            model=model, instructions="be brief", input="the cat sat on", max_output_tokens=16, stream=True
        )
    )
    assert [e.type for e in events[:4]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == text
    with client.responses.stream(
        model=model,
        instructions="be brief",
        input=[{"role": "user", "content": "the cat sat on"}],
        max_output_tokens=16,
    ) as stream:  # the SDK's helper, which checks each event against the response it builds
        ended = list(stream)[-1]
    # A reply cut by the token limit ends `response.incomplete` (get_final_response wants `completed`).
    assert ended.type == "response.incomplete" and ended.response.output_text == text


def test_responses_carry_function_calls_and_their_outputs_back_in(tool_served):
    client, model = tool_served.client(), _model(tool_served)
    weather = {"type": "function", **WEATHER["function"]}
    call = {"type": "function_call", "call_id": "call_7", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    history = [{"role": "user", "content": "the weather in paris"}, call]
    output = {"type": "function_call_output", "call_id": "call_7", "output": "sunny"}
    response = client.responses.create(model=model, input=[*history, output], tools=[weather], max_output_tokens=12)
    chat = client.chat.completions.create(
        model=model,
        messages=[
            history[0],
            {"role": "assistant", "content": None, "tool_calls": [_chat_call(call)]},
            {"role": "tool", "tool_call_id": "call_7", "content": "sunny"},
        ],
        tools=[WEATHER],
        max_tokens=12,
    )
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


def _chat_call(item: dict) -> dict:
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": item["arguments"]},
    }


def test_responses_refuse_what_this_server_cannot_do(tool_served):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    model = _model(tool_served)
    cases = [
        ({"previous_response_id": "resp_1"}, "stores no responses"),
        ({"store": True}, "store must be false"),
        ({"text": {"format": {"type": "xml"}}}, "response_format.type must be"),
        ({"tools": [{"type": "web_search"}]}, "only function tools"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "only messages, function_call"),
        ({"include": ["reasoning.encrypted_content"]}, "only 'message.output_text.logprobs'"),
        ({"include": ["message.output_text.logprobs"], "top_logprobs": 21}, "'top_logprobs' must be"),
    ]
    for extra, why in cases:
        body = {"model": model, "input": "hi", **extra}
        answer = httpx.post(f"{tool_served.url}/v1/responses", json=body, headers=headers, timeout=30)
        assert answer.status_code == 400 and why in answer.json()["error"]["message"], answer.text

"""The part of OpenAI's API that `specedge serve` speaks: requests checked into dataclasses, answers
and stream chunks built as plain dicts (no validation library, so the client stays light).

What SpecEdge cannot honour is refused with a clear 400 rather than ignored: the reply is always
exactly the target's own decoding at the given temperature, so nucleus sampling, penalties and
several choices are not offered. Tools are (`tools.py`), for models whose chat template shows them;
so are structured outputs (`response_format`: JSON, or JSON of a schema), which the hub verifies
under the grammar, and the target's log-probabilities (`structured.py`).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from specedge_cli.conversation import Prompt
from specedge_cli.errors import ApiError
from specedge_cli.serve import structured
from specedge_cli.serve.tools import AssistantMessage, ToolCall, ToolUse, tool_use

MAX_STOPS = 4  # as OpenAI
# A conversation's messages are laid out in time linear in their number; past this many the request
# is refused up front (50,000 short messages already overrun the largest contexts served today).
MAX_MESSAGES = 50_000
MAX_SEED = 2**63 - 1  # the hub's sampling seed is a signed 64-bit integer


@dataclass(frozen=True)
class Options:
    """What a request asks of the decoding; None takes the server's setting."""

    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    grammar: str = ""  # the reply's grammar, llguidance's format (`structured.py`); "": free text
    top_logprobs: int | None = None  # report the target's logprobs, with this many alternatives; None: none


@dataclass(frozen=True)
class ChatRequest:
    model: str
    system: str
    # the (prompt, reply) pairs before the last prompt; a prompt is a user message's text, or the
    # messages between two replies (tool results) as the chat template reads them
    exchanges: tuple[tuple[Prompt, AssistantMessage], ...]
    prompt: Prompt  # the last user message, or the tool results the reply follows
    options: Options
    tool_use: ToolUse | None = None

    @property
    def uses_tools(self) -> bool:
        """Whether the chat template must lay out tools: offered, called or answered."""
        return (
            self.tool_use is not None
            or not isinstance(self.prompt, str)
            or any(reply.tool_calls for _, reply in self.exchanges)
        )


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | tuple[int, ...]  # text, or token ids
    options: Options
    suffix: str = ""  # the text after the insertion: the model fills in the middle


@dataclass(frozen=True)
class Answer:
    """A finished reply, in the terms OpenAI's answers need."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens the hub session and the draft already held from an earlier request
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[structured.TokenLogprob, ...] | None = None  # the reply's tokens', when asked for
    # those of them handed out with the reply's text, not with a tool call (a Responses message's)
    text_logprobs: tuple[structured.TokenLogprob, ...] | None = None

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


# --- reading requests --------------------------------------------------------------------------
def json_body(raw: bytes) -> Any:
    """A request body as JSON: UTF-8, finite numbers only, nesting Python's parser can follow."""
    try:
        return json.loads(raw, parse_constant=_not_a_number)
    except RecursionError:
        raise ApiError("the body is not valid JSON: it is nested too deep", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"the body is not valid JSON ({_short(exc)})", code="invalid_json") from None


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."


_REFUSED: dict[
    str, tuple[tuple[object, ...], str]
] = {  # field: (the values that ask for nothing, why any other is refused)
    "n": ((1,), "n must be 1: one choice per request"),
    "best_of": ((1,), "best_of must be 1: one choice per request"),
    "echo": ((False,), "echo is not supported"),
    "top_p": ((1,), "top_p must be 1: SpecEdge samples the target's whole distribution at the temperature"),
    "frequency_penalty": ((0,), "frequency_penalty must be 0: the reply is the target's own distribution"),
    "presence_penalty": ((0,), "presence_penalty must be 0: the reply is the target's own distribution"),
    "logit_bias": (({},), "logit_bias is not supported: the reply is the target's own distribution"),
    "functions": (([],), "functions are not supported: send them as tools"),
    "function_call": (("none",), "function_call is not supported: send tool_choice with tools"),
}


def chat_request(body: Any) -> ChatRequest:
    """A `POST /v1/chat/completions` body, checked."""
    body = json_object(body)
    messages = _required(body, "messages", list)
    if len(messages) > MAX_MESSAGES:
        raise ApiError(
            f"'messages' holds {len(messages):,} messages, more than the {MAX_MESSAGES:,} this server takes in one "
            "request; send the recent part of the conversation",
            param="messages",
            code="too_many_messages",
        )
    system, prompts, replies = conversation(messages)
    uses = tool_use(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    grammar = structured.reply_grammar(body.get("response_format"), uses)
    options = replace(_options(body), grammar=grammar, top_logprobs=structured.chat_logprobs(body))
    return ChatRequest(_model(body), system, tuple(zip(prompts, replies)), prompts[-1], options, uses)


def completion_request(body: Any) -> CompletionRequest:
    """A `POST /v1/completions` body, checked: the prompt is one text or one list of token ids; with
    a `suffix`, the model fills in what lies between the two."""
    body = json_object(body)
    if body.get("response_format") is not None:
        raise ApiError(
            "response_format is a chat completions parameter; use /v1/chat/completions", param="response_format"
        )
    prompt, suffix = _prompt(body.get("prompt")), _optional(body, "suffix", str, "")
    if suffix and not isinstance(prompt, str):
        raise ApiError("with a 'suffix', 'prompt' must be text (the code before the insertion)", param="prompt")
    options = replace(_options(body), top_logprobs=structured.completion_logprobs(body))
    return CompletionRequest(_model(body), prompt, options, suffix)


def json_object(body: Any, refused: dict[str, tuple[tuple[object, ...], str]] | None = None) -> dict:
    """`body` as a JSON object, none of whose `refused` fields (by default a chat's) asks for
    what this server does not do."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    for name, (neutral, why) in (_REFUSED if refused is None else refused).items():
        value = body.get(name)
        if value is not None and value not in neutral:
            raise ApiError(why, param=name)
    return body


def _required(body: dict, name: str, kind: type) -> Any:
    if name not in body:
        raise ApiError(f"missing required parameter: {name!r}", param=name)
    value = body[name]
    if not isinstance(value, kind):
        raise ApiError(f"{name!r} must be {_kind_name(kind)}", param=name)
    return value


def _model(body: dict) -> str:
    return _required(body, "model", str)


def conversation(messages: list) -> tuple[str, list[Prompt], list[AssistantMessage]]:
    """The system prompt, the prompts and the replies between them (one reply fewer than prompts).

    A prompt is a user message, or the results of the last reply's tool calls (then perhaps a user
    message); user and assistant take turns, starting with the user, and the last word is not the
    assistant's.
    """
    system: list[str] = []
    prompts: list[Prompt] = []
    replies: list[AssistantMessage] = []
    group: list[dict] = []  # the prompt being read
    call_names: dict[str, str] = {}  # the last reply's calls, by id: a tool's result names its function
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(f"{param} must be an object with a 'role'", param=param)
        role = message["role"]
        if role in ("system", "developer"):
            if group or prompts:
                raise ApiError(f"{param}: system messages must come before the conversation", param=param)
            system.append(_content(message.get("content"), param))
        elif role == "user":
            if group and group[-1]["role"] == "user":
                raise ApiError(f"{param}: expected an assistant message (user and assistant take turns)", param=param)
            group.append({"role": "user", "content": _content(message.get("content"), param)})
        elif role == "tool":
            group.append(_tool_result(message, param, group, call_names))
        elif role == "assistant":
            if not group:
                raise ApiError(f"{param}: expected a user message (user and assistant take turns)", param=param)
            prompts.append(_as_prompt(group))
            replies.append(_assistant(message, param))
            group, call_names = [], {call.id: call.name for call in replies[-1].tool_calls}
        else:
            raise ApiError(f"{param}: role {role!r} is not supported (system, user, assistant, tool)", param=param)
    if not group:
        raise ApiError(
            "the last message must come from the user (or be a tool's result for the last reply)", param="messages"
        )
    prompts.append(_as_prompt(group))
    return "\n\n".join(system), prompts, replies


def _as_prompt(group: list[dict]) -> Prompt:
    return group[0]["content"] if len(group) == 1 and group[0]["role"] == "user" else tuple(group)


def _tool_result(message: dict, param: str, group: list[dict], call_names: dict[str, str]) -> dict:
    if not call_names or (group and group[-1]["role"] != "tool"):
        raise ApiError(
            f"{param}: a tool message must follow the assistant message whose tool_calls it answers", param=param
        )
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        raise ApiError(f"{param}.tool_call_id must be the id of the call it answers", param=f"{param}.tool_call_id")
    content = _content(message.get("content"), param)
    return {"role": "tool", "content": content, "tool_call_id": call_id, "name": call_names.get(call_id, "")}


def _assistant(message: dict, param: str) -> AssistantMessage:
    calls = message.get("tool_calls") or []
    content = message.get("content")
    text = "" if content is None and calls else _content(content, param)
    if not isinstance(calls, list):
        raise ApiError(f"{param}.tool_calls must be an array", param=f"{param}.tool_calls")
    return AssistantMessage(text, tuple(_sent_call(call, f"{param}.tool_calls[{i}]") for i, call in enumerate(calls)))


def _sent_call(call: Any, param: str) -> ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(
            f"{param} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}", param=param
        )
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(str(call.get("id") or ""), function["name"], arguments)


def _content(content: Any, param: str) -> str:
    """A message's text: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS for p in content):
        return "".join(str(part.get("text", "")) for part in content)
    raise ApiError(f"{param}.content must be text (a string or text parts)", param=f"{param}.content")


_TEXT_PARTS = ("text", "input_text", "output_text")  # the chat API's, and the Responses API's


def _prompt(prompt: Any) -> str | tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return tuple(prompt)
    raise ApiError("'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


def _options(body: dict) -> Options:
    stream = _optional(body, "stream", bool, False)
    stream_options = _optional(body, "stream_options", dict, None)
    if stream_options is not None and not stream:
        raise ApiError("stream_options is only allowed with stream: true", param="stream_options")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return Options(
        max_tokens=_number("max_tokens", limit, int, low=1),
        temperature=_number("temperature", body.get("temperature"), float, low=0, high=2),
        seed=_number("seed", body.get("seed"), int, low=0, high=MAX_SEED),
        stop=_stops(body.get("stop")),
        stream=stream,
        include_usage=bool((stream_options or {}).get("include_usage", False)),
    )


def _optional(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(f"{name!r} must be {_kind_name(kind)}", param=name)
    return value


def _number(name: str, value: Any, kind: type, low: float, high: float | None = None) -> Any:
    if value is None:
        return None
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite or (kind is int and not whole):
        raise ApiError(f"{name!r} must be {_kind_name(kind)}", param=name)
    if value < low or (high is not None and value > high):
        bounds = f"between {low:g} and {high}" if high is not None else f"at least {low:g}"
        raise ApiError(f"{name!r} must be {bounds}, not {value!r}", param=name)
    return kind(value)


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
    return tuple(stops)


def _kind_name(kind: type) -> str:
    return {int: "an integer", float: "a number", bool: "a boolean", str: "a string", list: "an array"}.get(
        kind, "an object"
    )


# --- writing answers ---------------------------------------------------------------------------
def error_body(error: ApiError) -> dict:
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "specedge"}


def chat_completion(request_id: str, model: str, answer: Answer) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
    if answer.tool_calls:
        message["content"] = answer.text or None
        message["tool_calls"] = [call.chat_dict() for call in answer.tool_calls]
    logprobs = structured.chat_logprobs_body(answer.logprobs)
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": answer.finish_reason}
    return _envelope(request_id, "chat.completion", model, [choice]) | {"usage": answer.usage()}


def text_completion(request_id: str, model: str, answer: Answer) -> dict:
    logprobs = structured.completion_logprobs_body(answer.logprobs)
    choice = {"index": 0, "text": answer.text, "logprobs": logprobs, "finish_reason": answer.finish_reason}
    return _envelope(request_id, "text_completion", model, [choice]) | {"usage": answer.usage()}


def chat_chunk(
    request_id: str, model: str, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None
) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(request_id, "chat.completion.chunk", model, [choice])


def tool_call_delta(index: int, call: ToolCall) -> dict:
    """A call in a stream: whole in one delta (its id, name and all its arguments), as the SDKs'
    accumulators take it."""
    return {"tool_calls": [{"index": index, **call.chat_dict()}]}


def text_chunk(
    request_id: str, model: str, text: str, finish_reason: str | None = None, logprobs: dict | None = None
) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(request_id, "text_completion", model, [choice])


def usage_chunk(request_id: str, model: str, kind: str, answer: Answer) -> dict:
    """The last chunk of a stream that asked for `stream_options.include_usage`: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return _envelope(request_id, obj, model, []) | {"usage": answer.usage()}


def _envelope(request_id: str, obj: str, model: str, choices: list) -> dict:
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": choices}

"""OpenAI's Responses API (`POST /v1/responses`) over the chat path: a request is read into the
same `ChatRequest` a chat completion is, and the answer written back as a response object, or as
the Responses event stream (`response.created` ... `response.completed`).

Nothing is stored: a response cannot be fetched later or continued by `previous_response_id`, so
those are refused; a client sends the whole conversation as `input`, as with chat completions
(function calls and their outputs included). Text and function tools only. The target's logprobs
come with the output text when `include` asks for them (`message.output_text.logprobs`), with
`top_logprobs` alternatives each.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from specedge_cli.errors import ApiError
from specedge_cli.serve import openai_api as api
from specedge_cli.serve.openai_api import Answer, ChatRequest
from specedge_cli.serve.structured import TokenLogprob, chat_logprobs, logprob_entry
from specedge_cli.serve.tools import ToolCall

OUTPUT_LOGPROBS = "message.output_text.logprobs"  # the one `include` this server answers

# field: (the values that ask for nothing, why any other is refused)
_REFUSED: dict[str, tuple[tuple[object, ...], str]] = {
    "previous_response_id": (
        (),
        "previous_response_id is not supported: this server stores no responses; send the whole conversation "
        "as 'input'",
    ),
    "conversation": ((), "conversation is not supported: send the whole conversation as 'input'"),
    "store": ((False,), "store must be false: this server stores no responses"),
    "background": ((False,), "background responses are not supported"),
    "reasoning": ((), "reasoning options are not supported by this model"),
    "truncation": (("disabled",), "truncation must be 'disabled': a conversation over the context is refused"),
    "top_p": ((1,), "top_p must be 1: SpecEdge samples the target's whole distribution at the temperature"),
    "max_tool_calls": ((), "max_tool_calls is not supported: set parallel_tool_calls false for one call"),
    "prompt": ((), "reusable prompts are not supported: send 'instructions' and 'input'"),
}


@dataclass(frozen=True)
class ResponseRequest:
    chat: ChatRequest
    echo: dict  # what the response object repeats of the request


def response_request(body: Any) -> ResponseRequest:
    """A `POST /v1/responses` body, checked and read as a chat request."""
    body = api.json_object(body, _REFUSED)
    text_format = _text_format(body.get("text"))
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError("'instructions' must be a string", param="instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + _messages(body.get("input"))
    tools = _chat_tools(body.get("tools"))
    chat_body = {
        "model": body.get("model"),
        "messages": messages,
        "tools": tools,
        "tool_choice": body.get("tool_choice"),
        "parallel_tool_calls": body.get("parallel_tool_calls"),
        "max_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature"),
        "stream": body.get("stream"),
        "response_format": _as_response_format(text_format),
        **_logprobs(body),
    }
    chat = api.chat_request({name: value for name, value in chat_body.items() if value is not None})
    echo: dict[str, Any] = {
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") if isinstance(body.get("metadata"), dict) else {},
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "temperature": body.get("temperature"),
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "text": {"format": text_format},
        "top_logprobs": body.get("top_logprobs"),
    }
    return ResponseRequest(chat, echo)


def _logprobs(body: dict) -> dict:
    """The chat API's `logprobs` and `top_logprobs` of `include` and `top_logprobs`: logprobs are
    reported when `include` asks for them (as OpenAI does, `top_logprobs` alone reports none)."""
    include = body.get("include")
    if include is None:
        include = []
    if not isinstance(include, list) or any(value != OUTPUT_LOGPROBS for value in include):
        raise ApiError(
            f"include: only {OUTPUT_LOGPROBS!r} is supported (the response carries its output, and its logprobs "
            "when asked)",
            param="include",
        )
    top = body.get("top_logprobs")
    if not include:  # checked as the chat API checks it, then not used
        chat_logprobs({"logprobs": True, "top_logprobs": top})
        return {}
    return {"logprobs": True, "top_logprobs": top}


def _text_format(text: Any) -> dict:
    """`text.format`: {'type': 'text'} (the default), {'type': 'json_object'}, or {'type': 'json_schema',
    'name', 'schema', 'strict'} (the chat API's json_schema, flattened)."""
    if text is None:
        return {"type": "text"}
    fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(text, dict) or (fmt is not None and not isinstance(fmt, dict)):
        raise ApiError("'text' must be {'format': {'type': 'text' | 'json_object' | 'json_schema', ...}}", param="text")
    return fmt or {"type": "text"}


def _as_response_format(fmt: dict) -> dict | None:
    """The chat API's `response_format` of a `text.format`."""
    if fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}
    return fmt


def _messages(given: Any) -> list[dict]:
    """`input` as chat messages: text is one user message; items are messages, function calls (joined
    to the assistant message they follow) and function call outputs (tool messages)."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list) or not given:
        raise ApiError("'input' must be text or a non-empty array of input items", param="input")
    messages: list[dict] = []
    for index, item in enumerate(given):
        param = f"input[{index}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message" and isinstance(item.get("role"), str):
            messages.append({"role": item["role"], "content": item.get("content")})
        elif kind == "function_call":
            _append_call(messages, item, param)
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, (str, list)):
                raise ApiError(f"{param}.output must be text", param=f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
        else:
            raise ApiError(
                f"{param}: only messages, function_call and function_call_output items are supported", param=param
            )
    return messages


def _append_call(messages: list[dict], item: dict, param: str) -> None:
    if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments"), str):
        raise ApiError(f"{param}: a function_call needs its 'name' and 'arguments'", param=param)
    call = {
        "id": item.get("call_id"),
        "type": "function",
        "function": {"name": item["name"], "arguments": item["arguments"]},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant" and last.get("tool_calls") is not None:
        last["tool_calls"].append(call)
    elif last is not None and last["role"] == "assistant":
        last["tool_calls"] = [call]
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _chat_tools(tools: Any) -> list | None:
    """Responses tools (`{"type": "function", "name", "parameters", ...}`) in the chat API's shape."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError("'tools' must be an array of function tools", param="tools")
    chat_tools = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ApiError(
                f"tools[{index}]: only function tools are supported (no built-in tools here)", param=f"tools[{index}]"
            )
        chat_tools.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
    return chat_tools


# --- writing responses --------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def response_object(
    response_id: str, model: str, echo: dict, created: int, answer: Answer | None, output: list[dict]
) -> dict:
    """A response: in progress (no answer yet), completed, or incomplete (the token limit)."""
    status = "in_progress" if answer is None else "completed"
    incomplete = None
    if answer is not None and answer.finish_reason == "length":
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": incomplete,
        "model": model,
        "output": output,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "text": {"format": {"type": "text"}},
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": _usage(answer) if answer is not None else None,
        "user": None,
        **echo,
    }


def _usage(answer: Answer) -> dict:
    return {
        "input_tokens": answer.prompt_tokens,
        "input_tokens_details": {"cached_tokens": answer.cached_tokens},
        "output_tokens": answer.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }


def message_item(item_id: str, text: str, status: str = "completed", logprobs: tuple[TokenLogprob, ...] = ()) -> dict:
    content = [_text_part(text, logprobs)] if status == "completed" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def call_item(call: ToolCall, status: str = "completed") -> dict:
    arguments = call.arguments if status == "completed" else ""
    item_id = "fc_" + call.id.removeprefix("call_")
    return {
        "type": "function_call",
        "id": item_id,
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def _text_part(text: str, logprobs: tuple[TokenLogprob, ...] = ()) -> dict:
    return {
        "type": "output_text",
        "text": text,
        "annotations": [],
        "logprobs": [logprob_entry(entry) for entry in logprobs],
    }


def _delta_logprobs(logprobs: tuple[TokenLogprob, ...]) -> list[dict]:
    """Logprobs as a text delta event carries them: no bytes."""
    return [
        {
            "token": entry.token,
            "logprob": entry.logprob,
            "top_logprobs": [{"token": text, "logprob": value} for text, _, value in entry.top],
        }
        for entry in logprobs
    ]


def output_items(answer: Answer) -> list[dict]:
    """A finished answer's output: its text as a message (when it has text or no calls), then its calls."""
    items = []
    if answer.text or not answer.tool_calls:
        items.append(message_item(new_id("msg"), answer.text, logprobs=answer.text_logprobs or ()))
    return items + [call_item(call) for call in answer.tool_calls]


@dataclass
class ResponseEvents:
    """A streamed response's events, in order: each piece of the reply as it comes, then the end."""

    response_id: str
    model: str
    echo: dict
    created: int = field(default_factory=lambda: int(time.time()))
    output: list[dict] = field(default_factory=list)  # the items finished so far
    _sequence: int = 0
    _message: dict | None = None  # the message item being written
    _text: str = ""
    _logprobs: tuple[TokenLogprob, ...] = ()  # its tokens' (or, with no message open, those the next one takes)

    def opening(self) -> list[dict]:
        response = self._response(None)
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def piece(self, piece: str | ToolCall, logprobs: tuple[TokenLogprob, ...] = ()) -> list[dict]:
        """The events of a piece of the reply and the logprobs of the tokens it carries (a call's
        go nowhere: a function call item has no logprobs)."""
        if isinstance(piece, ToolCall):
            return self._close_message() + self._call(piece)
        if not piece and self._message is None:  # logprobs of text never shown: the next message's
            self._logprobs += logprobs
            return []
        events = [] if self._message is not None else self._open_message()
        self._text += piece
        self._logprobs += logprobs
        assert self._message is not None
        where = {"item_id": self._message["id"], "output_index": len(self.output), "content_index": 0}
        delta = self._event("response.output_text.delta", **where, delta=piece, logprobs=_delta_logprobs(logprobs))
        return [*events, delta]

    def ending(self, answer: Answer) -> list[dict]:
        events = self._close_message()
        if not self.output:  # a reply with no text and no call still answers with its (empty) message
            events += self._open_message() + self._close_message()
        response = self._response(answer)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return [*events, self._event(kind, response=response)]

    def failure(self, error: ApiError) -> list[dict]:
        response = self._response(None) | {"status": "failed", "error": {"code": error.code, "message": error.message}}
        return [
            self._event("error", code=error.code, message=error.message, param=error.param),
            self._event("response.failed", response=response),
        ]

    def _open_message(self) -> list[dict]:
        self._message, self._text = message_item(new_id("msg"), "", "in_progress"), ""
        where = {"item_id": self._message["id"], "output_index": len(self.output), "content_index": 0}
        return [
            self._event("response.output_item.added", output_index=len(self.output), item=self._message),
            self._event("response.content_part.added", **where, part=_text_part("")),
        ]

    def _close_message(self) -> list[dict]:
        if self._message is None:
            return []
        item = message_item(self._message["id"], self._text, logprobs=self._logprobs)
        where = {"item_id": item["id"], "output_index": len(self.output), "content_index": 0}
        logprobs = _delta_logprobs(self._logprobs)
        events = [
            self._event("response.output_text.done", **where, text=self._text, logprobs=logprobs),
            self._event("response.content_part.done", **where, part=_text_part(self._text, self._logprobs)),
            self._event("response.output_item.done", output_index=len(self.output), item=item),
        ]
        self.output.append(item)
        self._message, self._logprobs = None, ()
        return events

    def _call(self, call: ToolCall) -> list[dict]:
        item, index = call_item(call), len(self.output)
        where = {"item_id": item["id"], "output_index": index}
        events = [
            self._event("response.output_item.added", output_index=index, item=call_item(call, "in_progress")),
            self._event("response.function_call_arguments.delta", **where, delta=call.arguments),
            self._event("response.function_call_arguments.done", **where, name=call.name, arguments=call.arguments),
            self._event("response.output_item.done", output_index=index, item=item),
        ]
        self.output.append(item)
        return events

    def _response(self, answer: Answer | None) -> dict:
        return response_object(self.response_id, self.model, self.echo, self.created, answer, list(self.output))

    def _event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

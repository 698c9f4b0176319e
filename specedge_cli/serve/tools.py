"""Function calling: the tools a request offers, and the calls read back out of the model's reply.

A model calls a function by writing it in its own markup; the chat template that taught it the
markup shows it the functions. Models trained on the Hermes format (Qwen 2.5's instruct models,
Hermes, many fine-tunes) write each call as JSON between `<tool_call>` tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

That is the format read here; a template that shows tools in another format is refused, not
half-served. `tool_choice` "required" or a named function is honoured by starting the reply with
the call's opening (and the function's name), which the model then continues under a grammar
(`structured.call_grammar`): the arguments are JSON of the function's parameters schema, and the
reply is exactly the target's decoding under that grammar.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from specedge_cli.errors import ApiError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_NAME = CALL_OPEN + '\n{"name": "'  # a call up to its function's name
CALL_ARGUMENTS = '", "arguments":'  # from the end of the name to the arguments
CALL_END = "}\n" + CALL_CLOSE  # after the arguments
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|\Z)", re.DOTALL)
MAX_TOOLS = 128  # as OpenAI
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object's text

    def chat_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def template_dict(self) -> dict:
        """The call as chat templates read it (Hugging Face's convention: arguments as an object)."""
        function = {"name": self.name, "arguments": _arguments_object(self.arguments)}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """The functions a request offers the model and what it asks of their use."""

    tools: tuple[dict, ...]  # in the chat API's shape: {"type": "function", "function": {...}}
    choice: str = "auto"  # auto, none, required, or function (then `function` names it)
    function: str | None = None
    parallel: bool = True

    @property
    def shown(self) -> list[dict] | None:
        """The tools the chat template shows the model: none when it may not call any."""
        return None if self.choice == "none" else list(self.tools)

    @property
    def reads_calls(self) -> bool:
        return self.choice != "none"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool["function"]["name"] for tool in self.tools)

    def reply_start(self) -> str:
        """What the reply starts with so that the model calls a function when it must."""
        if self.choice == "required":  # up to the name: after the tag alone a model may still end its reply
            return CALL_NAME
        if self.choice == "function":
            return f"{CALL_NAME}{self.function}{CALL_ARGUMENTS}"
        return ""


@dataclass(frozen=True)
class AssistantMessage:
    """An earlier reply, sent back: its text and the calls it made."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()

    def key(self) -> str:
        """The same for the reply as this server gave it and as a client sends it back (a client may
        re-serialize the arguments)."""
        calls = [(c.id, c.name, _canonical(c.arguments)) for c in self.tool_calls]
        return json.dumps([self.content.strip(), calls], ensure_ascii=False)

    def template_dict(self) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": self.content or None}
        if self.tool_calls:
            message["tool_calls"] = [call.template_dict() for call in self.tool_calls]
        return message


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# --- reading a request's tools ----------------------------------------------------------------------
def tool_use(tools: Any, choice: Any, parallel: Any, param: str = "tools") -> ToolUse | None:
    """The `tools`, `tool_choice` and `parallel_tool_calls` of a chat request, checked."""
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise ApiError("'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(f"'{param}' must be an array of up to {MAX_TOOLS} functions", param=param)
    checked = tuple(_tool(tool, f"{param}[{index}]") for index, tool in enumerate(tools))
    names = [tool["function"]["name"] for tool in checked]
    kind, function = _choice(choice, names)
    strict = [t["function"]["name"] for t in checked if t["function"].pop("strict", False)]
    if strict and kind not in ("required", "function"):
        raise ApiError(
            f"{param}: strict: true (function {strict[0]!r}) is honoured when tool_choice makes the model call a "
            "function ('required' or a named one): then the arguments are constrained to the schema. With "
            f"tool_choice {kind!r} they are not; leave strict out, or set tool_choice",
            param=param,
        )
    return ToolUse(checked, kind, function, parallel is not False and kind != "function")


def _tool(tool: Any, param: str) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ApiError(f"{param} must be a function tool: {{'type': 'function', 'function': {{...}}}}", param=param)
    return {"type": "function", "function": function_definition(tool["function"], f"{param}.function")}


def function_definition(function: dict, param: str) -> dict:
    """A function's name, description and parameters schema, checked (and `strict`, when true)."""
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ApiError(f"{param}.name must be 1-64 letters, digits, underscores or dashes", param=f"{param}.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise ApiError(f"{param}.description must be a string", param=f"{param}.description")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ApiError(f"{param}.parameters must be a JSON schema object", param=f"{param}.parameters")
    definition: dict[str, Any] = {"name": name}
    if function.get("strict"):
        definition["strict"] = True
    if description is not None:
        definition["description"] = description
    definition["parameters"] = parameters if parameters is not None else {"type": "object", "properties": {}}
    return definition


def _choice(choice: Any, names: list[str]) -> tuple[str, str | None]:
    if choice is None:
        return "auto", None
    if choice in ("auto", "none", "required"):
        return choice, None
    named = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        function = choice.get("function")
        named = function.get("name") if isinstance(function, dict) else choice.get("name")
    if not isinstance(named, str):
        raise ApiError(
            "'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if named not in names:
        raise ApiError(f"'tool_choice' names {named!r}, which is not among the tools given", param="tool_choice")
    return "function", named


# --- reading calls out of a reply --------------------------------------------------------------------
def read_calls(text: str, names: frozenset[str] = frozenset()) -> tuple[str, list[ToolCall]]:
    """A whole reply's text outside its calls (as `CallReader` streams it), and its calls."""
    reader = CallReader(names)
    pieces = reader.add(text) + reader.finish()
    return "".join(p for p in pieces if isinstance(p, str)), reader.calls


def _call(body: str) -> ToolCall | None:
    """A call's JSON (`{"name": ..., "arguments": {...}}`); None when it is not one."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        return None
    arguments = parsed.get("arguments", parsed.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _arguments_object(arguments)
    return ToolCall(new_call_id(), parsed["name"], json.dumps(arguments, ensure_ascii=False))


class CallReader:
    """A reply's text as it streams, split into text to show and whole calls.

    Text that could be the start of a call is held back until it is one or is not. The text shown
    is the reply's text outside its calls with the whitespace at its two ends left out (the model's
    layout around its calls); a call that is not a JSON object with a name stays text, as written.

    Models of the format do not always write the tags: Qwen2.5-Coder often answers with the call's
    JSON alone (perhaps in a ```json fence). A reply that starts that way is held to its end, and
    read as calls when it is nothing but calls of the functions offered (`names`).
    """

    def __init__(self, names: frozenset[str] = frozenset()) -> None:
        self._names = names
        self._pending = ""  # not read yet: a call's opening so far, or a call still open
        self._blank = ""  # whitespace shown only if more text follows it
        self._started = False  # some text was shown
        self._bare: bool | None = None  # the reply starts like an untagged call (None: too early to say)
        self.calls: list[ToolCall] = []

    def add(self, text: str) -> list[str | ToolCall]:
        self._pending += text
        out: list[str | ToolCall] = []
        if self._names and self._bare is not False and not self._started and not self.calls:
            self._bare = _starts_bare(self._pending)
            if self._bare is not False:
                return out
        while (opened := self._pending.find(CALL_OPEN)) >= 0:
            closed = self._pending.find(CALL_CLOSE, opened)
            if closed < 0:
                self._show(self._pending[:opened], out)
                self._pending = self._pending[opened:]
                return out
            self._take_call(opened, closed + len(CALL_CLOSE), out)
        held = len(self._pending) - _partial_open(self._pending)
        self._show(self._pending[:held], out)
        self._pending = self._pending[held:]
        return out

    def finish(self) -> list[str | ToolCall]:
        """The reply ended: a last call left open (when its JSON is whole) or the text held back."""
        out: list[str | ToolCall] = []
        if self._bare:
            calls = _bare_calls(self._pending, self._names)
            if calls:
                self.calls += calls
                self._pending = ""
                return list(calls)
        if self._pending.startswith(CALL_OPEN):
            self._take_call(0, len(self._pending), out)
        self._show(self._pending, out)
        self._pending = ""
        return out

    def _take_call(self, start: int, end: int, out: list[str | ToolCall]) -> None:
        self._show(self._pending[:start], out)
        whole = self._pending[start:end]
        call = _call(whole[len(CALL_OPEN) :].removesuffix(CALL_CLOSE))
        if call is None:
            self._show(whole, out)
        else:
            self.calls.append(call)
            out.append(call)
        self._pending = self._pending[end:]

    def _show(self, text: str, out: list[str | ToolCall]) -> None:
        text = self._blank + text
        if not text.strip():
            self._blank = text
            return
        if not self._started:
            text, self._started = text.lstrip(), True
        body = text.rstrip()
        self._blank = text[len(body) :]
        out.append(body)


_FENCE = "```json"


def _starts_bare(text: str) -> bool | None:
    """Whether a reply starts like an untagged call's JSON; None while it could still go either way."""
    start = text.lstrip()
    if start.startswith(("{", "[", _FENCE)):
        return True
    if not start or _FENCE.startswith(start):
        return None
    return False


def _bare_calls(text: str, names: frozenset[str]) -> list[ToolCall]:
    """The calls a reply is made of, when it is nothing else: one call's JSON or a list of them."""
    body = text.strip()
    if body.startswith(_FENCE) and body.endswith("```"):
        body = body[len(_FENCE) : -3].strip()
    try:
        parsed = json.loads(body)
    except ValueError:
        return []
    items = parsed if isinstance(parsed, list) else [parsed]
    calls = [_call(json.dumps(item)) for item in items]
    if not calls or any(call is None or call.name not in names for call in calls):
        return []
    return [call for call in calls if call is not None]


def _partial_open(text: str) -> int:
    """The length of the longest end of `text` that begins a call's opening tag."""
    for size in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if text.endswith(CALL_OPEN[:size]):
            return size
    return 0


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def _canonical(arguments: str) -> str:
    parsed = _arguments_object(arguments)
    return json.dumps(parsed, ensure_ascii=False, sort_keys=True) if not isinstance(parsed, str) else parsed


def check_template(renders_tools: bool, source: str) -> None:
    """Refuse tools for a model whose template does not show them, or shows a call format not read here."""
    if not renders_tools:
        raise ApiError(
            "this model's chat template does not show tools to the model, so it cannot call functions; "
            "use a draft model whose GGUF template renders tools (Qwen 2.5 instruct models do)",
            param="tools",
            code="tools_not_supported",
        )
    if CALL_OPEN not in source:
        raise ApiError(
            "this model's chat template shows tools in a call format this server does not read "
            f"(it reads the Hermes/Qwen format: JSON between {CALL_OPEN} tags)",
            param="tools",
            code="tools_not_supported",
        )

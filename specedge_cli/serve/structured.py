"""Structured outputs and log-probabilities: what a request asks for, and how answers carry them.

`response_format` ({"type": "json_object"} or {"type": "json_schema", ...}) and a tool call the
model must make (`tool_choice` "required" or a named function) become one llguidance grammar
(`specedge_common.grammar`) that travels to the hub with the session: the draft drafts only what
it allows, and the hub draws every token from the target's distribution restricted to it, so the
reply is exactly what the target alone decodes under the same grammar. Log-probabilities are the
target's (the hub sends them with each verify when the session asks), before temperature and
grammar, as OpenAI reports them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from specedge_cli.errors import ApiError
from specedge_cli.serve.tools import CALL_ARGUMENTS, CALL_END, CALL_NAME, ToolUse
from specedge_common.grammar import JSON_LAYOUT, GrammarError, json_schema_grammar, lark_grammar

MAX_TOP_LOGPROBS = 20  # chat, as OpenAI (completions: 5)
MAX_COMPLETION_LOGPROBS = 5
CALL_NEXT = "\n" + CALL_NAME  # another call after one, as the model writes parallel calls


@dataclass(frozen=True)
class TokenLogprob:
    """One reply token as the answer reports it: its text and bytes, the target's log-probability,
    and its likeliest alternatives (text, bytes, log-probability)."""

    token: str
    raw: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


# --- what a request asks for ---------------------------------------------------------------------
def reply_grammar(response_format: Any, uses: ToolUse | None) -> str:
    """The grammar of the reply a chat request asks for ("" for free text); 400 for a format this
    server does not know or a schema llguidance cannot compile."""
    if uses is not None and uses.choice in ("required", "function"):
        if response_format not in (None, {"type": "text"}):
            raise ApiError(
                "response_format and a tool_choice that makes the model call a function both shape the reply; "
                "send one of them",
                param="response_format",
            )
        return _checked(call_grammar(uses), "tools")
    if response_format is None:
        return ""
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return ""
    if kind == "json_object":
        return _checked(_json_grammar({"type": "object"}), "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(
                "response_format.json_schema must be {'name': ..., 'schema': {...}, 'strict': ...}",
                param="response_format.json_schema",
            )
        return _checked(_json_grammar(spec.get("schema") or {}), "response_format.json_schema.schema")
    raise ApiError(
        "response_format.type must be 'text', 'json_object' or 'json_schema'",
        param="response_format",
    )


def _json_grammar(schema: dict) -> str:
    try:
        return json_schema_grammar(schema)
    except GrammarError as exc:
        raise ApiError(str(exc), param="response_format") from exc


def _checked(grammar: str, param: str) -> str:
    """`grammar`, once llguidance compiles it: an unsupported schema keyword is a 400 here, not a
    failure at the hub."""
    import llguidance

    problem = llguidance.LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise ApiError(f"the schema cannot be enforced: {problem}", param=param)
    return grammar


def call_grammar(uses: ToolUse) -> str:
    """The grammar of the rest of a call the model must make, after `ToolUse.reply_start` (the call's
    opening, up to its name or its arguments): the arguments as JSON of the function's parameters
    schema, the call's close; then, where parallel calls are allowed, more calls of the same kind.
    In llguidance's Lark: string literals are JSON strings, `%json` takes a schema."""
    if uses.choice == "function":
        schema = next(t["function"]["parameters"] for t in uses.tools if t["function"]["name"] == uses.function)
        return lark_grammar(f"start: {json.dumps(' ')} args {json.dumps(CALL_END)}\nargs: %json {_laid_out(schema)}")
    rules = ["start: call" + (f" ({json.dumps(CALL_NEXT)} call)*" if uses.parallel else "")]
    rules.append("call: " + " | ".join(f"c{i}" for i in range(len(uses.tools))))
    for i, tool in enumerate(uses.tools):
        function = tool["function"]
        rules.append(f"c{i}: {json.dumps(function['name'] + CALL_ARGUMENTS + ' ')} a{i} {json.dumps(CALL_END)}")
        rules.append(f"a{i}: %json {_laid_out(function['parameters'])}")
    return lark_grammar("\n".join(rules))


def _laid_out(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": JSON_LAYOUT})


def chat_logprobs(body: dict) -> int | None:
    """How many alternatives a chat request wants with each token's logprob; None: no logprobs."""
    wanted = body.get("logprobs")
    top = body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise ApiError("'logprobs' must be a boolean", param="logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ApiError(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
        if not wanted:
            raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def completion_logprobs(body: dict) -> int | None:
    """A completion request's `logprobs` (the number of alternatives); None: no logprobs."""
    wanted = body.get("logprobs")
    if wanted is None:
        return None
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 0 <= wanted <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(f"'logprobs' must be an integer from 0 to {MAX_COMPLETION_LOGPROBS}", param="logprobs")
    return wanted


# --- how answers carry them ----------------------------------------------------------------------
def chat_logprobs_body(logprobs: tuple[TokenLogprob, ...] | None) -> dict | None:
    if logprobs is None:
        return None
    return {"content": [logprob_entry(entry) for entry in logprobs], "refusal": None}


def logprob_entry(entry: TokenLogprob) -> dict:
    """A token's logprobs as chat completions (and Responses output text) report them."""
    top = [{"token": text, "logprob": value, "bytes": list(raw)} for text, raw, value in entry.top]
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.raw), "top_logprobs": top}


def completion_logprobs_body(logprobs: tuple[TokenLogprob, ...] | None, offset: int = 0) -> dict | None:
    """A completion's logprobs; `offset`: where the first token's text starts in the reply (a
    stream's chunk after others)."""
    if logprobs is None:
        return None
    offsets, at = [], offset
    for entry in logprobs:
        offsets.append(at)
        at += len(entry.token)
    return {
        "tokens": [entry.token for entry in logprobs],
        "token_logprobs": [entry.logprob for entry in logprobs],
        "top_logprobs": [{text: value for text, _, value in entry.top} for entry in logprobs],
        "text_offset": offsets,
    }

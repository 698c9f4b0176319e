"""Turning chat messages into the token ids the hub sees.

A GGUF that carries `tokenizer.chat_template` is rendered with it; otherwise a named built-in
template (a preset names one). A base model (pretrained only, or a GGUF with no template meant
for it) runs as plain completion: the prompt is the text it continues, and a later prompt
follows the reply after a blank line, as in a document being written.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:
    from specedge_cli.drafting.vocabulary import Vocabulary
    from specedge_cli.models import ResolvedModel

BUILTIN_TEMPLATES = {
    "gemma": (
        "{{ bos_token }}"
        "{% for m in messages if m.role != 'system' %}"
        "{% set role = 'model' if m.role == 'assistant' else 'user' %}"
        "<start_of_turn>{{ role }}\n"
        "{% if loop.first and system %}{{ system }}\n\n{% endif %}"
        "{{ m.content }}<end_of_turn>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "completion": (
        "{{ bos_token }}{% if system %}{{ system }}\n\n{% endif %}"
        "{% for m in messages if m.role != 'system' %}"
        "{{ m.content }}{% if m.role == 'assistant' %}\n\n{% endif %}"
        "{% endfor %}"
    ),
    "plain": (
        "{{ bos_token }}{% if system %}{{ system }}\n\n{% endif %}"
        "{% for m in messages if m.role != 'system' %}"
        "{{ 'User' if m.role == 'user' else 'Assistant' }}: {{ m.content }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}

# Stands in for the last reply when working out what a new turn adds to the context.
_REPLY_MARK = "\x00specedge-reply\x00"
# A function offered to a template to learn whether it shows tools to the model at all.
_PROBE_TOOL = {"type": "function", "function": {"name": "specedge_probe", "description": "", "parameters": {}}}


class ChatTemplate:
    """A Jinja chat template rendered as Hugging Face's `apply_chat_template` renders it (its
    `tojson`, `raise_exception`, loop controls), so a GGUF's template lays out tools as the model
    was trained to read them."""

    def __init__(self, source: str, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=False, lstrip_blocks=False, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        self._template = env.from_string(source)
        self.source = source
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        return self._template.render(
            messages=messages,
            system=system,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
        )

    def first_turn_text(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The whole prompt of a conversation's first turn."""
        return self.render(messages, tools=tools)

    def next_turn_text(
        self, messages: list[dict], reply_stop_text: str, tools: list[dict] | None = None, prompt_messages: int = 1
    ) -> str:
        """What a later turn appends after the tokens already in the context.

        messages ends with [..., assistant reply, the new turn's `prompt_messages` messages (a user
        message, or tool results)]; the context already holds everything up to the end of the reply
        (and its stop token, whose text is given).
        """
        cut = len(messages) - prompt_messages
        marked = [*messages[: cut - 1], {"role": "assistant", "content": _REPLY_MARK}, *messages[cut:]]
        text = self.render(marked, tools=tools).split(_REPLY_MARK, 1)[1]
        if reply_stop_text and text.startswith(reply_stop_text):
            text = text[len(reply_stop_text) :]
        return text

    def renders_tools(self) -> bool:
        """Whether the template shows the model the functions it is offered."""
        try:
            text = self.render([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL])
        except TemplateError:
            return False
        return "specedge_probe" in text

    def reply_text(self, message: dict, tools: list[dict] | None = None) -> str | None:
        """What the model would have written for an assistant `message` (its tool calls laid out as
        the template lays them out), or None when the template's layout does not show it whole."""
        user = {"role": "user", "content": "hi"}
        marked = self.render([user, {"role": "assistant", "content": _REPLY_MARK}], False, tools)
        before, _, after = marked.partition(_REPLY_MARK)
        whole = self.render([user, message], False, tools)
        if not (whole.startswith(before) and whole.endswith(after)) or len(whole) < len(before) + len(after):
            return None
        return whole[len(before) : len(whole) - len(after)]


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """JSON as Hugging Face's templates get it: not HTML-escaped, keys in their order."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def template_for(vocab: Vocabulary, resolved: ResolvedModel) -> ChatTemplate:
    """The template a chat with this draft model lays its prompts out with (`specedge chat` and
    `specedge serve` alike): the GGUF's own, or the preset's built-in one."""
    source = template_source(vocab.metadata("tokenizer.chat_template"), resolved)
    bos = vocab.detokenize([vocab.bos_token_id], special=True).decode("utf-8", "replace")
    add_bos = vocab.metadata("tokenizer.ggml.add_bos_token") != "false"
    return ChatTemplate(source, bos_token=bos if add_bos else "", eos_token="")


def template_source(gguf_template: str | None, resolved: ResolvedModel) -> str:
    """The template the prompt is laid out with. A base model gets plain completion even when its
    GGUF carries a chat template (Gemma's base GGUF does): it was never trained to follow one."""
    if resolved.preset and resolved.preset.base:
        return BUILTIN_TEMPLATES["completion"]
    return gguf_template or BUILTIN_TEMPLATES[resolved.chat_template or "completion"]

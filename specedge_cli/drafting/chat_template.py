"""Turning chat messages into the token ids the hub sees.

A GGUF that carries `tokenizer.chat_template` is rendered with it; otherwise a named built-in
template (a preset names one). A base model (pretrained only, or a GGUF with no template meant
for it) runs as plain completion: the prompt is the text it continues, and a later prompt
follows the reply after a blank line, as in a document being written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        self._template = env.from_string(source)
        self._bos_token = bos_token
        self._eos_token = eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        return self._template.render(
            messages=messages,
            system=system,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
        )

    def first_turn_text(self, messages: list[dict]) -> str:
        """The whole prompt of a conversation's first turn."""
        return self.render(messages)

    def next_turn_text(self, messages: list[dict], reply_stop_text: str) -> str:
        """What a later turn appends after the tokens already in the context.

        messages ends with [..., assistant reply, new user message]; the context already holds
        everything up to the end of the reply (and its stop token, whose text is given).
        """
        marked = [*messages[:-2], {"role": "assistant", "content": _REPLY_MARK}, messages[-1]]
        text = self.render(marked).split(_REPLY_MARK, 1)[1]
        if reply_stop_text and text.startswith(reply_stop_text):
            text = text[len(reply_stop_text) :]
        return text


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

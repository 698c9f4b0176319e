"""A chat sent back whole, laid out as a conversation's turns in time linear in its length.

`specedge chat` lays out each new turn by rendering the chat template over every message so far
and keeping what follows the last reply (`ChatTemplate.next_turn_text`): one render per turn, so
rebuilding N exchanges that way costs N renders of up to N messages. Here the whole conversation
is rendered once, every reply replaced by a numbered mark, and each turn's text is what lies
between two marks; the tokens are those `specedge chat` would have sent turn by turn.

That holds for templates that lay out each message by itself, as chat templates do. The first
new turn and the last prompt are also laid out the per-turn way and compared; a template for
which they differ (its generation prompt is not the assistant's header, say) gets the per-turn
layout throughout.
"""

from __future__ import annotations

from collections.abc import Sequence

from specedge_cli.conversation import Conversation, Prompt, Turn, prompt_messages


def _mark(index: int) -> str:
    return f"\x00specedge-reply-{index}\x00"


def take_up_exchanges(conversation: Conversation, exchanges: Sequence[tuple[Prompt, str]], prompt: Prompt) -> list[int]:
    """Append `exchanges` (prompt, assistant) to the conversation's turns; the tokens the last
    `prompt` then adds to the context, as `Conversation.ask` will lay it out."""
    texts = _turn_texts(conversation, exchanges, prompt)
    if texts is None or not _agrees_per_turn(conversation, exchanges, prompt, texts):
        for user, reply in exchanges:
            conversation.add_exchange(user, reply)
        return _tokens(conversation, _per_turn_text(conversation, conversation.turns, prompt))
    turns = list(conversation.turns)
    for (user, reply), text in zip(exchanges, texts):
        turn = Turn.of(user, _tokens(conversation, _after_stop(conversation, turns, text)), reply=reply, sent=True)
        turn.token_ids = conversation.engine.vocab.tokenize(reply, add_bos=False)
        turns.append(turn)
    if exchanges:
        conversation.restore(turns)
    return _tokens(conversation, _after_stop(conversation, turns, texts[-1]))


def _turn_texts(
    conversation: Conversation, exchanges: Sequence[tuple[Prompt, str]], prompt: Prompt
) -> list[str] | None:
    """Each new turn's text and then the prompt's, from one render (before a reply's stop text is
    taken off); None when a mark did not come through the template intact."""
    held = conversation.turns
    messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
    users = [turn.sent_prompt for turn in held] + [user for user, _ in exchanges] + [prompt]
    for index, user in enumerate(users[:-1]):
        messages += [*prompt_messages(user), {"role": "assistant", "content": _mark(index)}]
    messages += prompt_messages(prompt)
    rendered = conversation.template.render(messages, tools=conversation.tools)
    texts, start = [], 0
    for index in range(len(users) - 1):
        mark = _mark(index)
        end = rendered.find(mark, start)  # found by position: cutting off the rest each time would be quadratic
        if end < 0:
            return None
        texts.append(rendered[start:end])
        start = end + len(mark)
    texts.append(rendered[start:])
    return texts[len(held) :]


def _agrees_per_turn(
    conversation: Conversation, exchanges: Sequence[tuple[Prompt, str]], prompt: Prompt, texts: list[str]
) -> bool:
    """The first new turn and the prompt come out as the per-turn layout has them."""
    turns = conversation.turns
    if exchanges and texts[0] != _raw_per_turn_text(conversation, turns, exchanges[0][0]):
        return False
    later = [Turn.of(user, [], reply=reply) for user, reply in exchanges]
    return texts[-1] == _raw_per_turn_text(conversation, turns + later, prompt)


def _raw_per_turn_text(conversation: Conversation, turns: list[Turn], prompt: Prompt) -> str:
    """What `next_turn_text` renders for `prompt` after `turns`, before the stop text is taken off."""
    system = [{"role": "system", "content": conversation.system}] if conversation.system else []
    new = prompt_messages(prompt)
    messages = system + [m for turn in turns for m in turn.messages()] + new
    if not turns:
        return conversation.template.first_turn_text(messages, conversation.tools)
    return conversation.template.next_turn_text(messages, "", conversation.tools, len(new))


def _per_turn_text(conversation: Conversation, turns: list[Turn], prompt: Prompt) -> str:
    return _after_stop(conversation, turns, _raw_per_turn_text(conversation, turns, prompt))


def _after_stop(conversation: Conversation, turns: list[Turn], text: str) -> str:
    """A later turn's text without the stop token's text the previous reply already ends with."""
    last = turns[-1].token_ids[-1:] if turns else []
    if not last or last[0] not in conversation.stop_token_ids:
        return text
    stop_text = conversation.engine.vocab.detokenize(last, special=True).decode("utf-8", "replace")
    return text[len(stop_text) :] if stop_text and text.startswith(stop_text) else text


def _tokens(conversation: Conversation, text: str) -> list[int]:
    return conversation.engine.vocab.tokenize(text, add_bos=False)

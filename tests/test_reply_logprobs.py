"""Logprobs beside the text of a streamed reply, on hand-made tokens: each piece handed out carries the
logprobs of the tokens whose text it shows, whatever held that text back (an unfinished character, the
possible start of a stop sequence), and what a stop sequence cut goes with the reply's end."""

from __future__ import annotations

from specedge_cli.remote.protocol import TokenLogprobs
from specedge_cli.serve.reply_text import ReplyText
from specedge_cli.serve.slots import _Relay, _TokenLogprobs

STOP_TOKEN = 0
SPELLING = {0: b"", 1: b"he", 2: b"llo", 3: b" w", 4: b"\xc3", 5: b"\xa9!", 6: b"<", 7: b"/a>", 8: b"x"}


def spell(tokens: list[int]) -> bytes:
    return b"".join(SPELLING[token] for token in tokens)


class Scripted:
    """A relay fed tokens as verify answers would bring them, with a logprob per token (minus its id)."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.given: list[TokenLogprobs] = []
        self.pieces: list[tuple[str, list[bytes]]] = []  # (text, the raw tokens it carries)
        self.trail = _TokenLogprobs(spell, frozenset({STOP_TOKEN}), lambda: self.given)
        text = ReplyText(spell, frozenset({STOP_TOKEN}), stops)
        self.relay = _Relay(text, self._piece, logprobs=self.trail)

    def _piece(self, piece, carried) -> bool:
        self.pieces.append((piece, [entry.raw for entry in carried]))
        return True

    def accept(self, tokens: list[int]) -> bool:
        self.given += [TokenLogprobs(logprob=-float(token), top_tokens=[8], top_logprobs=[-0.5]) for token in tokens]
        return self.relay(tokens)


def test_a_piece_carries_the_tokens_it_shows_and_an_unfinished_character_waits():
    reply = Scripted()
    reply.accept([1, 2])
    reply.accept([3, 4])  # "é" is unfinished: its first byte's token waits for the piece that shows it
    reply.accept([5, STOP_TOKEN])
    reply.relay.finish()
    assert reply.pieces == [("hello", [b"he", b"llo"]), (" w", [b" w"]), ("é!", [b"\xc3", b"\xa9!"])]
    assert [entry.logprob for entry in reply.trail.all] == [-1, -2, -3, -4, -5]  # the stop token has none
    assert reply.trail.all[0].top == (("x", b"x", -0.5),)
    assert reply.trail.with_text == reply.trail.all


def test_text_held_for_a_stop_sequence_and_cut_by_it_goes_with_the_end():
    reply = Scripted(stops=("</a>",))
    reply.accept([1, 6])  # "<" may start the stop sequence: held back, and its token with it
    assert reply.pieces == [("he", [b"he"])]
    assert reply.accept([7, 8])  # the stop sequence: the reply ends, its text cut before it
    reply.relay.finish()
    assert reply.pieces == [("he", [b"he"]), ("", [b"<", b"/a>", b"x"])]
    assert len(reply.trail.all) == 4 and reply.trail.with_text == reply.trail.all


def test_held_text_that_turns_out_not_to_stop_goes_out_with_its_tokens():
    reply = Scripted(stops=("</a>",))
    reply.accept([1, 6])
    reply.accept([8])
    reply.relay.finish()
    assert reply.pieces == [("he", [b"he"]), ("<x", [b"<", b"x"])]

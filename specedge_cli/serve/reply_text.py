"""Reply text as tokens are accepted: whole characters only, cut at the first stop sequence, and
held back while its end could still be the start of one (so a stream never shows part of a stop)."""

from __future__ import annotations

import codecs
import copy
import math
from collections.abc import Callable


class ReplyText:
    def __init__(
        self, detokenize: Callable[[list[int]], bytes], stop_token_ids: frozenset[int], stops: tuple[str, ...]
    ):
        self._detokenize = detokenize
        self._stop_token_ids = stop_token_ids
        self._stops = stops
        self._tokens: list[int] = []
        self._bytes_read = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""  # the reply so far (cut at a stop sequence once one is seen)
        self.stopped = False  # a stop sequence was reached
        self._shown = 0  # how much of `text` was handed out

    def add(self, tokens: list[int]) -> str:
        """Take newly accepted tokens; the text that can be shown now."""
        if self.stopped:
            return ""
        self._tokens += [t for t in tokens if t not in self._stop_token_ids]
        data = self._detokenize(self._tokens)
        self.text += self._decoder.decode(data[self._bytes_read :])
        self._bytes_read = len(data)
        self._cut_at_stop()
        return self._take(len(self.text) if self.stopped else len(self.text) - self._could_be_stop())

    def copy(self) -> ReplyText:
        """A twin that goes on from here on its own."""
        twin = copy.copy(self)
        twin._tokens = list(self._tokens)
        twin._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        twin._decoder.setstate(self._decoder.getstate())
        return twin

    @property
    def shown(self) -> int:
        """How much of `text` was handed out."""
        return self._shown

    @property
    def end(self) -> float:
        """Where the text of the tokens added so far ends: a character further when the last ones
        left one unfinished, past all text once a stop sequence cut it (never shown)."""
        if self.stopped:
            return math.inf
        return len(self.text) + (1 if self._decoder.getstate()[0] else 0)

    def finish(self) -> str:
        """The reply ended: the rest of the text (what was held back, an unfinished character)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
            self._cut_at_stop()
        return self._take(len(self.text))

    def _cut_at_stop(self) -> None:
        found = [at for at in (self.text.find(stop) for stop in self._stops) if at >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    def _could_be_stop(self) -> int:
        """The length of the longest end of `text` that begins a stop sequence."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _take(self, upto: int) -> str:
        upto = max(upto, self._shown)
        piece, self._shown = self.text[self._shown : upto], upto
        return piece

"""How a reply reaches the screen while it is accepted, and once it is complete.

Piped (stdout is not a terminal): the raw text, as it comes, nothing added. In a terminal: the
text streams live, wrapped at word boundaries, and each block (a paragraph, a list, a fenced
code block) is shown again as Markdown, code highlighted, as soon as it is complete; the block
still being written stays live text below them. Only the block being written is redrawn, so a
long reply never has to be redrawn off the top of the screen.
"""

from __future__ import annotations

import codecs
import sys
from collections.abc import Callable, Collection
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.text import Text

CODE_THEME = "monokai"


def complete_blocks(text: str) -> int:
    """Where the Markdown blocks of `text` that can no longer change end: after the last blank
    line outside a code fence, or after a closing fence. 0 when none is complete yet."""
    end, offset, fence = 0, 0, ""
    for line in text.splitlines(keepends=True):
        offset += len(line)
        if not line.endswith("\n"):
            break  # a line still being written
        marker = line.lstrip()[:3]
        if fence:
            if marker == fence:
                fence, end = "", offset
        elif marker in ("```", "~~~"):
            fence = marker
        elif not line.strip():
            end = offset
    return end


class MarkdownStream:
    """Text in, a terminal out: complete blocks as Markdown, the rest as live text."""

    def __init__(self, console: Console):
        self.console = console
        self.text = ""
        self._shown = 0  # how much of `text` is already printed as Markdown
        self._live: Live | None = None

    def write(self, piece: str) -> None:
        self.text += piece
        end = complete_blocks(self.text)
        if end > self._shown:
            self._print_markdown(self.text[self._shown : end])
            self._shown = end
        self._live_region().update(Text(self.text[self._shown :]), refresh=True)

    def close(self) -> None:
        """The reply is complete: its last block becomes Markdown too."""
        rest = self.text[self._shown :]
        if self._live is not None:
            self._live.update(Markdown(rest, code_theme=CODE_THEME) if rest.strip() else Text(""), refresh=True)
            self._live.stop()
            self._live = None
        elif rest.strip():
            self.console.print(Markdown(rest, code_theme=CODE_THEME))
        self._shown = len(self.text)

    def _print_markdown(self, blocks: str) -> None:
        if not blocks.strip():
            return
        markdown = Markdown(blocks, code_theme=CODE_THEME)
        if self._live is not None:
            self._live.console.print(markdown)  # above the live region, which stays at the bottom
        else:
            self.console.print(markdown)
        self.console.print()

    def _live_region(self) -> Live:
        if self._live is None:
            self._live = Live(
                Text(""), console=self.console, auto_refresh=False, vertical_overflow="visible", transient=False
            )
            self._live.start()
        return self._live


class RawStream:
    """Text in, as it comes: for pipes and files."""

    def __init__(self, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.text = ""

    def write(self, piece: str) -> None:
        self.text += piece
        self.out.write(piece)
        self.out.flush()

    def close(self) -> None:
        self.out.write("\n")
        self.out.flush()


class ReplyView:
    """The `on_tokens` of a reply: decodes accepted tokens (holding back incomplete UTF-8
    sequences, leaving out stop tokens) and shows the text as Markdown or raw."""

    def __init__(
        self,
        detokenize: Callable[[list[int]], bytes],
        stop_token_ids: Collection[int],
        stream: MarkdownStream | RawStream | None = None,
    ):
        self._detokenize = detokenize
        self._stops = stop_token_ids
        self._tokens: list[int] = []
        self._printed = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stream = stream or default_stream()

    @classmethod
    def of(cls, conversation: Any) -> ReplyView:
        """A view for a reply of `conversation` (anything with `engine.vocab.detokenize` and `stop_token_ids`)."""
        return cls(conversation.engine.vocab.detokenize, conversation.stop_token_ids)

    def __call__(self, tokens: list[int]) -> None:
        self._tokens += [t for t in tokens if t not in self._stops]
        data = self._detokenize(self._tokens)
        self.stream.write(self._decoder.decode(data[self._printed :]))
        self._printed = len(data)

    def finish(self) -> None:
        self.stream.write(self._decoder.decode(b"", final=True))
        self.stream.close()


def default_stream() -> MarkdownStream | RawStream:
    """Markdown in a terminal, raw text anywhere else."""
    console = Console(highlight=False)
    return MarkdownStream(console) if console.is_terminal else RawStream()

"""How replies reach the screen: Markdown in a terminal (a real rich console), raw text in a pipe,
and the embedded hub's progress lines while it starts."""

from __future__ import annotations

import io
import shutil
import sys

import pytest

from specedge_cli.rendering import RawStream, ReplyView, complete_blocks
from specedge_cli.waiting import LogTail, progress_lines
from tests.conftest import REPO
from tests.test_repl import Terminal

REPLY = "Here is **bold** code:\n\n```python\ndef greet(name):\n    return f'hi {name}'\n```\n\nIt greets everyone who reads this sentence."


def test_blocks_are_complete_after_a_blank_line_or_a_closing_fence():
    assert complete_blocks("one paragraph") == 0
    assert complete_blocks("one\n\ntwo") == len("one\n\n")
    assert complete_blocks("```\ncode\n\nmore") == 0  # a blank line inside a fence ends nothing
    assert complete_blocks("```\ncode\n```\nafter") == len("```\ncode\n```\n")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make test installs it)")
def test_a_terminal_shows_markdown_with_highlighted_code_and_words_unbroken():
    """A real terminal (tmux) shows what it was sent: the rendered blocks, not the live text's frames."""
    script = (
        "import sys, time\n"
        "from rich.console import Console\n"
        "from specedge_cli.rendering import MarkdownStream\n"
        "stream = MarkdownStream(Console(width=30))\n"
        "text = sys.argv[1]\n"
        "for start in range(0, len(text), 7):\n"
        "    stream.write(text[start : start + 7])\n"
        "    time.sleep(0.01)\n"
        "stream.close()\n"
    )
    term = Terminal([sys.executable, "-c", script, REPLY], {"PYTHONPATH": str(REPO), "TERM": "xterm-256color"})
    try:
        screen = term.wait_for("EXIT:0")
    finally:
        term.close()
    assert "```" not in screen and "**" not in screen  # rendered, not raw fences and stars
    assert "def greet(name):" in screen and "Here is bold code:" in screen
    lines = [line.strip() for line in screen.split("EXIT:0")[0].splitlines() if line.strip()]
    words = {"It", "greets", "everyone", "who", "reads", "this", "sentence."}
    assert all(word in words for line in lines[-2:] for word in line.split())  # wrapped between words
    assert max(len(line) for line in lines) <= 30


def test_a_pipe_gets_the_raw_text_as_it_comes():
    out = io.StringIO()
    text = REPLY.encode()
    view = ReplyView(lambda tokens: text[: len(tokens)], stop_token_ids={-1}, stream=RawStream(out))
    for n in range(len(text)):
        view([n])
    view.finish()
    assert out.getvalue() == REPLY + "\n"


def test_incomplete_utf8_is_held_back_and_stop_tokens_left_out():
    out = io.StringIO()
    text = "café".encode()
    view = ReplyView(lambda tokens: text[: len(tokens)], stop_token_ids={99}, stream=RawStream(out))
    for n in range(len(text)):
        view([n])
        assert "\ufffd" not in out.getvalue()
    view([99])
    view.finish()
    assert out.getvalue() == "café\n"


def test_the_hub_logs_progress_lines_are_found_as_they_are_written(tmp_path):
    log = tmp_path / "hub.log"
    log.write_text("an older run's line: 100%|#| 9/9\n")
    tail = LogTail(log, log.stat().st_size)
    with log.open("a") as hub:
        hub.write("2026-12-01 22:55:54,142 INFO hub_server.loading: converting t.gguf into torch (once)\n")
        hub.write("Converting tensors:   0%|          | 0/9\rConverting tensors:  44%|####      | 4/9")
    first = tail.new_lines()
    assert progress_lines(first) == [
        "converting t.gguf into torch (once)",
        "Converting tensors:   0%|          | 0/9",
    ]  # the 44% bar is still being written
    with log.open("a") as hub:
        hub.write("\rConverting tensors: 100%|##########| 9/9\n")
    assert progress_lines(tail.new_lines()) == [
        "Converting tensors:  44%|####      | 4/9",
        "Converting tensors: 100%|##########| 9/9",
    ]

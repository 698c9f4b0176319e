"""Typing during a reply is not echoed into it: echo is off on a real terminal (a pty) while the
reply streams, and back on however it ends."""

from __future__ import annotations

import io
import os
import pty
import shutil
import sys
import termios

import pytest

from specedge_cli.terminal import keys_unechoed
from tests.test_repl import Terminal


def echoing(fd: int) -> bool:
    return bool(termios.tcgetattr(fd)[3] & termios.ECHO)


def test_echo_is_off_during_the_block_and_back_after_it_even_on_ctrl_c():
    leader, follower = pty.openpty()
    try:
        with os.fdopen(os.dup(follower), "r") as terminal:
            assert echoing(follower)
            with keys_unechoed(terminal):
                assert not echoing(follower)
                assert termios.tcgetattr(follower)[3] & termios.ISIG  # Ctrl+C still interrupts
            assert echoing(follower)
            with pytest.raises(KeyboardInterrupt), keys_unechoed(terminal):
                assert not echoing(follower)
                raise KeyboardInterrupt
            assert echoing(follower)
    finally:
        os.close(leader)
        os.close(follower)


def test_keys_typed_during_the_block_stay_for_the_next_prompt_unechoed():
    leader, follower = pty.openpty()
    try:
        with os.fdopen(os.dup(follower), "r") as terminal, keys_unechoed(terminal):
            os.write(leader, b"next question\n")
            assert os.read(follower, 100) == b"next question\n"  # still there to be read
            os.set_blocking(leader, False)
            with pytest.raises(BlockingIOError):
                os.read(leader, 100)  # and nothing was echoed back onto the screen
    finally:
        os.close(leader)
        os.close(follower)


def test_not_a_terminal_is_left_alone():
    with keys_unechoed(io.StringIO("piped")):
        pass


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make test installs it)")
def test_the_chat_turns_echo_off_while_a_reply_streams_and_back_on_after_ctrl_c(tiny, hub):
    term = Terminal(
        [sys.executable, "-m", "specedge_cli", "chat", "--hub", hub.url, "--model", str(tiny.gguf_q8)]
        + ["--max-tokens", "600", "--draft-len", "1"],
        {"SPECEDGE_HOME": os.environ["SPECEDGE_HOME"]},
    )
    tty = os.open(term._tmux("display-message", "-p", "#{pane_tty}").strip(), os.O_RDWR | os.O_NOCTTY)
    try:
        term.type("once upon a time there was")
        # Keys typed before the chat starts are echoed above its banner too: the reply is what
        # follows the prompt's line.
        asked = ">>> once upon a time there was\n"
        term.wait_until(
            lambda screen: asked in screen and len(screen.split(asked, 1)[1].strip()) > 5, "the reply's first tokens"
        )
        assert not echoing(tty)  # what is typed now would land in the reply
        term.send("C-c")
        term.wait_for("(stopped)")
        term.wait_for(">>> ", count=2)
        term.type("/bye")
        term.wait_for("EXIT:0")
        assert echoing(tty)  # the shell gets its terminal back as it was
    finally:
        os.close(tty)
        term.close()

"""The terminal while a reply streams: what the user types is not echoed into the reply.

Echo is switched off on the terminal for the reply and put back however the reply ends (Ctrl+C
included). What was typed stays in the terminal's input, typed ahead for the next prompt.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TextIO

try:
    import termios
except ImportError:  # Windows: its console does not echo into another program's output the same way
    termios = None  # type: ignore[assignment]


@contextlib.contextmanager
def keys_unechoed(stream: TextIO | None = None) -> Iterator[None]:
    """Turn off the echo of a terminal `stream` (stdin by default) while the block runs."""
    stream = stream or sys.stdin
    if termios is None or stream is None or not stream.isatty():
        yield
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # the local modes; ISIG stays, so Ctrl+C still interrupts
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)

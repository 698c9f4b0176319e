"""Waiting for a hub to be ready, saying on stderr what it is doing meanwhile.

A hub answers /health 503 `loading` while it loads its target, and refuses connections before
that, until its port is bound. A command waits for it instead of failing with "retry shortly". An
embedded hub converts a GGUF target into torch on its first run (a minute or two); its log has
the conversion's progress bar, which is shown while waiting.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console
from rich.status import Status

from specedge_cli import paths, settings
from specedge_cli.errors import HubUnreachable
from specedge_cli.remote.client import START_WINDOW_S, HubClient
from specedge_cli.remote.connect import HubConnection, connect_hub

REMOTE_LOAD_TIMEOUT_S = 600.0
POLL_S = 1.0
# tqdm's bar (`Converting ... tensors:  45%|████▌  | 100/222`) and the hub's own conversion line.
_PROGRESS = re.compile(r"\d+%\|")
_CONVERTING = re.compile(r"converting .* into torch", re.IGNORECASE)
# The hub's text log format: `2026-12-01 22:55:54,142 INFO hub_server.loading: message`.
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ [A-Z]+ [\w.]+: ")


@contextlib.contextmanager
def open_hub(
    address: settings.HubAddress, target: Path, insecure: bool, console: Console
) -> Iterator[tuple[HubConnection, Callable[[], None]]]:
    """The hub a command talks to (`specedge chat` and `specedge serve` alike): the one at
    `address`, or an embedded hub serving `target` (said on `console`); and a function that waits
    until it is ready, saying what it does, so the command loads its draft while a hub starts."""
    log = LogTail.of_next_run(paths.data_dir() / "embedded-hub.log")
    with connect_hub(
        address.url,
        address.token,
        address.insecure or insecure,
        target,
        log.path,
        on_embedded=lambda embedded: console.print(
            f"[dim]No hub configured: started an embedded hub at {embedded.url} "
            f"(target {target.name}); use --hub or `specedge login` for a real one.[/dim]"
        ),
    ) as connection:
        yield connection, lambda: wait_until_ready(connection, log, console)


def wait_until_ready(connection: HubConnection, log: LogTail, console: Console) -> None:
    """Wait for the hub of `connection`: an embedded one with its log's progress, another while it loads."""
    if connection.embedded is not None:
        wait_for_embedded(connection.wait_ready, log, console)
    else:
        wait_for_remote(connection.client, console)


def wait_for_remote(client: HubClient, console: Console, timeout_s: float = REMOTE_LOAD_TIMEOUT_S) -> None:
    """Return once the hub has its target loaded; say once that it is loading, if it is."""
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        health = client.health_once_up(lambda: say_starting(client, console), start_window_s())
        status = health.get("status")
        if status == "failed":
            raise HubUnreachable(f"the hub at {client.base_url} could not load its target: {health.get('reason')}")
        if status != "loading":
            return
        if not told:
            console.print(
                f"[dim]The hub at {client.base_url} is still loading its target model; waiting (Ctrl+C to stop)…[/dim]"
            )
            told = True
        if time.monotonic() > deadline:
            raise HubUnreachable(
                f"the hub at {client.base_url} was still loading its target after {timeout_s:.0f} s; try again later"
            )
        time.sleep(POLL_S)


def start_window_s() -> float:
    """How long a hub that refuses connections is waited for: reconnect-s (how long to wait for a
    hub that does not answer), at most START_WINDOW_S."""
    return min(START_WINDOW_S, settings.lookup("reconnect_s")[0])


def say_starting(client: HubClient, console: Console) -> None:
    """The one line a command prints while a hub refuses connections (it is probably starting)."""
    console.print(
        f"[dim]The hub at {client.base_url} does not answer yet (connection refused); waiting up to "
        f"{start_window_s():.0f} s for it to start (Ctrl+C to stop)…[/dim]",
        soft_wrap=True,
    )


class LogTail:
    """What a log file gained since `offset`, read as the hub writes it."""

    def __init__(self, path: Path, offset: int):
        self.path = path
        self.offset = offset
        self._pending = ""

    @classmethod
    def of_next_run(cls, path: Path) -> LogTail:
        """The lines a hub about to start will append to `path` (it keeps earlier runs' lines)."""
        return cls(path, path.stat().st_size if path.exists() else 0)

    def new_lines(self) -> list[str]:
        """Complete lines (split at newlines and at tqdm's carriage returns) written since the last call."""
        try:
            with self.path.open("rb") as log:
                log.seek(self.offset)
                data = log.read()
        except OSError:
            return []
        self.offset += len(data)
        text = self._pending + data.decode("utf-8", "replace")
        pieces = re.split(r"[\r\n]", text)
        self._pending = pieces.pop()
        return [piece.strip() for piece in pieces if piece.strip()]


def progress_lines(lines: list[str]) -> list[str]:
    """The lines worth showing (progress bars, the hub saying it converts the target), without the log's prefix."""
    return [_LOG_PREFIX.sub("", line) for line in lines if _PROGRESS.search(line) or _CONVERTING.search(line)]


def wait_for_embedded(wait_ready: Callable[[], None], log: LogTail, console: Console) -> None:
    """Run `wait_ready` (the embedded hub's) while showing its log's progress lines on stderr."""
    outcome: dict = {}

    def wait() -> None:
        try:
            wait_ready()
        except BaseException as exc:  # handed to the waiting thread below
            outcome["error"] = exc

    waiter = threading.Thread(target=wait, name="specedge-hub-wait", daemon=True)
    waiter.start()
    show = _StatusLine(console)
    try:
        while True:
            done = not waiter.is_alive()
            # Read once more after the hub is ready: what it wrote in the last wait is shown too.
            for line in progress_lines(log.new_lines()):
                show.update(line)
            if done:
                break
            waiter.join(0.25)
    finally:
        show.close()
    if "error" in outcome:
        raise outcome["error"]


class _StatusLine:
    """One line that updates in place in a terminal; elsewhere a line per new message or 25% step."""

    def __init__(self, console: Console):
        self.console = console
        self._status: Status | None = None
        self._last = ""

    def update(self, line: str) -> None:
        text = f"embedded hub: {line}"
        if self.console.is_terminal:
            if self._status is None:
                self._status = self.console.status(text)
                self._status.start()
            else:
                self._status.update(text)
            return
        if self._step(line) != self._step(self._last):
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self._last = line

    @staticmethod
    def _step(line: str) -> tuple[str, int]:
        """A line's message and its percentage rounded down to 25%: what a log reader needs to see."""
        percent = re.search(r"(\d+)%\|", line)
        message = line.split(":", 1)[0] if percent else line
        return message, int(percent.group(1)) // 25 if percent else -1

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

"""An embedded hub for users who have none: the real `hub_server` in a child process, on loopback.

It binds a free port on 127.0.0.1, loads the target model, and is stopped when the chat ends.
Other local users can reach a loopback port too, so the hub takes a random token made for this
process only, handed over in the child's environment (never its command line, which `ps` shows).

It runs in a session of its own, so the terminal's Ctrl+C stops a reply, not the hub; and if it
dies anyway (killed, out of memory), `Revival` starts it again on the same port with the same
token at the chat's next request, and the client reopens its session from its own history.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TextIO

from specedge_cli.errors import HubNotInstalled, HubUnreachable
from specedge_cli.remote.session import Reconnecting
from specedge_common.extras import HUB_INSTALL, missing_hub_modules
from specedge_common.launcher import HubProcess, HubStartError

# A killed process closes its sockets a moment before it can be reaped: the chat's first failed
# request may come before the hub's exit is seen, and should not pass for a hub that is only slow.
EXIT_GRACE_S = 0.5


def check_hub_installed() -> None:
    """Refuse, in one line that says what to install, when the hub's packages are missing."""
    missing = missing_hub_modules()
    if missing:
        raise HubNotInstalled(
            f"no hub is configured, and the embedded hub needs packages this install lacks ({', '.join(missing)}): "
            f"run `{HUB_INSTALL}`, or use a hub with --hub URL or `specedge login`"
        )


class EmbeddedHub:
    def __init__(self, target: Path, log_path: Path, startup_timeout_s: float = 600.0):
        check_hub_installed()
        self.token = secrets.token_urlsafe(32)
        self.target = target
        self.log_path = log_path
        self._timeout_s = startup_timeout_s
        self._process = self._launch(port=None)
        self.port = self._process.port
        self.url = self._process.url
        self.starting = True  # until it has answered ready

    def _launch(self, port: int | None) -> HubProcess:
        return HubProcess(
            ["--model", str(self.target)],
            log_path=self.log_path,
            token=self.token,
            port=port,
            name="the embedded hub",
            own_session=True,
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self) -> None:
        """Block until the hub answers /health with 200 (the model has loaded)."""
        try:
            self._process.wait_ready(self._timeout_s)
        except HubStartError as exc:
            raise HubUnreachable(str(exc)) from exc
        self.starting = False

    def exit_status(self, wait_s: float = 0.0) -> int | None:
        """The hub process's exit status (negative: the signal that ended it), or None if it still
        runs after `wait_s`."""
        try:
            return self._process.process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            return None

    def start_again(self) -> None:
        """A new hub process in place of one that ended: the same port and token, so the chat's
        client reaches it as before."""
        self._process.stop()  # closes its log file
        self._process = self._launch(port=self.port)
        self.starting = True

    def stop(self) -> None:
        self._process.stop()

    def __enter__(self) -> EmbeddedHub:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class Revival:
    """The outage callback of a chat on an embedded hub: a hub process that ended is started
    again, saying so in one line on `stream`; any other outage (or the hub back) goes to `notice`."""

    def __init__(self, hub: EmbeddedHub, notice: Callable[[Reconnecting], None], stream: TextIO | None = None) -> None:
        self.hub = hub
        self.notice = notice
        self.stream = stream or sys.stderr

    def __call__(self, event: Reconnecting) -> None:
        if event.back or not self._revive():
            self.notice(event)

    def _revive(self) -> bool:
        """Start the hub again if its process ended and wait until it is ready (also for one
        started before and not ready yet); False when it runs and is only slow to answer."""
        status = self.hub.exit_status(EXIT_GRACE_S)
        if status is None and not self.hub.starting:
            return False
        line = _NoticeLine(self.stream)
        if status is not None:
            self.hub.start_again()
            line.show(f"the embedded hub {_ended(status)}; starting it again (its log: {self.hub.log_path})")
        try:
            self.hub.wait_ready()
        except HubUnreachable as exc:
            line.keep()
            raise HubUnreachable(
                f"{exc.message}; the conversation is saved: run `specedge chat --continue` to take it up"
            ) from exc
        except BaseException:  # Ctrl+C while it starts: it goes on starting, waited for at the next turn
            line.keep()
            raise
        line.erase()
        return True


class _NoticeLine:
    """One line on stderr, as the hub-unreachable notice is shown: in a terminal it is erased
    when done (the cursor back on the line above, where a reply's live text ends, so its redraw
    lands where it was); elsewhere it is written once and stays."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._on_screen = False

    def show(self, text: str) -> None:
        self._on_screen = self.stream.isatty()
        self.stream.write(f"\n{text}\x1b[K" if self._on_screen else f"{text}\n")
        self.stream.flush()

    def erase(self) -> None:
        self._end("\r\x1b[K\x1b[1A")

    def keep(self) -> None:
        """End the line where it is, so what is printed next starts below it."""
        self._end("\n")

    def _end(self, control: str) -> None:
        if self._on_screen:
            self.stream.write(control)
            self.stream.flush()
            self._on_screen = False


def _ended(status: int) -> str:
    """How a process ended, from its exit status (negative: the signal that ended it)."""
    if status >= 0:
        return f"exited with code {status}"
    with contextlib.suppress(ValueError):
        return f"was killed ({signal.Signals(-status).name})"
    return f"was killed (signal {-status})"

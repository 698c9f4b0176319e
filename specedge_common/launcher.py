"""The one launcher of `hub_server serve` as a child process on a loopback port.

Used by the embedded hub of `specedge chat`, by `hub_server bench` for the hub it measures, and
by the tests. A token for the child goes in its environment (`EMBEDDED_TOKEN_ENV`), never on its
command line, which `ps` shows to every local user.

An embedded hub runs in a session of its own (`own_session`): the terminal's Ctrl+C and hangup
reach the chat, which stops its hub when it leaves, and never the hub itself. Out of the
terminal's reach, the hub must not outlive its parent: on Linux the kernel sends it SIGTERM when
the thread that started it dies, however it dies (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from specedge_common.net import free_port

# Read by `hub_server serve` as its single pre-authorised token.
EMBEDDED_TOKEN_ENV = "SPECEDGE_HUB_EMBEDDED_TOKEN"
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


class HubStartError(RuntimeError):
    """The hub exited, reported that it failed, or did not become ready in time."""


class HubProcess:
    """`python -m hub_server serve --host 127.0.0.1 --port P <serve_args>`.

    Its output goes to `log_path` (appended) or nowhere; `cores` pins it to those CPU cores;
    `token` becomes its single pre-authorised token; `name` is what error messages call it;
    `own_session` puts it out of the terminal's signals, ended with the thread that started it.
    """

    def __init__(
        self,
        serve_args: Sequence[str],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        token: str | None = None,
        cores: set[int] | None = None,
        port: int | None = None,
        cwd: Path | None = None,
        name: str = "the hub",
        own_session: bool = False,
    ):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.name = name  # how errors call it
        child_env = {**os.environ, **(env or {})}
        if token:
            child_env[EMBEDDED_TOKEN_ENV] = token
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab") if log_path is not None else None
        command = [sys.executable, "-m", "hub_server", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, *serve_args],
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=cwd,
            start_new_session=own_session,
            preexec_fn=_child_setup(cores, ended_with_parent=own_session),
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        """Block until the hub answers /health with 200 (its model has loaded); HubStartError if it
        exits, reports `failed`, or is not ready within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HubStartError(f"{self.name} exited with code {self.process.returncode}{self._see_log()}")
            health = self._health()
            if health is not None and health.status_code == 200:
                return
            if health is not None and _status(health) == "failed":
                reason = health.json().get("reason")
                raise HubStartError(f"{self.name} could not start: {reason}{self._see_log()}")
            time.sleep(0.2)
        raise HubStartError(f"{self.name} did not become ready in {timeout_s:.0f} s{self._see_log()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the hub drains), then SIGKILL if it has not exited within `timeout_s`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> HubProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _health(self) -> httpx.Response | None:
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(f"{self.url}/health", timeout=2)
        return None

    def _see_log(self) -> str:
        return f"; see {self.log_path}" if self.log_path is not None else ""


def _child_setup(cores: set[int] | None, ended_with_parent: bool) -> Callable[[], None] | None:
    """What the child does before it runs the hub: pin its cores, tie its life to this process.

    It runs between fork and exec, where another thread may have held a lock at the fork: so
    everything it calls (libc's prctl included) is looked up here, in the parent, beforehand.
    """
    prctl = _prctl() if ended_with_parent else None
    if not cores and prctl is None:
        return None
    parent = os.getpid()

    def setup() -> None:
        if cores:
            os.sched_setaffinity(0, cores)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before the request was in place
                os._exit(1)

    return setup


def _prctl() -> Callable[[int, int], int] | None:
    """libc's prctl(2) on Linux; None elsewhere (there the parent's own signal handlers stop the hub)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl: Callable[[int, int], int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def _status(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, AttributeError):
        return response.json().get("status")
    return None

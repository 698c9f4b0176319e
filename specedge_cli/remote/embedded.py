"""An embedded hub for users who have none: the real `hub_server` in a child process, on loopback.

It binds a free port on 127.0.0.1, loads the target model, and is stopped when the chat ends.
Other local users can reach a loopback port too, so the hub takes a random token made for this
process only, handed over in the child's environment (never its command line, which `ps` shows).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from specedge_cli.errors import HubNotInstalled, HubUnreachable

# Read by `hub_server serve` as its single pre-authorised token.
EMBEDDED_TOKEN_ENV = "SPECEDGE_HUB_EMBEDDED_TOKEN"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# The hub's own packages, installed by `pip install 'specedge[hub]'` (the client needs none of them).
HUB_MODULES = ("hub_server", "torch", "transformers", "fastapi", "uvicorn", "gguf")


def check_hub_installed() -> None:
    """Refuse, in one line that says what to install, when the hub's packages are missing."""
    missing = [name for name in HUB_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise HubNotInstalled(
            f"no hub is configured and the embedded hub needs packages this install lacks "
            f"({', '.join(missing)}): run `pip install 'specedge[hub]'`, or use a hub with --hub URL or `specedge login`"
        )


class EmbeddedHub:
    def __init__(self, target: Path, log_path: Path, startup_timeout_s: float = 600.0):
        check_hub_installed()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_urlsafe(32)
        self.log_path = log_path
        self._timeout_s = startup_timeout_s
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hub_server",
                "serve",
                "--model",
                str(target),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, EMBEDDED_TOKEN_ENV: self.token},
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self) -> None:
        """Block until the hub answers /health with 200 (the model has loaded)."""
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise HubUnreachable(
                    f"the embedded hub exited with code {self._process.returncode}; see {self.log_path}"
                )
            try:
                health = httpx.get(f"{self.url}/health", timeout=2)
            except httpx.TransportError:
                health = None
            if health is not None and health.status_code == 200:
                return
            if health is not None and health.json().get("status") == "failed":
                raise HubUnreachable(
                    f"the embedded hub could not start: {health.json().get('reason')}; see {self.log_path}"
                )
            time.sleep(0.2)
        raise HubUnreachable(f"the embedded hub did not become ready in {self._timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def __enter__(self) -> EmbeddedHub:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

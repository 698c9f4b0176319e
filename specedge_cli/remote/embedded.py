"""An embedded hub for users who have none: the real `hub_server` in a child process, on loopback.

It binds a free port on 127.0.0.1, loads the target model, and is stopped when the chat ends.
Other local users can reach a loopback port too, so the hub takes a random token made for this
process only, handed over in the child's environment (never its command line, which `ps` shows).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from types import TracebackType

from specedge_cli.errors import HubNotInstalled, HubUnreachable
from specedge_common.extras import HUB_INSTALL, missing_hub_modules
from specedge_common.launcher import HubProcess, HubStartError


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
        self.log_path = log_path
        self._timeout_s = startup_timeout_s
        self._process = HubProcess(
            ["--model", str(target)], log_path=log_path, token=self.token, name="the embedded hub"
        )
        self.port = self._process.port
        self.url = self._process.url

    @property
    def pid(self) -> int:
        return self._process.pid

    def wait_ready(self) -> None:
        """Block until the hub answers /health with 200 (the model has loaded)."""
        try:
            self._process.wait_ready(self._timeout_s)
        except HubStartError as exc:
            raise HubUnreachable(str(exc)) from exc

    def stop(self) -> None:
        self._process.stop()

    def __enter__(self) -> EmbeddedHub:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

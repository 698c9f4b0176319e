"""The hub a command talks to: the configured one, or an embedded hub started for this run."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from specedge_cli.remote.client import HubClient
from specedge_cli.remote.embedded import EmbeddedHub


@dataclass
class HubConnection:
    client: HubClient
    url: str
    embedded: EmbeddedHub | None = None

    def wait_ready(self) -> None:
        """Block until the hub can verify (an embedded hub loads its target first)."""
        if self.embedded is not None:
            self.embedded.wait_ready()


@contextlib.contextmanager
def connect_hub(
    url: str | None,
    token: str | None,
    insecure: bool,
    target: Path,
    embedded_log: Path,
    on_embedded: Callable[[EmbeddedHub], None] = lambda hub: None,
) -> Iterator[HubConnection]:
    """The hub at `url`; without one, an embedded hub serving `target` (the draft's own GGUF), so the
    pipeline runs anywhere. An embedded hub is stopped when the block ends."""
    if url:
        with HubClient(url, token, insecure=insecure) as client:
            yield HubConnection(client, url)
        return
    with EmbeddedHub(target, embedded_log) as embedded:
        on_embedded(embedded)
        with HubClient(embedded.url, embedded.token) as client:
            yield HubConnection(client, embedded.url, embedded)

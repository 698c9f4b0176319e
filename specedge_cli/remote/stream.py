"""A hub session's verify stream: one WebSocket, one msgpack frame each way per verify.

Hubs of protocol version 2 offer it (`GET /v1/sessions/{id}/stream`, docs/protocol.md); a verify
over HTTP is a whole request, over the stream one frame. `open_stream` opens one for a session,
or answers None when the hub does not offer it (an older hub, a proxy that refuses the upgrade):
the session then verifies over HTTP as before. websockets' errors are translated here into
`specedge_cli.errors`, the same as HTTP's: an error frame becomes the error its status and code
make over HTTP, and a stream that breaks while a verify is out is a broken connection
(`HubUnreachable`), which leaves the session in doubt exactly as a broken HTTP request does.
"""

from __future__ import annotations

import threading
from itertools import count

import httpx
import msgpack
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidProxy, InvalidURI
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect

from specedge_cli.errors import HubUnreachable
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient, hub_refusal

STREAM_VERSION = 2  # the first protocol version whose hubs offer the stream
CLOSE_TIMEOUT_S = 1.0  # closing waits this long for the hub's side of the close, no more
OPEN_TIMEOUT_S = 10.0  # an upgrade needs no model work: one this slow is taken for refused


class StreamClosed(Exception):
    """The stream was closed before a frame left (the hub closed it, or its connection dropped
    between verifies): nothing was sent, so the session is as it was."""


class StreamRefused(Exception):
    """The hub, or something in front of it, refused the upgrade: it does not offer the stream."""


def open_stream(hub: HubClient, session_id: str) -> SessionStream:
    """A stream for `session_id`; StreamRefused when the upgrade is refused (or not answered in
    OPEN_TIMEOUT_S), OSError when the hub cannot be reached (the caller verifies over HTTP then,
    which says what is wrong)."""
    url = hub.base_url.replace("http", "ws", 1) + f"/v1/sessions/{session_id}/stream"
    try:
        connection = connect(
            url,
            ssl=httpx.create_ssl_context() if url.startswith("wss:") else None,  # the trust HTTP has
            additional_headers=hub.auth_headers,
            compression=None,  # frames of a few hundred bytes: deflate would cost more than it saves
            open_timeout=OPEN_TIMEOUT_S,
            close_timeout=CLOSE_TIMEOUT_S,
            legacy=True,
        )
    except (InvalidHandshake, InvalidURI, InvalidProxy, TimeoutError) as exc:  # InvalidStatus: an HTTP answer
        raise StreamRefused(str(exc) or "the upgrade was not answered") from exc
    return SessionStream(connection, hub.base_url, hub.timeout_s)


class SessionStream:
    """Verifies over one session's stream, one at a time (a second caller waits its turn)."""

    def __init__(self, connection: ClientConnection, hub_url: str, timeout_s: float):
        self._connection = connection
        self.hub_url = hub_url
        self.timeout_s = timeout_s
        self._ids = count()
        self._one_at_a_time = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._connection.state is not State.OPEN

    def verify(self, tokens: list[int], draft: list[int], parents: list[int] | None = None) -> wire.VerifyResponse:
        """The hub's answer to one verify; StreamClosed when the stream had closed before it was sent."""
        with self._one_at_a_time:
            frame_id = next(self._ids)
            try:
                self._connection.send(verify_frame(frame_id, tokens, draft, parents))
            except ConnectionClosed as exc:
                raise StreamClosed(str(exc)) from exc
            while True:
                answer = self._receive()
                if answer.get("id") == frame_id:  # an answer to a verify given up on is not this one's
                    return answer_of(answer, self.hub_url)

    def _receive(self) -> dict:
        try:
            data = self._connection.recv(timeout=self.timeout_s, decode=False)
        except (ConnectionClosed, TimeoutError) as exc:
            raise HubUnreachable(
                f"the stream to the hub at {self.hub_url} broke while a verify was out ({exc.__class__.__name__})"
            ) from exc
        try:
            answer = msgpack.unpackb(data)
        except (ValueError, TypeError) as exc:
            raise HubUnreachable(f"the hub at {self.hub_url} sent a stream frame that is not msgpack") from exc
        if not isinstance(answer, dict):
            raise HubUnreachable(f"the hub at {self.hub_url} sent a stream frame that is not a map")
        return answer

    def close(self) -> None:
        self._connection.close()


def verify_frame(frame_id: int, tokens: list[int], draft: list[int], parents: list[int] | None) -> bytes:
    """A verify as a frame: the VerifyRequest's fields and the id its answer carries back."""
    return msgpack.packb({"id": frame_id, "tokens": tokens, "draft": draft, "parents": parents})


def answer_of(frame: dict, hub_url: str) -> wire.VerifyResponse:
    """The VerifyResponse a hub's frame carries, or the error its error frame says (as over HTTP)."""
    error = frame.get("error")
    if isinstance(error, dict):
        status, code = error.get("status", 500), error.get("code", "internal")
        message = error.get("message", f"the hub answered {status} {code}")
        raise hub_refusal(hub_url, status, code, message, error.get("retry_after"))
    return wire.VerifyResponse.from_json(frame)

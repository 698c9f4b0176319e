"""Connections `specedge serve` can afford: uvicorn's pure-Python h11 protocol, with a deadline for
each request to arrive, a cap on open connections, and refusals in OpenAI's error shape.

uvicorn keeps connections alive between requests, closes idle ones (`timeout_keep_alive`), limits
a request's line and headers (`h11_max_incomplete_event_size`) and discards the unread body of a
request answered early (a 401, a 404), so the next request on the connection starts where it
should. What it leaves open, added here:

- a client may take forever to send a request's headers and body (a hundred clients trickling
  bytes would hold a hundred connections): a request not all here `request_timeout_s` after its
  first byte (or after the connection opened) is answered 408 if the app has not seen it yet, and
  its connection closed either way. Once it is all here, the deadline is off: a long reply is not cut;
- connections past `max_connections` are answered 503 at once and closed;
- a request that is not HTTP (a bad Content-Length, a broken header) or whose head is too large is
  answered 400 / 431 with a JSON error body an OpenAI client can read, not uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import http
import json
import re
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def raw_error(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer with OpenAI's error body, written straight to the socket; it closes."""
    error = {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error"}
    body = json.dumps({"error": error | {"param": None, "code": code}}).encode()
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if status == 503:
        head.append("retry-after: 5")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_BLANK_LINE = re.compile(rb"\n\r?\n")  # the end of a request's head, as h11 finds it


class _Connection(h11.Connection):
    """h11's connection that remembers why it refused the peer's bytes (uvicorn keeps only "invalid")."""

    refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with an arrival deadline per request and a connection cap;
    `ApiServer` sets the class attributes from its limits."""

    request_timeout_s = 30.0
    max_connections = 512
    max_head_bytes = 32 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn: _Connection = _Connection(h11.SERVER, max_incomplete_event_size=self.max_head_bytes)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(
                raw_error(
                    503,
                    "server_busy",
                    f"the server has {self.max_connections} connections open, its limit; retry in a few seconds",
                )
            )
            transport.close()
            return
        self._arm()  # a connection that never sends a byte is held no longer than a slow request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # h11 checks its limit only while a head is incomplete: a larger one read at once would pass.
        if self.conn.their_state is h11.IDLE and self._head_size(data) > self.max_head_bytes:
            self._refuse_head()
            return
        super().data_received(data)
        self._follow_request()

    def _head_size(self, data: bytes) -> int:
        """The size of the request line and headers so far, with `data`."""
        pending = self.conn.trailing_data[0] + data
        end = _BLANK_LINE.search(pending)
        return end.start() if end else len(pending)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()

    def _follow_request(self) -> None:
        """The deadline runs while a request is partly here; an idle connection is left to uvicorn's
        keep-alive timer (set here too when a body answered early has only now been discarded)."""
        their, leftover = self.conn.their_state, self.conn.trailing_data[0]
        if their is h11.SEND_BODY or (their is h11.IDLE and leftover):
            if self._deadline is None:
                self._arm()
            return
        self._disarm()
        idle = their is h11.IDLE and self.conn.our_state is h11.IDLE
        if idle and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def send_400_response(self, msg: str) -> None:
        """A request h11 could not read: why, in OpenAI's shape (431 for a head over the limit)."""
        refusal = self.conn.refusal
        if refusal is not None and refusal.error_status_hint == 431:
            self._refuse_head()
            return
        self._disarm()
        why = f" ({refusal})" if refusal is not None and str(refusal) else ""
        self.transport.write(raw_error(400, "invalid_http", f"the request is not valid HTTP/1.1{why}"))
        self.transport.close()

    def _refuse_head(self) -> None:
        self._disarm()
        message = f"a request's line and headers are limited to {self.max_head_bytes // 1024} KiB here"
        self.transport.write(raw_error(431, "headers_too_large", message))
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE:  # the app has not seen it
            message = f"the request did not arrive within {self.request_timeout_s:g} s; send it whole, then wait"
            self.transport.write(raw_error(408, "request_timeout", message))
        self.transport.close()

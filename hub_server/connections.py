"""Connections a hub can afford: a deadline for each request to arrive, and a cap on open ones.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but gives a client all the time
it likes to send a request's headers and body: a hundred clients trickling bytes hold a hundred
connections forever (slowloris). Nor does it cap connections: `limit_concurrency` answers 503 to
requests, but only once their headers are in. So the hub runs uvicorn's httptools protocol with two
additions:

- a request whose headers and body have not all arrived `request_timeout_s` after its first byte
  (or, on a new connection, after it opened) is answered 408 when nothing of it has reached the
  app yet, and its connection closed either way;
- a connection past `max_connections` open ones is answered 503 at once and closed;
- a request whose line and headers pass `max_head_bytes` is answered 431 and its connection
  closed as soon as they do: uvicorn would otherwise gather any size of header (a 100 MB one
  took 14 s of the event loop, every other request waiting).

Once a request has fully arrived its deadline is off: a long streamed reply is not cut. The next
request on a kept-alive connection starts its own deadline at its first byte; until then
uvicorn's keep-alive timer closes an idle connection.

`HubServer` is uvicorn's server that remembers whether its shutdown timeout cut requests short,
so that `hub_server serve` can exit non-zero then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _raw_error(status: str, code: str, message: str, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 error answer with our JSON error body, written straight to the socket."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}"]
    if retry_after_s is not None:
        head.append(f"retry-after: {retry_after_s}")
    head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


MAX_HEAD_BYTES = 64 * 1024  # a request's line and headers; a bearer token and a few headers need < 1 KiB


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a per-request arrival deadline and a connection cap.
    `guarded_protocol` makes the class with the hub's settings."""

    request_timeout_s = 30.0
    max_connections = 1024
    max_head_bytes = MAX_HEAD_BYTES
    on_refusal: Callable[[str], None] = staticmethod(lambda code: None)  # counts refusals by code

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._headers_in = False
        self._head_bytes = 0  # of the request whose headers are arriving
        if len(self.connections) > self.max_connections:
            self.on_refusal("hub_full")
            transport.write(
                _raw_error(
                    "503 Service Unavailable",
                    "hub_full",
                    f"the hub has {self.max_connections} connections open, its limit; retry in a few seconds",
                    retry_after_s=5,
                )
            )
            transport.close()
            return
        self._arm()  # a connection that never sends a byte is held no longer than a slow request

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_in = False
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._headers_in = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()  # all of it is here: what the app does with it takes as long as it takes
        super().on_message_complete()
        self._headers_in = False  # what comes next on this connection is the next request's head
        self._head_bytes = 0

    def data_received(self, data: bytes) -> None:
        if not self._headers_in:
            # Only the head counts: where it ends in this read, the body's bytes after it do not.
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4
            if self._head_bytes > self.max_head_bytes:
                self._refuse_head()
                return
        super().data_received(data)

    def _refuse_head(self) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        self.on_refusal("headers_too_large")
        limit_kib = self.max_head_bytes // 1024
        self.transport.write(
            _raw_error(
                "431 Request Header Fields Too Large",
                "headers_too_large",
                f"a request's line and headers are limited to {limit_kib} KiB here; send fewer or shorter headers",
            )
        )
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        self.on_refusal("request_timeout")
        if not self._headers_in:  # the app has not seen this request: it can still be told why
            self.transport.write(
                _raw_error(
                    "408 Request Timeout",
                    "request_timeout",
                    f"the request did not arrive within {self.request_timeout_s:g} s; send it whole, then wait",
                )
            )
        self.transport.close()


def guarded_protocol(
    request_timeout_s: float, max_connections: int, on_refusal: Callable[[str], None] = lambda code: None
) -> type[GuardedHttpProtocol]:
    """The protocol class for `uvicorn.Config(http=...)` with these limits; `on_refusal(code)` is
    told of each connection it refuses or closes for being slow."""
    return type(
        "HubHttpProtocol",
        (GuardedHttpProtocol,),
        {
            "request_timeout_s": request_timeout_s,
            "max_connections": max_connections,
            "on_refusal": staticmethod(on_refusal),
        },
    )


class HubServer(uvicorn.Server):
    """uvicorn's server; `cut_short` tells whether the graceful shutdown ran out of time and
    cancelled requests still in flight (a reply cut off: the exit status must say so)."""

    cut_short = False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        _exit_later(self.config.timeout_graceful_shutdown or 0.0)
        if self.config.timeout_graceful_shutdown == 0 and self.server_state.tasks:
            # No time at all: uvicorn cancels its wait before it starts, so the hook below never
            # runs; whatever is in flight now is cut.
            self.cut_short = True
        await super().shutdown(sockets)

    async def _wait_tasks_to_complete(self) -> None:
        # uvicorn waits for this under `timeout_graceful_shutdown` and cancels it when time is up.
        try:
            await super()._wait_tasks_to_complete()
        except asyncio.CancelledError:
            self.cut_short = True
            raise


EXIT_GRACE_S = 5.0  # past the shutdown timeout, for what runs after the server stops (threads, Ray)


def _exit_later(timeout_s: float) -> None:
    """End the process `EXIT_GRACE_S` after the shutdown timeout whatever still runs then (a
    thread stuck in an engine call, a worker that does not answer): a stop always stops."""

    def exit_now() -> None:
        logging.getLogger("hub_server").error("hub stopped: still busy %g s after the shutdown timeout", EXIT_GRACE_S)
        os._exit(1)

    timer = threading.Timer(timeout_s + EXIT_GRACE_S, exit_now)
    timer.daemon = True
    timer.start()

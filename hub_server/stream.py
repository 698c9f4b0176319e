"""A session's verify stream: one WebSocket per session, msgpack frames both ways.

Over HTTP every verify is a request: a head both ways, routing, the middleware, a JSON body and
an access log line. The edge client verifies many times a second on one session, so the hub
offers it `GET /v1/sessions/{id}/stream` (a WebSocket upgrade): after it, a verify is one binary
frame each way.

    client -> hub  {"id": 7, "tokens": [...], "draft": [...], "parents": null}   a VerifyRequest and an id
    hub -> client  {"id": 7, "accepted", "tokens", "context_len", "verify_ms"}   its VerifyResponse
              or   {"id": 7, "error": {"status", "code", "message", "retry_after"}}

A frame is served as `Hub.verify` serves the HTTP route: the same checks, the session's turn (a
frame waits for it like a request; past 8 waiting, 429 `session_busy`), the same refusals with
the same status and code, sent as an error frame. Only a session that is gone (404) closes its
stream (code 4404), after its error frame. The upgrade is authenticated as every route is (the
Bearer token of its `Authorization` header; a refusal is an HTTP answer, as for any route).
The token is checked again before a frame once a second has passed since its last check, so a
token revoked while its stream is open is refused (401 error frames) as its next HTTP request
would be. A session has one stream in a front end: a newer one takes over (the older is closed,
code 4409), so a client that reconnects after a network fault is never refused by a stream the
hub has not yet seen die. A dropped stream loses nothing but itself: frames still waiting for the
session's turn leave the line, and one in a pass ends it and hands the turn on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import msgpack
from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from hub_server import protocol as wire
from hub_server.errors import BadRequest, RequestRefused, SessionNotFound, Unauthorized
from hub_server.logging_setup import REQUEST_ID_HEADER, bind_request, request_id_from
from hub_server.sessions import Owner

log = logging.getLogger("hub_server")

STREAM_PATH = "/v1/sessions/{session_id}/stream"
MAX_FRAME_BYTES = 1 << 20  # as for an HTTP body
SESSION_GONE = 4404  # close codes in the range kept for applications
TAKEN_OVER = 4409
TOKEN_RECHECK_S = 1.0  # a revoked token's stream is refused within this long


class Verifies(Protocol):
    """What the stream needs of the hub: its verify, as the HTTP route calls it."""

    async def verify(self, session_id: str, request: wire.VerifyRequest, owner: Owner) -> wire.VerifyResponse: ...


def add_session_stream(
    app: FastAPI,
    ready: Callable[[], Verifies],
    owner_of: Callable[[WebSocket], Awaitable[Owner]],
    on_refusal: Callable[[str], None] = lambda code: None,
) -> None:
    """Serve sessions' verify streams on `app`: `ready()` is the hub (or raises NotReady),
    `owner_of` checks the upgrade's token as every route's is, `on_refusal(code)` counts refusals."""
    streams: dict[tuple[str, str], SessionStream] = {}

    @app.websocket(STREAM_PATH)
    async def session_stream(websocket: WebSocket, session_id: str) -> None:
        request_id = request_id_from(websocket.headers.get(REQUEST_ID_HEADER))
        bind_request(request_id=request_id)
        try:
            owner = await owner_of(websocket)
        except RequestRefused as exc:
            on_refusal(exc.code)
            return await _deny(websocket, exc)
        bind_request(user=owner.name)
        await websocket.accept(headers=[(b"x-request-id", request_id.encode())])
        stream = SessionStream(websocket, session_id, owner, ready, owner_of, on_refusal)
        key = (owner.account_id, session_id)
        earlier, streams[key] = streams.get(key), stream
        if earlier is not None:
            await earlier.close(TAKEN_OVER, "another stream took over this session")
        try:
            await stream.serve()
        finally:
            if streams.get(key) is stream:
                del streams[key]


async def _deny(websocket: WebSocket, exc: RequestRefused) -> None:
    """Refuse the upgrade with the HTTP answer any route would give (status, error body, headers)."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
    if hasattr(exc, "retry_after_s"):
        headers["Retry-After"] = str(exc.retry_after_s)
    if "websocket.http.response" not in websocket.scope.get("extensions", {}):  # a server without denials
        return await websocket.close(1008, exc.code)
    body = wire.ErrorResponse(error=wire.ErrorDetail(code=exc.code, message=exc.message))
    await websocket.send_denial_response(JSONResponse(body.model_dump(), exc.status, headers))


class SessionStream:
    """One accepted stream: each frame is verified as a task of its own, so frames wait for the
    session's turn (and are refused past its line) exactly as HTTP requests do; answers go out as
    they are ready, one frame at a time."""

    def __init__(
        self,
        websocket: WebSocket,
        session_id: str,
        owner: Owner,
        ready: Callable[[], Verifies],
        owner_of: Callable[[WebSocket], Awaitable[Owner]],
        on_refusal: Callable[[str], None],
    ) -> None:
        self.websocket = websocket
        self.session_id = session_id
        self.owner = owner
        self.ready = ready
        self.owner_of = owner_of
        self.on_refusal = on_refusal
        self.verifies = 0
        self._token_checked = time.monotonic()  # at the upgrade
        self._sending = asyncio.Lock()
        self._frames: set[asyncio.Task[None]] = set()
        self._closed = False

    async def serve(self) -> None:
        """Take frames until the client leaves or the stream is closed; then give up what waits."""
        opened = time.perf_counter()
        log.info("stream opened: session %s", self.session_id)
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect" or self._closed:  # closed here: nothing more is served
                    break
                # Checked here, in arrival order, so that frames reach the session's turn in that order.
                self._take(message.get("bytes"), await self._token_refusal())
        finally:
            self._closed = True
            for frame in list(self._frames):
                frame.cancel()  # one waiting for the turn leaves the line; a pass under way still ends it
            seconds = time.perf_counter() - opened
            log.info("stream closed: session %s, %d verifies in %.1f s", self.session_id, self.verifies, seconds)

    async def _token_refusal(self) -> RequestRefused | None:
        """Why the upgrade's token no longer serves (revoked, expired), checked once a second at most."""
        if time.monotonic() - self._token_checked < TOKEN_RECHECK_S:
            return None
        try:
            await self.owner_of(self.websocket)
        except RequestRefused as exc:
            return exc
        self._token_checked = time.monotonic()
        return None

    def _take(self, data: bytes | None, refusal: RequestRefused | None) -> None:
        if data is None:
            self._refuse_later(None, BadRequest("stream frames are binary msgpack, not text (see docs/protocol.md)"))
            return
        if refusal is not None:
            self._refuse_later(_frame_id_of(data), refusal)
            return
        try:
            frame_id, request = parse_frame(data)
        except BadRequest as exc:
            self._refuse_later(_frame_id_of(data), exc)
            return
        self._start(self._answer(frame_id, request))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._frames.add(task)
        task.add_done_callback(self._frames.discard)

    def _refuse_later(self, frame_id: int | None, exc: RequestRefused) -> None:
        self._start(self._refuse(frame_id, exc))

    async def _answer(self, frame_id: int, request: wire.VerifyRequest) -> None:
        try:
            reply = await self.ready().verify(self.session_id, request, self.owner)
        except RequestRefused as exc:
            await self._refuse(frame_id, exc)
            if isinstance(exc, SessionNotFound):
                await self.close(SESSION_GONE, "the session is gone: open a new one")
            return
        except Exception:  # a fault of the hub's: answered like HTTP's 500, not left unanswered
            log.exception("stream verify failed: session %s", self.session_id)
            await self._refuse(frame_id, RequestRefused("the hub failed to verify this draft; its log says why"))
            return
        self.verifies += 1
        await self._send(result_frame(frame_id, reply))

    async def _refuse(self, frame_id: int | None, exc: RequestRefused) -> None:
        self.on_refusal(exc.code)
        log.info("stream frame refused: session %s, %d %s", self.session_id, exc.status, exc.code)
        await self._send(error_frame(frame_id, exc))

    async def _send(self, frame: bytes) -> None:
        async with self._sending:
            if self._closed:
                return
            with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected):  # the client left meanwhile
                await self.websocket.send_bytes(frame)

    async def close(self, code: int, reason: str) -> None:
        """Close the stream (the session is gone, or another stream took it over): its other
        frames are given up at once, not when the client answers the close."""
        async with self._sending:
            if self._closed:
                return
            self._closed = True
            for frame in self._frames - {asyncio.current_task()}:
                frame.cancel()
            with contextlib.suppress(WebSocketDisconnect, WebSocketDisconnected):
                await self.websocket.close(code, reason)


class _FrameTooLarge(BadRequest):
    status = 413
    code = "body_too_large"


def parse_frame(data: bytes) -> tuple[int, wire.VerifyRequest]:
    """A client's frame: its id and the VerifyRequest it carries; BadRequest says what is wrong."""
    if len(data) > MAX_FRAME_BYTES:
        raise _FrameTooLarge(f"stream frames are limited to {MAX_FRAME_BYTES} bytes")
    try:
        frame = msgpack.unpackb(data)
    except (ValueError, TypeError) as exc:  # msgpack's errors are ValueErrors; a map key that is a map: TypeError
        raise BadRequest(f"a stream frame must be one msgpack map ({exc}); see docs/protocol.md") from exc
    if not isinstance(frame, dict):
        raise BadRequest("a stream frame must be a msgpack map with an `id` and a verify request's fields")
    frame_id = frame.pop("id", None)
    if not _is_frame_id(frame_id):
        raise BadRequest("a stream frame needs an `id`: an integer from 0 to 2**63 - 1 its answer carries back")
    try:
        return frame_id, wire.VerifyRequest.model_validate(frame)
    except ValidationError as exc:
        raise BadRequest(_describe(exc)) from exc


def result_frame(frame_id: int, reply: wire.VerifyResponse) -> bytes:
    return msgpack.packb({"id": frame_id, **reply.model_dump(exclude_none=True)})


def error_frame(frame_id: int | None, exc: RequestRefused) -> bytes:
    retry_after = getattr(exc, "retry_after_s", None)
    error = {"status": exc.status, "code": exc.code, "message": exc.message, "retry_after": retry_after}
    return msgpack.packb({"id": frame_id, "error": error})


def _is_frame_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _frame_id_of(data: bytes) -> int | None:
    """The id of a frame refused as malformed, when one can be read from it (for the error frame)."""
    with contextlib.suppress(ValueError, TypeError):
        frame = msgpack.unpackb(data)
        if isinstance(frame, dict) and _is_frame_id(frame.get("id")):
            return frame["id"]
    return None


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error.get("loc", ())) or "frame"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "malformed stream frame: " + "; ".join(problems) + " (see docs/protocol.md)"

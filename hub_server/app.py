"""The hub's HTTP routes: a thin layer that parses bodies, calls the engine process's `Hub`
through `RemoteHub` (`engine_link.py`) and shapes errors.

`/health` answers 503 while the engine loads (or has failed, with why), from the link's status.
Every route but `/health` needs `Authorization: Bearer <token>`: a middleware checks it before a
body is even read, and routes get the account through the `current_owner` dependency. `/metrics`
shows hub-wide figures, so it needs an operator's token (a user added with `--role operator`);
on a hub without accounts (`--no-auth`, the embedded hub) its one user is the operator.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub_server import protocol as wire
from hub_server.accounts import SingleToken, TokenCheck, token_check_for
from hub_server.config import HubSettings
from hub_server.engine_link import EngineLink, RemoteGeneration, RemoteHub
from hub_server.errors import BadRequest, Forbidden, RequestRefused, Unauthorized
from hub_server.heap import freeze_startup_heap
from hub_server.logging_setup import REQUEST_ID_HEADER, bind_request, request_id_from
from hub_server.metrics import MEDIA_TYPE as METRICS_MEDIA_TYPE
from hub_server.sessions import LOCAL_OWNER, Owner
from hub_server.stream import add_session_stream

log = logging.getLogger("hub_server")

MAX_BODY_BYTES = 1 << 20
OPEN_PATHS = frozenset({"/health"})
VERIFY_SUFFIX = "/verify"  # POST /v1/sessions/{id}/verify


async def current_owner(request: Request) -> Owner:
    """The account the request's token belongs to (set by the authentication middleware)."""
    return request.state.owner


Caller = Annotated[Owner, Depends(current_owner)]


def _error(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = wire.ErrorResponse(error=wire.ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _error_headers(exc: RequestRefused) -> dict | None:
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if hasattr(exc, "retry_after_s"):
        return {"Retry-After": str(exc.retry_after_s)}
    return None


def _answers(*statuses: int) -> dict:
    """The error answers a route declares in the OpenAPI schema, all with our error body."""
    said = {
        401: "No, an unknown, revoked or expired token",
        403: "Not an operator's token",
        404: "No such session (or another user's)",
        409: "Draft and target vocabularies differ",
        413: "Body over 1 MiB",
        422: "Malformed body, or a request the hub cannot serve as sent",
        429: "A limit: the hub is full, a per-user limit, or requests already waiting on the session (Retry-After)",
        503: "The model is still loading, or the accounts database cannot be read",
    }
    return {status: {"model": wire.ErrorResponse, "description": said[status]} for status in statuses}


class NDJSONResponse(StreamingResponse):
    media_type = "application/x-ndjson"


class GenerationStream(NDJSONResponse):
    """A generation's chunks, one per line; the generation is closed (its session's turn given
    back) however the response ends: finished, failed, or its client gone mid-stream."""

    def __init__(self, generation: RemoteGeneration) -> None:
        self.generation = generation
        super().__init__(chunk.model_dump_json() + "\n" async for chunk in generation)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.generation.aclose()


def _errors_as_json(schema: dict) -> dict:
    """FastAPI gives a route's error answers its success media type; a refusal of the NDJSON
    stream or of the metrics page is a JSON error body all the same (application/json), so the
    schema says so."""
    for operation in (op for path in schema["paths"].values() for op in path.values()):
        for status, answer in operation.get("responses", {}).items():
            content = answer.get("content", {})
            for media_type in ("application/x-ndjson", "text/plain"):
                if status.startswith(("4", "5")) and media_type in content:
                    content["application/json"] = content.pop(media_type)
    return schema


def _describe_validation(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "malformed request: " + "; ".join(problems) + " (see docs/protocol.md)"


def _verify_request(body: bytes, content_type: str | None) -> wire.VerifyRequest:
    """A verify's body as FastAPI would take it (JSON, whatever the declared type says if it
    says none), or RequestValidationError saying what is wrong."""
    if content_type and not _is_json(content_type):
        loc = ("body",)
        raise RequestValidationError([{"loc": loc, "msg": "the body must be JSON (Content-Type: application/json)"}])
    try:
        return wire.VerifyRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]) from None


def _is_json(content_type: str) -> bool:
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class HubMiddleware:
    """The checks every request passes, as one plain ASGI layer (no per-request task groups):
    a request id, bodies over `max_bytes` refused (declared or not), the token checked before a
    body is read, and one access log line."""

    def __init__(self, app: ASGIApp, token_check: TokenCheck | None, max_bytes: int, metrics: RefusalCounter) -> None:
        self.app = app
        self.token_check = token_check
        self.max_bytes = max_bytes
        self.metrics = metrics  # refusals are counted by code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        bind_request(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        try:
            refusal = await self._refusal(request)
            if refusal is not None:
                return await refusal(scope, receive, send_with_id)
            await self.app(scope, self._counted(receive), send_with_id)
        finally:
            self._log(request, status, started)

    async def _refusal(self, request: Request) -> JSONResponse | None:
        """The answer to a request refused before its body is read, or None to serve it."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            self.metrics.record_refusal("body_too_large")
            return _error(413, "body_too_large", f"request bodies are limited to {self.max_bytes} bytes")
        if request.url.path in OPEN_PATHS:
            return None
        try:
            owner = await _owner_of(request, self.token_check)
        except RequestRefused as exc:  # refused or expired tokens; an unreadable accounts database (503)
            if exc.status >= 500:
                log.error("%s", exc.message)
            self.metrics.record_refusal(exc.code)
            return _error(exc.status, exc.code, exc.message, _error_headers(exc))
        request.state.owner = owner
        bind_request(user=owner.name)
        return None

    def _counted(self, receive: Receive) -> Receive:
        """`receive`, refusing a body past the limit as it arrives (a chunked upload declares no length)."""
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI passes an HTTPException raised while reading the body on to `no_such_route`.
                raise StarletteHTTPException(413, f"request bodies are limited to {self.max_bytes} bytes")
            return message

        return counted_receive

    @staticmethod
    def _log(request: Request, status: int, started: float) -> None:
        # The path only: never headers (tokens) nor the query string.
        path = request.url.path
        fields = {
            "method": request.method,
            "path": path,
            "status": status,
            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        }
        if hasattr(request.state, "owner"):
            fields["user"] = request.state.owner.name
        # Health probes come every few seconds, and a session's verifies many times a second (each
        # counted in /metrics, as the session stream's frames are): their lines would drown the
        # lines that matter, and cost the front end a twentieth of its time. A refused one is logged.
        quiet = path in OPEN_PATHS or (status < 400 and path.endswith(VERIFY_SUFFIX))
        log.log(logging.DEBUG if quiet else logging.INFO, "%s %s %d", request.method, path, status, extra=fields)


class RefusalCounter(Protocol):
    def record_refusal(self, code: str) -> None:
        """Count a request refused with `code` (/metrics)."""


class HubState:
    """The hub in the engine process (`RemoteHub`), and whether it is up: its link keeps the
    engine's status (loading, ready, failed)."""

    def __init__(self, link: EngineLink) -> None:
        self.link = link
        self.hub = RemoteHub(link)

    def ready(self) -> RemoteHub:
        if self.link.status.state != "ready":
            raise self.link.unavailable()
        return self.hub

    def health(self) -> JSONResponse:
        status = self.link.status
        if status.state == "failed":
            return JSONResponse({"status": "failed", "reason": status.reason}, status_code=503)
        if status.state == "loading":
            return JSONResponse({"status": "loading", "reason": status.reason}, status_code=503)
        body, serving = self.hub.health()
        # A hub whose every worker is lost serves nothing until one comes back.
        return JSONResponse(body, 200 if serving else 503)


async def _owner_of(request: Request | WebSocket, token_check: TokenCheck | None) -> Owner:
    if token_check is None:
        return LOCAL_OWNER
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "this hub needs an API token: send `Authorization: Bearer <token>` "
            "(`specedge login`); the hub's operator creates tokens with `hub_server tokens create`"
        )
    if isinstance(token_check, SingleToken):  # in memory: no thread needed
        owner = token_check.owner_for_token(token.strip())
    else:  # a database lookup must not block the event loop
        owner = await run_in_threadpool(token_check.owner_for_token, token.strip())
    if owner is None:
        raise Unauthorized(
            "the API token is unknown or revoked; ask the hub's operator for a new one and run `specedge login`"
        )
    return owner


def _operators_only(owner: Owner, why: str) -> None:
    if not owner.operator:
        raise Forbidden(
            f"{why}, so it is for its operators; {owner.name!r} is not one "
            "(the operator adds a user with `hub_server users add NAME --role operator`)"
        )


def create_app(settings: HubSettings, link: EngineLink) -> FastAPI:
    """The hub's app: a front end of the engine process its `link` reaches (`front_ends.py`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await link.start()
        freeze_startup_heap("front end")
        yield
        await link.stop()

    # The schema is served behind authentication like every other route; no public docs pages.
    app = FastAPI(
        title="SpecEdge hub",
        version=str(wire.PROTOCOL_VERSION),
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    state = HubState(link)
    token_check = token_check_for(settings)

    # Refusals are counted where the hub's /metrics page is made: in the engine process.
    def refuse(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
        link.record_refusal(code)
        return _error(status, code, message, headers)

    app.state.hub_state = state
    app.add_middleware(HubMiddleware, token_check=token_check, max_bytes=MAX_BODY_BYTES, metrics=link)

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused) -> JSONResponse:
        return refuse(exc.status, exc.code, exc.message, _error_headers(exc))

    @app.exception_handler(StarletteHTTPException)
    async def no_such_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's "error parsing the body": bytes that are not UTF-8, JSON nested too deep
            return refuse(
                BadRequest.status,
                BadRequest.code,
                "malformed request: the body is not JSON in UTF-8, or is nested too deep (see docs/protocol.md)",
            )
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        return refuse(
            exc.status_code,
            code,
            f"{request.method} {request.url.path}: {exc.detail} (see docs/protocol.md)",
            exc.headers,  # a 405 says which methods the route has (Allow)
        )

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        return refuse(BadRequest.status, BadRequest.code, _describe_validation(exc))

    @app.get("/health", responses={503: {"description": "Loading, or failed to load: `reason` says why"}})
    def health() -> JSONResponse:
        return state.health()

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return _errors_as_json(app.openapi())

    plain = _answers(401, 429, 503)  # what any authenticated route may answer
    on_session = _answers(401, 404, 413, 422, 429, 503)

    @app.get("/v1/info", responses=plain)
    def info() -> wire.HubInfo:
        return state.ready().info()

    @app.get("/v1/whoami", responses=plain)
    def whoami(owner: Caller) -> wire.WhoAmIResponse:
        return state.ready().whoami(owner)

    @app.post("/v1/sessions", responses=_answers(401, 409, 413, 422, 429, 503))
    def open_session(body: wire.OpenSessionRequest, owner: Caller) -> wire.OpenSessionResponse:
        return state.ready().open_session(body, owner)

    # Routes that wait for a session's turn run on the event loop: a waiting request holds no thread.
    @app.post("/v1/sessions/{session_id}/feed", responses=on_session)
    async def feed(session_id: str, body: wire.FeedRequest, owner: Caller) -> wire.FeedResponse:
        return await state.ready().feed(session_id, body, owner)

    # The hot route, documented here (the schema) and served by `verify_now` below.
    @app.post("/v1/sessions/{session_id}/verify", response_model=wire.VerifyResponse, responses=on_session)
    async def verify(session_id: str, body: wire.VerifyRequest, owner: Caller) -> Response:
        return await verify_now(session_id, body, owner)

    async def verify_now(session_id: str, body: wire.VerifyRequest, owner: Owner) -> Response:
        reply = await state.ready().verify(session_id, body, owner)
        return Response(reply.model_dump_json(exclude_none=True), media_type="application/json")

    async def verify_route(request: Request) -> Response:
        """The verify route without FastAPI's handling of dependencies and bodies, which costs a
        verify more CPU than the rest of its way through the front end: the body parsed and
        checked by pydantic in one call, refusals answered by the same handlers."""
        body = _verify_request(await request.body(), request.headers.get("content-type"))
        return await verify_now(request.path_params["session_id"], body, request.state.owner)

    app.router.routes.insert(0, Route("/v1/sessions/{session_id}/verify", verify_route, methods=["POST"]))

    @app.post(
        "/v1/sessions/{session_id}/generate",
        response_class=NDJSONResponse,
        responses={200: {"model": wire.GenerateChunk, "description": "One GenerateChunk per line"}, **on_session},
    )
    async def generate(session_id: str, body: wire.GenerateRequest, owner: Caller) -> GenerationStream:
        return GenerationStream(await state.ready().generate(session_id, body, owner))

    @app.get("/metrics", response_class=PlainTextResponse, responses=_answers(401, 403, 503))
    def metrics_page(owner: Caller) -> Response:
        _operators_only(owner, "the metrics page shows the whole hub")
        return Response(state.ready().metrics_page(), media_type=METRICS_MEDIA_TYPE)

    @app.get("/v1/workers", responses=_answers(401, 403, 503))
    def workers(owner: Caller) -> wire.WorkerList:
        _operators_only(owner, "the workers list shows the whole hub")
        return state.ready().listing()

    @app.post("/v1/workers/{worker_id}/drain", responses=_answers(401, 403, 404, 503))
    def drain(worker_id: str, owner: Caller) -> wire.WorkerInfo:
        _operators_only(owner, "draining a worker changes the whole hub")
        return state.ready().drain(worker_id)

    @app.post("/v1/workers/{worker_id}/undrain", responses=_answers(401, 403, 404, 503))
    def undrain(worker_id: str, owner: Caller) -> wire.WorkerInfo:
        _operators_only(owner, "undraining a worker changes the whole hub")
        return state.ready().undrain(worker_id)

    @app.delete("/v1/sessions/{session_id}", status_code=204, responses=_answers(401, 404, 429, 503))
    async def close(session_id: str, owner: Caller) -> None:
        await state.ready().close(session_id, owner)

    # The edge client's verifies, one frame each way on a WebSocket per session (stream.py).
    add_session_stream(app, state.ready, lambda websocket: _owner_of(websocket, token_check), link.record_refusal)
    return app

"""The hub's HTTP routes: a thin layer that parses bodies, calls `Hub` and shapes errors.

The model loads in a background thread so that `/health` can answer 503 while it does.
Every route but `/health` needs `Authorization: Bearer <token>`: a middleware checks it before a
body is even read, and routes get the user through the `current_user` dependency.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Annotated, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub_server import protocol as wire
from hub_server.accounts import Accounts, SingleToken, TokenCheck
from hub_server.config import HubSettings
from hub_server.errors import BadRequest, HubError, NotReady, Unauthorized
from hub_server.logs import REQUEST_ID_HEADER, bind_request, request_id_from
from hub_server.service import Hub
from hub_server.sessions import LOCAL_USER

log = logging.getLogger("hub_server")

MAX_BODY_BYTES = 1 << 20
OPEN_PATHS = frozenset({"/health"})


def token_check_for(settings: HubSettings) -> TokenCheck | None:
    """How this hub checks tokens: one in-memory token (embedded), none (--no-auth), or the accounts database."""
    if settings.embedded_token:
        return SingleToken(settings.embedded_token)
    if not settings.auth:
        return None
    return Accounts(settings.accounts_path)


def current_user(request: Request) -> str:
    """The user the request's token belongs to (set by the authentication middleware)."""
    return request.state.user


User = Annotated[str, Depends(current_user)]


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    body = wire.ErrorResponse(error=wire.ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "malformed request: " + "; ".join(problems) + " (see docs/protocol.md)"


class BodyLimit:
    """Refuses a body over `max_bytes` as it arrives, whether or not it declared its length
    (a chunked upload has no Content-Length for the `limit_body` check to read)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # FastAPI passes an HTTPException raised while reading the body on to `no_such_route`.
                raise StarletteHTTPException(413, f"request bodies are limited to {self.max_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send)


class HubState:
    """The hub once its model has loaded, or why it has not."""

    def __init__(self) -> None:
        self.hub: Hub | None = None
        self.failure: str | None = None

    def ready(self) -> Hub:
        if self.hub is None:
            raise NotReady(self.failure or "the target model is still loading; retry shortly")
        return self.hub


async def _user_of(request: Request, token_check: TokenCheck | None) -> str:
    if token_check is None:
        return LOCAL_USER
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this hub needs an API token: send `Authorization: Bearer <token>` "
                           "(`specedge login`); the hub's operator creates tokens with `hub_server tokens create`")
    user = await run_in_threadpool(token_check.user_for_token, token.strip())
    if user is None:
        raise Unauthorized("the API token is unknown or revoked; ask the hub's operator for a new one and run `specedge login`")
    return user


def create_app(settings: HubSettings, make_runner: Callable[[HubSettings], object]) -> FastAPI:
    # The schema is served behind authentication like every other route; no public docs pages.
    app = FastAPI(title="SpecEdge hub", version=str(wire.PROTOCOL_VERSION),
                  openapi_url=None, docs_url=None, redoc_url=None)
    state = HubState()
    token_check = token_check_for(settings)

    def load() -> None:
        try:
            state.hub = Hub(settings, make_runner(settings))
            log.info("hub ready: %s", settings.model)
        except Exception as exc:  # the reason is served by /health; the hub stays up to say it
            state.failure = f"the target model failed to load: {exc}"
            log.exception("model load failed")

    threading.Thread(target=load, name="model-load", daemon=True).start()
    app.state.hub_state = state
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path not in OPEN_PATHS:
            try:
                request.state.user = await _user_of(request, token_check)
            except Unauthorized as exc:
                return _error(exc.status, exc.code, exc.message, {"WWW-Authenticate": "Bearer"})
            bind_request(user=request.state.user)
        return await call_next(request)

    @app.middleware("http")
    async def access_log(request: Request, call_next):
        request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        bind_request(request_id=request_id)
        started = time.perf_counter()
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = request_id
        # The path only: never headers (tokens) nor the query string.
        fields = {"method": request.method, "path": request.url.path, "status": response.status_code,
                  "duration_ms": round((time.perf_counter() - started) * 1000, 2)}
        if hasattr(request.state, "user"):
            fields["user"] = request.state.user
        # Health probes come every few seconds; they would drown the lines that matter.
        level = logging.DEBUG if request.url.path in OPEN_PATHS else logging.INFO
        log.log(level, "%s %s %d", request.method, request.url.path, response.status_code, extra=fields)
        return response

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if hasattr(exc, "retry_after_s") else None
        return _error(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def no_such_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail} (see docs/protocol.md)")

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(BadRequest.status, BadRequest.code, _describe_validation(exc))

    @app.get("/health")
    def health() -> JSONResponse:
        if state.failure:
            return JSONResponse({"status": "failed", "reason": state.failure}, status_code=503)
        if state.hub is None:
            return JSONResponse({"status": "loading", "reason": "the target model is loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.hub.runner.name})

    @app.get("/openapi.json", include_in_schema=False)
    def openapi() -> dict:
        return app.openapi()

    @app.get("/v1/info")
    def info() -> wire.HubInfo:
        return state.ready().info()

    @app.get("/v1/whoami")
    def whoami(user: User) -> wire.WhoAmIResponse:
        return state.ready().whoami(user)

    @app.post("/v1/sessions")
    def open_session(body: wire.OpenSessionRequest, user: User) -> wire.OpenSessionResponse:
        return state.ready().open_session(body, user)

    @app.post("/v1/sessions/{session_id}/feed")
    def feed(session_id: str, body: wire.FeedRequest, user: User) -> wire.FeedResponse:
        return state.ready().feed(session_id, body, user)

    @app.post("/v1/sessions/{session_id}/verify")
    def verify(session_id: str, body: wire.VerifyRequest, user: User) -> wire.VerifyResponse:
        return state.ready().verify(session_id, body, user)

    @app.post("/v1/sessions/{session_id}/generate")
    def generate(session_id: str, body: wire.GenerateRequest, user: User) -> StreamingResponse:
        chunks = state.ready().generate(session_id, body, user)
        return StreamingResponse((chunk.model_dump_json() + "\n" for chunk in chunks),
                                 media_type="application/x-ndjson")

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.ready().metrics_page(), media_type="text/plain; version=0.0.4")

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    def close(session_id: str, user: User) -> None:
        state.ready().close(session_id, user)

    return app

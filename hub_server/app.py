"""The hub's HTTP routes: a thin layer that parses bodies, calls `Hub` and shapes errors.

The model loads in a background thread so that `/health` can answer 503 while it does.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from hub_server import protocol as wire
from hub_server.config import HubSettings
from hub_server.errors import BadRequest, HubError, NotReady
from hub_server.service import Hub

log = logging.getLogger("hub_server")

MAX_BODY_BYTES = 1 << 20


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    body = wire.ErrorResponse(error=wire.ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _describe_validation(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors()[:3]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "malformed request: " + "; ".join(problems) + " (see docs/protocol.md)"


class HubState:
    """The hub once its model has loaded, or why it has not."""

    def __init__(self) -> None:
        self.hub: Hub | None = None
        self.failure: str | None = None

    def ready(self) -> Hub:
        if self.hub is None:
            raise NotReady(self.failure or "the target model is still loading; retry shortly")
        return self.hub


def create_app(settings: HubSettings, make_runner: Callable[[HubSettings], object]) -> FastAPI:
    app = FastAPI(title="SpecEdge hub", version=str(wire.PROTOCOL_VERSION))
    state = HubState()

    def load() -> None:
        try:
            state.hub = Hub(settings, make_runner(settings))
            log.info("hub ready: %s", settings.model)
        except Exception as exc:  # the reason is served by /health; the hub stays up to say it
            state.failure = f"the target model failed to load: {exc}"
            log.exception("model load failed")

    threading.Thread(target=load, name="model-load", daemon=True).start()
    app.state.hub_state = state

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)} if hasattr(exc, "retry_after_s") else None
        return _error(exc.status, exc.code, exc.message, headers)

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

    @app.get("/v1/info")
    def info() -> wire.HubInfo:
        return state.ready().info()

    @app.post("/v1/sessions")
    def open_session(body: wire.OpenSessionRequest) -> wire.OpenSessionResponse:
        return state.ready().open_session(body)

    @app.post("/v1/sessions/{session_id}/feed")
    def feed(session_id: str, body: wire.FeedRequest) -> wire.FeedResponse:
        return state.ready().feed(session_id, body)

    @app.post("/v1/sessions/{session_id}/verify")
    def verify(session_id: str, body: wire.VerifyRequest) -> wire.VerifyResponse:
        return state.ready().verify(session_id, body)

    @app.post("/v1/sessions/{session_id}/generate")
    def generate(session_id: str, body: wire.GenerateRequest) -> StreamingResponse:
        chunks = state.ready().generate(session_id, body)
        return StreamingResponse((chunk.model_dump_json() + "\n" for chunk in chunks),
                                 media_type="application/x-ndjson")

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.ready().metrics_page(), media_type="text/plain; version=0.0.4")

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    def close(session_id: str) -> None:
        state.ready().close(session_id)

    return app

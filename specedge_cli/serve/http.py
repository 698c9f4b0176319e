"""The HTTP side of `specedge serve`: the standard library's threading server (no web framework,
so the client install stays light), OpenAI's routes, server-sent events, an optional API key.

One thread per connection; a request decodes on its own thread in the slot it was given, so a
stream's chunks are written as the hub accepts tokens. Streams use chunked transfer encoding,
which keeps HTTP/1.1 connections alive between requests as the openai SDK expects.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from specedge_cli.errors import ApiError, SpecEdgeError
from specedge_cli.serve import openai_api as api
from specedge_cli.serve.slots import EdgeModel

MAX_BODY = 16 * 1024 * 1024  # bytes; a long conversation is well under this
log = logging.getLogger("specedge.serve")


class ApiServer(ThreadingHTTPServer):
    daemon_threads = True  # a stream still open does not hold up Ctrl+C
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], model: EdgeModel, api_key: str | None = None):
        super().__init__(address, ApiHandler)
        self.model = model
        self.api_key = api_key


class ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "specedge-serve"
    server: ApiServer

    # --- routes ---------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle(self._get)

    def do_POST(self) -> None:
        self._handle(self._post)

    def do_DELETE(self) -> None:
        self._handle(lambda: self._no_route("DELETE"))

    def _get(self) -> None:
        model = self.server.model
        path = self._path()
        if path in ("/", "/health"):
            self._send_json(200, {"status": "ok", "model": model.model_id})
        elif path == "/v1/models":
            self._authorize()
            self._send_json(200, api.model_list(model.model_id, model.created))
        elif path.startswith("/v1/models/"):
            self._authorize()
            model.check_model(path.removeprefix("/v1/models/"))
            self._send_json(200, api.model_card(model.model_id, model.created))
        else:
            self._no_route("GET")

    def _post(self) -> None:
        path = self._path()
        if path == "/v1/chat/completions":
            self._authorize()
            self._complete("chat", api.chat_request(self._body()))
        elif path == "/v1/completions":
            self._authorize()
            self._complete("text", api.completion_request(self._body()))
        else:
            self._no_route("POST")

    def _no_route(self, method: str) -> None:
        known = {"/", "/health", "/v1/models", "/v1/chat/completions", "/v1/completions"}
        if self._path() in known or self._path().startswith("/v1/models/"):
            raise ApiError(f"{method} is not allowed on {self._path()}", status=405, code="method_not_allowed")
        raise ApiError(
            f"no route {method} {self._path()}; this server offers GET /v1/models, POST /v1/chat/completions "
            "and POST /v1/completions",
            status=404,
            code="not_found",
        )

    # --- one completion ---------------------------------------------------------------------------
    def _complete(self, kind: str, request: api.ChatRequest | api.CompletionRequest) -> None:
        model = self.server.model
        decode = model.chat if kind == "chat" else model.complete
        request_id = api.new_id(kind)
        if not request.options.stream:
            answer = decode(request, lambda text: True)  # type: ignore[arg-type]
            build = api.chat_completion if kind == "chat" else api.text_completion
            self._send_json(200, build(request_id, model.model_id, answer))
            return
        stream = _EventStream(self, kind, request_id, model.model_id)
        try:
            answer = decode(request, stream.text)  # type: ignore[arg-type]
        except SpecEdgeError as exc:
            if not stream.started:
                raise
            stream.error(_api_error(exc))  # the status line is out: the failure goes in the stream
        else:
            stream.finish(answer, request.options.include_usage)
        stream.close()

    # --- plumbing -----------------------------------------------------------------------------------
    def _handle(self, route: Callable[[], None]) -> None:
        try:
            route()
        except SpecEdgeError as exc:  # refused: by us, or by the draft's side (a context past its size, ...)
            error = _api_error(exc)
            self._send_json(error.status, api.error_body(error))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to answer
        except Exception as exc:  # a bug: answer 500 in OpenAI's shape and keep serving the others
            log.exception("request failed")
            error = ApiError(f"internal error ({exc.__class__.__name__}); see the server's log", status=500)
            self._send_json(500, api.error_body(error))

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/") or "/"

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(
                "Incorrect API key provided: pass the key `specedge serve --api-key` was started with "
                "(Authorization: Bearer KEY)",
                status=401,
                code="invalid_api_key",
            )

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError("a request body needs a Content-Length header", status=411, code="length_required")
        if int(length) > MAX_BODY:
            self.close_connection = True  # the body stays unread
            raise ApiError(f"the body is over {MAX_BODY} bytes", status=413, code="body_too_large")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError("the body is not valid JSON", code="invalid_json") from None

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


def _api_error(exc: SpecEdgeError) -> ApiError:
    """An error as the API answers it: ours as it is, the client's others (the draft's side) as 400."""
    return exc if isinstance(exc, ApiError) else ApiError(exc.message, status=400, code="invalid_request")


class _EventStream:
    """A server-sent event stream of completion chunks, ending with `data: [DONE]`."""

    def __init__(self, handler: ApiHandler, kind: str, request_id: str, model: str):
        self.handler, self.kind, self.request_id, self.model = handler, kind, request_id, model
        self.started = False
        self.gone = False

    def text(self, piece: str) -> bool:
        """Send a piece of reply text; False once the client has gone away."""
        if self.kind == "chat":
            self._event(api.chat_chunk(self.request_id, self.model, {"content": piece}))
        else:
            self._event(api.text_chunk(self.request_id, self.model, piece))
        return not self.gone

    def finish(self, answer: api.Answer, include_usage: bool) -> None:
        if self.kind == "chat":
            self._event(api.chat_chunk(self.request_id, self.model, {}, answer.finish_reason))
        else:
            self._event(api.text_chunk(self.request_id, self.model, "", answer.finish_reason))
        if include_usage:
            self._event(api.usage_chunk(self.request_id, self.model, self.kind, answer))

    def error(self, error: ApiError) -> None:
        self._event(api.error_body(error))

    def close(self) -> None:
        self._start()
        self._write(b"data: [DONE]\n\n")
        self._write(b"")  # the last chunk of the chunked encoding

    def _event(self, body: dict) -> None:
        self._start()
        self._write(f"data: {json.dumps(body)}\n\n".encode())

    def _start(self) -> None:
        """The status line and headers, then (for chat) the chunk that names the role."""
        if self.started:
            return
        self.started = True
        handler = self.handler
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        if self.kind == "chat":
            self._event(api.chat_chunk(self.request_id, self.model, {"role": "assistant", "content": ""}))

    def _write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            self.handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.gone = True
            self.handler.close_connection = True

"""The HTTP side of `specedge serve`: OpenAI's routes on starlette, served by uvicorn's pure-Python
h11 protocol (`connections.py`), with server-sent events and an optional API key.

Both stay small and need no pydantic, so the client install stays light. The event loop only
moves bytes: reading a request's JSON and decoding it (tokenizing, drafting in a slot's llama.cpp
context, waiting for the hub) run on a thread each, so a long request never stalls `/health` or
another client's stream. A stream's pieces cross from that thread to the loop through a queue.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive

from specedge_cli.errors import ApiError, SpecEdgeError
from specedge_cli.serve import openai_api as api
from specedge_cli.serve import responses_api
from specedge_cli.serve.connections import GuardedH11Protocol
from specedge_cli.serve.openai_api import Answer, ChatRequest, CompletionRequest
from specedge_cli.serve.responses_api import ResponseEvents, ResponseRequest
from specedge_cli.serve.slots import EdgeModel
from specedge_cli.serve.structured import TokenLogprob, chat_logprobs_body, completion_logprobs_body
from specedge_cli.serve.tools import ToolCall

T = TypeVar("T")
# A piece of a reply (text, or a whole tool call) with the logprobs of the tokens it carries.
Piece = tuple[str | ToolCall, tuple[TokenLogprob, ...]]
MAX_BODY = 16 * 1024 * 1024  # bytes; a long conversation is well under this
log = logging.getLogger("specedge.serve")


@dataclass(frozen=True)
class ServeLimits:
    """What one connection may hold of the server."""

    # A kept-alive connection with no request; above httpx's own 5 s, so that clients close first.
    idle_timeout_s: float = 15.0
    request_timeout_s: float = 30.0  # for a request's line, headers and body to arrive
    max_connections: int = 512  # open at once; more are answered 503 and closed
    max_head_bytes: int = 32 * 1024  # a request's line and headers
    backlog: int = 1024  # connections the kernel queues before they are accepted
    shutdown_timeout_s: int = 5  # replies in flight at Ctrl+C get this long to end


class ApiServer:
    """`specedge serve`'s listening socket and the uvicorn server on it."""

    def __init__(
        self, address: tuple[str, int], model: EdgeModel, api_key: str | None = None, limits: ServeLimits | None = None
    ):
        self.limits = limits or ServeLimits()
        self.socket = _listening_socket(address)  # an address in use fails here, before anything starts
        self.stopping = threading.Event()  # set at shutdown: decodes in flight end at their next piece
        self.app = api_app(model, api_key, self.stopping)

    def serve_forever(self) -> None:
        """Serve until Ctrl+C or SIGTERM (which uvicorn raises again once it has shut down)."""
        limits = self.limits
        GuardedH11Protocol.request_timeout_s = limits.request_timeout_s
        GuardedH11Protocol.max_connections = limits.max_connections
        GuardedH11Protocol.max_head_bytes = limits.max_head_bytes
        config = uvicorn.Config(
            self.app,
            http=GuardedH11Protocol,
            loop="asyncio",
            lifespan="off",
            timeout_keep_alive=max(1, round(limits.idle_timeout_s)),
            timeout_graceful_shutdown=limits.shutdown_timeout_s,
            h11_max_incomplete_event_size=limits.max_head_bytes,
            backlog=limits.backlog,
            server_header=False,
            headers=[("server", "specedge-serve")],
            log_config=_LOG_CONFIG,
            log_level=None,
        )
        _StoppingServer(config, self.stopping).run(sockets=[self.socket])

    def server_close(self) -> None:
        self.stopping.set()
        self.socket.close()


class _StoppingServer(uvicorn.Server):
    """uvicorn's server that tells the decodes in flight when it starts shutting down."""

    def __init__(self, config: uvicorn.Config, stopping: threading.Event):
        super().__init__(config)
        self.stopping = stopping

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.stopping.set()
        await super().shutdown(sockets)


def _listening_socket(address: tuple[str, int]) -> socket.socket:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


# uvicorn's logging, less its start-up chatter: warnings and the access log (one line a request).
_LOG_CONFIG = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
_LOG_CONFIG["loggers"]["uvicorn.error"]["level"] = "WARNING"


# --- the application ------------------------------------------------------------------------------
def api_app(model: EdgeModel, api_key: str | None, stopping: threading.Event) -> Starlette:
    """OpenAI's routes over `model`, answering every refusal in OpenAI's error shape."""
    routes = _Routes(model, api_key, stopping)
    return Starlette(
        routes=[
            Route("/", routes.health, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{name:path}", routes.model_card, methods=["GET"]),
            Route("/v1/chat/completions", routes.chat, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
            Route("/v1/responses", routes.responses, methods=["POST"]),
        ],
        exception_handlers={
            SpecEdgeError: _refused,
            HTTPException: _no_route,
            ClientDisconnect: _client_gone,
            Exception: _internal_error,
        },
    )


class _Routes:
    def __init__(self, model: EdgeModel, api_key: str | None, stopping: threading.Event):
        self.model = model
        self.api_key = api_key
        self.stopping = stopping

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model.model_id})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(api.model_list(self.model.model_id, self.model.created))

    async def model_card(self, request: Request) -> Response:
        self._authorize(request)
        self.model.check_model(request.path_params["name"])
        return JSONResponse(api.model_card(self.model.model_id, self.model.created))

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        raw = await _body(request)
        parsed = await _on_thread(lambda: api.chat_request(api.json_body(raw)))
        return await self._complete("chat", parsed, request.receive)

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        raw = await _body(request)
        parsed = await _on_thread(lambda: api.completion_request(api.json_body(raw)))
        return await self._complete("text", parsed, request.receive)

    async def responses(self, request: Request) -> Response:
        self._authorize(request)
        raw = await _body(request)
        parsed = await _on_thread(lambda: responses_api.response_request(api.json_body(raw)))
        return await self._complete("response", parsed.chat, request.receive, parsed)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(
                "Incorrect API key provided: pass the key `specedge serve --api-key` was started with "
                "(Authorization: Bearer KEY)",
                status=401,
                code="invalid_api_key",
            )

    # --- one completion ---------------------------------------------------------------------------
    async def _complete(
        self,
        kind: str,
        request: ChatRequest | CompletionRequest,
        receive: Receive,
        asked: ResponseRequest | None = None,
    ) -> Response:
        reply = _Reply(self.model, kind, request, self.stopping)
        watcher = asyncio.ensure_future(_until_disconnect(receive, reply.gone))  # a stream watches for itself later
        try:
            if not request.options.stream:
                answer = await reply.decoding
                return JSONResponse(self._answer_body(reply, answer, asked))
            first = await reply.pieces.get()
            if first is None:  # the reply ended before any text: a refusal is still an ordinary error answer
                await reply.decoding
        finally:
            watcher.cancel()
        stream = _EventStream(reply, first) if asked is None else _ResponseEventStream(reply, first, asked)
        return StreamingResponse(
            stream.events(),
            media_type="text/event-stream; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    def _answer_body(self, reply: _Reply, answer: Answer, asked: ResponseRequest | None) -> dict:
        model = self.model.model_id
        if asked is not None:
            output = responses_api.output_items(answer)
            return responses_api.response_object(reply.request_id, model, asked.echo, reply.created, answer, output)
        build = api.chat_completion if reply.kind == "chat" else api.text_completion
        return build(reply.request_id, model, answer)


class _Reply:
    """One request decoding on a thread of its own; its pieces come to the loop as `pieces` (None: the end)."""

    def __init__(
        self, model: EdgeModel, kind: str, request: ChatRequest | CompletionRequest, stopping: threading.Event
    ):
        self.kind, self.request, self.stopping = kind, request, stopping
        self.model_id = model.model_id
        self.request_id = responses_api.new_id("resp") if kind == "response" else api.new_id(kind)
        self.created = int(time.time())
        self.gone = threading.Event()  # the client went away: the decode ends at its next piece
        self.pieces: asyncio.Queue[Piece | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        decode: Callable[[Any, Callable[[str | ToolCall, tuple[TokenLogprob, ...]], bool]], Answer] = (
            model.complete if kind == "text" else model.chat
        )
        self.decoding = asyncio.ensure_future(_on_thread(lambda: decode(request, self._text)))
        self.decoding.add_done_callback(self._ended)

    @property
    def with_logprobs(self) -> bool:
        return self.request.options.top_logprobs is not None

    def _text(self, piece: str | ToolCall, logprobs: tuple[TokenLogprob, ...]) -> bool:
        """A piece of the reply (text, or a whole tool call) and its tokens' logprobs, on the
        decoding thread; False once nobody is waiting for more."""
        if self.request.options.stream:
            self._loop.call_soon_threadsafe(self.pieces.put_nowait, (piece, logprobs))
        return not (self.gone.is_set() or self.stopping.is_set())

    def _ended(self, decoding: asyncio.Future) -> None:
        self.pieces.put_nowait(None)
        if not decoding.cancelled():
            decoding.exception()  # a stream the client left is not there to read it: not an unread error


class _EventStream:
    """A reply as server-sent events of completion chunks, ending with `data: [DONE]`; a chunk
    carries the logprobs of the tokens whose text it carries, when they were asked for."""

    def __init__(self, reply: _Reply, first: Piece | None):
        self.reply = reply
        self.first = first
        self.calls = 0
        self.text_offset = 0  # where the next chunk's tokens start in the reply's text (completions)

    async def events(self) -> AsyncIterator[bytes]:
        reply = self.reply
        try:
            if reply.kind == "chat":
                yield _event(api.chat_chunk(reply.request_id, reply.model_id, {"role": "assistant", "content": ""}))
            item = self.first
            while item is not None:
                piece, logprobs = item
                if isinstance(piece, ToolCall):
                    yield self._chunk(api.tool_call_delta(self.calls, piece), "", logprobs)
                    self.calls += 1
                else:
                    yield self._chunk({"content": piece}, piece, logprobs)
                item = await reply.pieces.get()
            for event in self._ending():
                yield _event(event)
            yield b"data: [DONE]\n\n"
        finally:
            reply.gone.set()  # the client left (or the stream ended): stop decoding for nobody

    def _ending(self) -> list[dict]:
        reply = self.reply
        try:
            answer = reply.decoding.result()
        except SpecEdgeError as exc:  # the status line is out: the failure goes in the stream
            return [api.error_body(_api_error(exc))]
        except Exception as exc:
            log.exception("a streamed reply failed")
            return [api.error_body(_internal(exc))]
        if reply.kind == "chat":
            ending = [api.chat_chunk(reply.request_id, reply.model_id, {}, answer.finish_reason)]
        else:
            ending = [api.text_chunk(reply.request_id, reply.model_id, "", answer.finish_reason)]
        if reply.request.options.include_usage:
            ending.append(api.usage_chunk(reply.request_id, reply.model_id, reply.kind, answer))
        return ending

    def _chunk(self, delta: dict, text: str, logprobs: tuple[TokenLogprob, ...]) -> bytes:
        reply = self.reply
        if reply.kind == "chat":
            body = chat_logprobs_body(logprobs) if reply.with_logprobs else None
            return _event(api.chat_chunk(reply.request_id, reply.model_id, delta, logprobs=body))
        body = completion_logprobs_body(logprobs, self.text_offset) if reply.with_logprobs else None
        self.text_offset += sum(len(entry.token) for entry in logprobs)
        return _event(api.text_chunk(reply.request_id, reply.model_id, text, logprobs=body))


class _ResponseEventStream:
    """A reply as the Responses API's server-sent events (`event: response.created` ... `response.completed`)."""

    def __init__(self, reply: _Reply, first: Piece | None, asked: ResponseRequest):
        self.reply = reply
        self.first = first
        self.events_of = ResponseEvents(reply.request_id, reply.model_id, asked.echo, reply.created)

    async def events(self) -> AsyncIterator[bytes]:
        reply, events_of = self.reply, self.events_of
        try:
            for event in events_of.opening():
                yield _named_event(event)
            item = self.first
            while item is not None:
                for event in events_of.piece(*item):
                    yield _named_event(event)
                item = await reply.pieces.get()
            for event in self._ending():
                yield _named_event(event)
        finally:
            reply.gone.set()

    def _ending(self) -> list[dict]:
        try:
            answer = self.reply.decoding.result()
        except SpecEdgeError as exc:
            return self.events_of.failure(_api_error(exc))
        except Exception as exc:
            log.exception("a streamed response failed")
            return self.events_of.failure(_internal(exc))
        return self.events_of.ending(answer)


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


def _named_event(body: dict) -> bytes:
    return f"event: {body['type']}\ndata: {json.dumps(body)}\n\n".encode()


# --- plumbing ------------------------------------------------------------------------------------------
async def _on_thread(call: Callable[[], T]) -> T:
    """Run a blocking call on a daemon thread of its own (a decode stuck on a hub does not hold up
    Ctrl+C); its exception is raised here."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, error: BaseException | None) -> None:
        if done.done():
            return  # the awaiting request was cancelled meanwhile
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(value)

    def run() -> None:
        try:
            value = call()
        except BaseException as exc:  # handed to the loop, raised where the call is awaited
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=run, daemon=True, name="specedge-serve-request").start()
    return await done


async def _until_disconnect(receive: Receive, gone: threading.Event) -> None:
    """Wait for the client of a non-streamed reply to go away (its body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


async def _body(request: Request) -> bytes:
    """The request's body, refused past MAX_BODY (the connection is then closed: the rest is unread)."""
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> ApiError:
    return ApiError(
        f"the body is over {MAX_BODY // (1024 * 1024)} MiB; send a shorter conversation",
        status=413,
        code="body_too_large",
    )


def _api_error(exc: SpecEdgeError) -> ApiError:
    """An error as the API answers it: ours as it is, the client's others (the draft's side) as 400."""
    return exc if isinstance(exc, ApiError) else ApiError(exc.message, status=400, code="invalid_request")


def _error_response(error: ApiError, headers: Mapping[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if error.status == 413:
        headers["Connection"] = "close"  # the body was not all read: the connection cannot go on
    return JSONResponse(api.error_body(error), status_code=error.status, headers=headers)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SpecEdgeError)
    return _error_response(_api_error(exc))


async def _no_route(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    method, path = request.method, request.url.path
    if exc.status_code == 405:
        error = ApiError(f"{method} is not allowed on {path}", status=405, code="method_not_allowed")
    elif exc.status_code == 404:
        error = ApiError(
            f"no route {method} {path}; this server offers GET /v1/models, POST /v1/chat/completions, "
            "POST /v1/completions and POST /v1/responses",
            status=404,
            code="not_found",
        )
    else:
        error = ApiError(str(exc.detail), status=exc.status_code, code="invalid_request")
    return _error_response(error, exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=400)  # nobody is there to read it


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug: answered 500 in OpenAI's shape (starlette logs it), the other requests go on."""
    return _error_response(_internal(exc))


def _internal(exc: BaseException) -> ApiError:
    return ApiError(f"internal error ({exc.__class__.__name__}); see the server's log", status=500)

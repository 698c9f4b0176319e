"""A session stream's frames (`stream.py`): msgpack maps, a verify's request one way and its
answer the other. Read and written where the verify is served, in the engine process: the front
end passes a client's frame through as it came and sends back the bytes it is given, so a verify
on the stream is parsed once and its answer encoded once. Plain msgpack and pydantic; no web
framework.
"""

from __future__ import annotations

import contextlib
from typing import Any

import msgpack
from pydantic import ValidationError

from hub_server import protocol as wire
from hub_server.errors import BadRequest, RequestRefused

MAX_FRAME_BYTES = 1 << 20  # as for an HTTP body


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


def frame_id_of(data: bytes) -> int | None:
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

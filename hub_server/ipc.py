"""What crosses between the hub's front ends and its engine process: batches of messages,
msgpack over a Unix socket, one connection per front end. Plain Python, no torch; both sides
import it.

Every frame is one msgpack list of messages behind its length (4 bytes, little-endian), so all
the requests a front end took while the engine ran a pass travel together, and all the answers
a pass produced go back together. A plain socket read and written by each side's event loop
(asyncio's streams): no thread between a message and the socket, so a round trip costs two
wake-ups (ZeroMQ's I/O threads made it six), and a front end learns at once that the engine's
process has gone (its connection ends).

    front end ─▶ engine                         engine ─▶ front end
    [CALL, id, method, args]                    [OK, id, value]
    [STREAM, id, method, args]  (generate)      [CHUNK, id, value] ... [END, id]
    [CANCEL, id]  (its client went away)        [REFUSED, id, (kind, message, retry_after_s)]
    [PING, seq]                                 [PONG, seq, EngineStatus as a dict]
    [COUNT_REFUSAL, code]  (counted once, in the engine's /metrics)

A method's arguments are plain values: request bodies as their pydantic dumps, owners as
tuples. `METHODS` names each method's argument and answer types; the engine validates what it
receives as the HTTP layer validated it, so a front end of another version cannot slip anything
past the hub's checks.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
from pydantic import BaseModel

from hub_server import errors
from hub_server import protocol as wire
from hub_server.sessions import Owner

CALL, STREAM, CANCEL, PING, COUNT_REFUSAL = range(5)
OK, CHUNK, END, REFUSED, PONG = range(5)

# method: (the types of its arguments, the type of its answer or of each streamed chunk)
METHODS: dict[str, tuple[tuple[type, ...], type | None]] = {
    "info": ((), wire.HubInfo),
    "whoami": ((Owner,), wire.WhoAmIResponse),
    "open_session": ((wire.OpenSessionRequest, Owner), wire.OpenSessionResponse),
    "feed": ((str, wire.FeedRequest, Owner), wire.FeedResponse),
    "verify": ((str, wire.VerifyRequest, Owner), wire.VerifyResponse),
    "generate": ((str, wire.GenerateRequest, Owner), wire.GenerateChunk),
    "close": ((str, Owner), None),
    "metrics_page": ((), bytes),
    "listing": ((), wire.WorkerList),
    "drain": ((str,), wire.WorkerInfo),
    "undrain": ((str,), wire.WorkerInfo),
}


@dataclass(frozen=True)
class EngineStatus:
    """What a front end knows of the engine between requests, from its answers to pings."""

    state: str  # "loading", "ready" or "failed"
    incarnation: str = ""  # a new one each time the engine process starts
    pid: int = 0
    reason: str = ""  # why it failed, or what it is loading
    model: str = ""
    workers_ready: int = 0
    workers_total: int = 0


_LENGTH = struct.Struct("<I")


def pack(messages: list[list[Any]]) -> bytes:
    """A frame: the messages behind their length."""
    body = msgpack.packb(messages, use_bin_type=True)
    return _LENGTH.pack(len(body)) + body


def unpack(body: bytes) -> list[list[Any]]:
    """The messages of a frame's body (ValueError: not msgpack)."""
    return msgpack.unpackb(body, raw=False, use_list=True)


async def frames(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The bodies of the frames `reader` brings, until its connection ends (cleanly or not)."""
    try:
        while True:
            (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
            yield await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return


def encode(value: Any) -> Any:
    """A request argument or an answer as msgpack carries it."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=False)
    if isinstance(value, Owner):
        return (value.account_id, value.name, value.operator)
    return value


def decode(kind: type | None, value: Any) -> Any:
    """The value `encode` made, as `kind` again (pydantic models validated)."""
    if kind is None or value is None:
        return value
    if issubclass(kind, BaseModel):
        return kind.model_validate(value)
    if kind is Owner:
        account_id, name, operator = value
        return Owner(account_id=account_id, name=name, operator=operator)
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def decode_args(method: str, args: list[Any]) -> list[Any]:
    kinds, _ = METHODS[method]
    if len(args) != len(kinds):
        raise TypeError(f"{method} takes {len(kinds)} arguments, not {len(args)}")
    return [decode(kind, value) for kind, value in zip(kinds, args, strict=True)]


def encode_refusal(exc: errors.RequestRefused) -> tuple[str, str, int | None]:
    return (type(exc).__name__, exc.message, getattr(exc, "retry_after_s", None))


def decode_refusal(value: list[Any]) -> errors.RequestRefused:
    """The engine's refusal as the same class on this side (the HTTP layer answers it as usual)."""
    kind, message, retry_after_s = value
    return errors.refusal(kind, message, retry_after_s)


def encode_status(status: EngineStatus) -> dict[str, Any]:
    return asdict(status)


def decode_status(value: dict[str, Any]) -> EngineStatus:
    return EngineStatus(**value)

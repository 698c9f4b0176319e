"""The front end's side of the engine process (`engine_process.py`): the process started and
restarted, and its hub reached through one socket as if it were in this interpreter.

    HTTP routes ── RemoteHub ── EngineLink ══Unix socket══▶ engine process (service.Hub)
                                     ▲
    EngineProcess (started, watched, restarted) ── lost ──┘

`EngineLink` sends every request taken during one turn of the event loop in one frame and
resolves each from the engine's answers. A ping every `PING_S` carries the engine's status
back (loading, ready, failed; its incarnation), so a front end always knows, without waiting on
a request, whether the engine is up. When the engine is lost (its connection ended, a new
incarnation answers, or nothing is heard for `SILENT_LIMIT_S`) every request in flight is
answered at once: session requests as `WorkerLost` (404 `session_not_found`: clients reopen the
session and feed their own history again, so the reply goes on unchanged), the others as
`EngineRestarting` (503 with Retry-After). No wait across the boundary outlasts that.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub_server import ipc
from hub_server import protocol as wire
from hub_server.config import HubSettings
from hub_server.errors import BadRequest, EngineRestarting, NotReady, RequestRefused, WorkerLost
from hub_server.logging_setup import request_fields
from hub_server.sessions import Owner

log = logging.getLogger("hub_server")

PING_S = 0.5
# An engine that answers no ping this long is taken for lost (a loaded CPU host can stall a
# process for seconds; a lost engine costs every session its KV).
SILENT_LIMIT_S = 10.0
FIRST_STATUS_WAIT_S = 5.0  # a front end's start waits this long at most to hear the engine's state
CONNECT_RETRY_S = 0.05  # between tries to reach an engine process that is starting
SESSION_METHODS = frozenset({"feed", "verify", "generate", "close"})  # their session dies with the engine
STARTED = object()  # a stream's first message: the engine took the request (its checks passed)
ENDED = object()
# Restarts of an engine that keeps dying soon after it starts wait longer each time, up to this.
MAX_RESTART_WAIT_S = 30.0
SHORT_LIFE_S = 30.0
PARENT_CHECK_S = 0.5  # how often a child process looks whether the process that started it lives


def engine_address() -> str:
    """A socket only this machine's user can reach: in a fresh private folder."""
    folder = Path(tempfile.mkdtemp(prefix="specedge-hub-"))  # mode 0700
    return str(folder / "engine.sock")


@dataclass
class _Pending:
    method: str
    sink: asyncio.Future | asyncio.Queue


class EngineLink:
    """Calls and streams to the engine process, as awaitables on the serving event loop."""

    def __init__(self, address: str):
        self.address = address
        self.status = ipc.EngineStatus("loading", reason="the hub's engine process is starting")
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._outbox: list[list[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connection: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_heard = time.monotonic()
        self._first_status: asyncio.Event | None = None

    async def start(self) -> None:
        """Connect from the serving event loop (the app's start-up), and wait up to
        `FIRST_STATUS_WAIT_S` for the engine's state, so a front end that starts beside others
        serving (or replaces one that died) does not accept requests it would refuse as "starting"."""
        self._loop = asyncio.get_running_loop()
        self._first_status = asyncio.Event()
        self._last_heard = time.monotonic()
        self._tasks = [self._loop.create_task(self._read()), self._loop.create_task(self._ping())]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_status.wait(), FIRST_STATUS_WAIT_S)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._connection is not None:
            self._connection.close()

    # --- requests -----------------------------------------------------------------------
    async def call(self, method: str, *args: Any) -> Any:
        """The engine hub's answer to `method(*args)`; its refusals raised here as themselves."""
        assert self._loop is not None
        future: asyncio.Future = self._loop.create_future()
        request_id = self._begin(ipc.CALL, method, args, future)
        try:
            return await future
        except asyncio.CancelledError:  # its client went away: the engine stops what it can
            self._queue([ipc.CANCEL, request_id])
            raise
        finally:
            self._pending.pop(request_id, None)

    def call_blocking(self, method: str, *args: Any) -> Any:
        """`call` from a thread of the HTTP layer's pool."""
        assert self._loop is not None, "the link starts with the app"
        return asyncio.run_coroutine_threadsafe(self.call(method, *args), self._loop).result()

    async def stream(self, method: str, *args: Any) -> AsyncIterator[Any]:
        """The engine's chunks of a streamed answer; the first item is `STARTED` once its checks passed."""
        queue: asyncio.Queue = asyncio.Queue()
        request_id = self._begin(ipc.STREAM, method, args, queue)
        try:
            while True:
                item = await queue.get()
                if item is ENDED:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self._pending.pop(request_id, None) is not None:  # ended early: the engine stops it
                self._queue([ipc.CANCEL, request_id])

    def record_refusal(self, code: str) -> None:
        """Count a refusal of the HTTP layer in the engine's /metrics (any thread)."""
        if self._loop is None:
            self._outbox.append([ipc.COUNT_REFUSAL, code])
        else:
            self._loop.call_soon_threadsafe(self._queue, [ipc.COUNT_REFUSAL, code])

    def lost(self, reason: str) -> None:
        """The engine process died (its parent saw it; any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._lose, reason)

    def _begin(self, kind: int, method: str, args: tuple, sink: asyncio.Future | asyncio.Queue) -> int:
        if self.status.state != "ready":
            raise self.unavailable()
        request_id = next(self._ids)
        self._pending[request_id] = _Pending(method, sink)
        self._queue([kind, request_id, method, [ipc.encode(arg) for arg in args], request_fields()])
        return request_id

    def unavailable(self) -> RequestRefused:
        if self.status.state == "failed":
            return NotReady(self.status.reason)
        return EngineRestarting(self.status.reason or "the hub's engine is starting; retry in a few seconds")

    # --- the socket ---------------------------------------------------------------------
    def _queue(self, message: list[Any]) -> None:
        """Send with everything else queued before the loop's next turn, as one frame."""
        if self._connection is None and message[0] != ipc.COUNT_REFUSAL:
            return  # no engine to reach: requests are refused meanwhile, and pings have no one to ask
        self._outbox.append(message)
        if len(self._outbox) == 1 and self._loop is not None:
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closing():  # kept until the engine is reached again
            return
        messages, self._outbox = self._outbox, []
        if not messages:
            return
        try:
            frame = ipc.pack(messages)
        except (OverflowError, TypeError, ValueError):  # a value msgpack cannot carry: refuse its request alone
            frame = ipc.pack([message for message in messages if self._packs(message)])
        connection.write(frame)

    def _packs(self, message: list[Any]) -> bool:
        """Whether msgpack carries `message`; if not, its request is refused (422) here."""
        try:
            ipc.pack([message])
        except (OverflowError, TypeError, ValueError):
            pending = self._pending.get(message[1]) if message[0] in (ipc.CALL, ipc.STREAM) else None
            if pending is not None:
                _put(pending.sink, BadRequest("malformed request: a number is out of range (see docs/protocol.md)"))
            return False
        return True

    async def _read(self) -> None:
        """Reach the engine process, read its answers until the connection ends, and again."""
        while True:
            try:
                reader, self._connection = await asyncio.open_unix_connection(self.address)
            except OSError:  # not listening yet: starting, or starting again
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            # Requests left from the connection before were answered as lost: only refusals counted
            # meanwhile go to the new one, with a ping for its state at once.
            self._outbox = [message for message in self._outbox if message[0] == ipc.COUNT_REFUSAL]
            self._outbox.append([ipc.PING, -1])
            self._flush()
            async for frame in ipc.frames(reader):
                self._last_heard = time.monotonic()
                for message in ipc.unpack(frame):
                    self._deliver(message)
            self._connection.close()
            self._connection = None
            if self.status.incarnation:
                self._lose("the hub's engine process went away")

    def _deliver(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == ipc.PONG:
            self._heard(ipc.decode_status(message[2]))
            return
        pending = self._pending.get(message[1])
        if pending is None:  # answered already (lost, cancelled)
            return
        answer_type = ipc.METHODS[pending.method][1]
        if kind == ipc.OK:
            value = STARTED if isinstance(pending.sink, asyncio.Queue) else ipc.decode(answer_type, message[2])
            _put(pending.sink, value)
        elif kind == ipc.CHUNK:
            _put(pending.sink, ipc.decode(answer_type, message[2]))
        elif kind == ipc.END:
            _put(pending.sink, ENDED)
        elif kind == ipc.REFUSED:
            _put(pending.sink, ipc.decode_refusal(message[2]))

    async def _ping(self) -> None:
        for seq in itertools.count():
            self._queue([ipc.PING, seq])
            await asyncio.sleep(PING_S)
            silent = time.monotonic() - self._last_heard
            if silent > SILENT_LIMIT_S and self.status.incarnation:
                self._lose(f"the hub's engine process has not answered for {silent:.0f} s")

    def _heard(self, status: ipc.EngineStatus) -> None:
        if self.status.incarnation and status.incarnation != self.status.incarnation:
            self._lose("the hub's engine process restarted")
        if status.state != self.status.state or status.incarnation != self.status.incarnation:
            log.info("engine process %d %s", status.pid, status.state)
        self.status = status
        if self._first_status is not None:
            self._first_status.set()

    def _lose(self, reason: str) -> None:
        """Answer every request in flight now; new ones wait for the engine's next incarnation."""
        if self.status.incarnation:
            log.warning("%s: %d requests in flight answered, sessions reopen", reason, len(self._pending))
        self.status = ipc.EngineStatus("loading", reason=f"{reason}; retry in a few seconds")
        pending, self._pending = self._pending, {}
        for request in pending.values():
            if request.method in SESSION_METHODS:
                _put(request.sink, WorkerLost(f"{reason}; the session went with it: reopen it"))
            else:
                _put(request.sink, EngineRestarting(f"{reason}; retry in a few seconds"))


def _put(sink: asyncio.Future | asyncio.Queue, value: Any) -> None:
    if isinstance(sink, asyncio.Queue):
        sink.put_nowait(value)
    elif not sink.done():
        if isinstance(value, BaseException):
            sink.set_exception(value)
        else:
            sink.set_result(value)


class RemoteGeneration:
    """A generation's chunks from the engine process; `aclose` ends it there (its session's turn back)."""

    def __init__(self, chunks: AsyncIterator[Any]):
        self._chunks = chunks

    def __aiter__(self) -> RemoteGeneration:
        return self

    async def __anext__(self) -> wire.GenerateChunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        await self._chunks.aclose()  # type: ignore[attr-defined]


class RemoteHub:
    """`service.Hub` as the HTTP layer uses it, every call answered by the engine process."""

    def __init__(self, link: EngineLink):
        self.link = link

    def info(self) -> wire.HubInfo:
        return self.link.call_blocking("info")

    def whoami(self, owner: Owner) -> wire.WhoAmIResponse:
        return self.link.call_blocking("whoami", owner)

    def open_session(self, request: wire.OpenSessionRequest, owner: Owner) -> wire.OpenSessionResponse:
        return self.link.call_blocking("open_session", request, owner)

    async def feed(self, session_id: str, request: wire.FeedRequest, owner: Owner) -> wire.FeedResponse:
        return await self.link.call("feed", session_id, request, owner)

    async def verify(self, session_id: str, request: wire.VerifyRequest, owner: Owner) -> wire.VerifyResponse:
        return await self.link.call("verify", session_id, request, owner)

    async def generate(self, session_id: str, request: wire.GenerateRequest, owner: Owner) -> RemoteGeneration:
        """Started once the engine's checks pass (a refusal is raised here, before any chunk)."""
        chunks = self.link.stream("generate", session_id, request, owner)
        try:
            await chunks.__anext__()  # STARTED
        except BaseException:
            await chunks.aclose()  # type: ignore[attr-defined]
            raise
        return RemoteGeneration(chunks)

    async def close(self, session_id: str, owner: Owner) -> None:
        await self.link.call("close", session_id, owner)

    def metrics_page(self) -> bytes:
        return self.link.call_blocking("metrics_page")

    def listing(self) -> wire.WorkerList:
        return self.link.call_blocking("listing")

    def drain(self, worker_id: str) -> wire.WorkerInfo:
        return self.link.call_blocking("drain", worker_id)

    def undrain(self, worker_id: str) -> wire.WorkerInfo:
        return self.link.call_blocking("undrain", worker_id)

    def health(self) -> tuple[dict, bool]:
        """/health's body from the last pong, and whether the hub serves: no wait on the engine."""
        status = self.link.status
        workers = {"ready": status.workers_ready, "total": status.workers_total}
        body = {"status": "ok", "model": status.model, "workers": workers}
        return (body, True) if status.workers_ready else ({**body, "status": "degraded"}, False)


def end_with_parent(parent: int) -> None:
    """Exit once the process that started this one is gone: an engine nobody can reach holds a
    device and its memory for nothing, a front end without its supervisor serves a dead engine."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class EngineProcess:
    """The engine process as the process that serves HTTP keeps it: started, restarted when it
    dies (`on_lost` told at once), stopped last."""

    def __init__(self, settings: HubSettings, address: str, on_lost: Callable[[str], None]):
        self.settings = settings
        self.address = address
        self._on_lost = on_lost
        self._process: subprocess.Popen | None = None
        self._stopping = False
        self._restarts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        self._launch()
        threading.Thread(target=self._watch, name="engine-watch", daemon=True).start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        process = self._process
        if process is None or process.poll() is not None:
            return
        assert process.stdin is not None
        process.stdin.close()  # the engine stops at the end of its stdin (it ignores group signals)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("engine process %d did not stop in %g s; killed", process.pid, timeout_s)
            process.kill()
            process.wait(5)

    def _launch(self) -> None:
        # Its settings (the embedded hub's token among them) go through a pipe, never the command line.
        process = subprocess.Popen([sys.executable, "-m", "hub_server.engine_process"], stdin=subprocess.PIPE)
        assert process.stdin is not None
        # Held open for the engine's life: its end tells the engine to stop (or that this process is gone).
        pickle.dump((self.settings, self.address, secrets.token_hex(8)), process.stdin)
        process.stdin.flush()
        self._process = process
        log.info("engine process %d started (front end %d)", process.pid, os.getpid())

    def _watch(self) -> None:
        while True:
            started = time.monotonic()
            assert self._process is not None
            code = self._process.wait()
            if self._stopping:
                return
            reason = f"the hub's engine process {self._process.pid} ended (exit code {code})"
            log.error("%s; starting it again", reason)
            self._on_lost(reason)
            lived = time.monotonic() - started
            self._restarts = 0 if lived > SHORT_LIFE_S else self._restarts + 1
            time.sleep(min(MAX_RESTART_WAIT_S, 0.5 * 2**self._restarts) if self._restarts else 0.0)
            if self._stopping:
                return
            try:
                self._launch()
            except OSError:  # tried again after a longer wait: the dead process's wait returns at once
                log.exception("the hub's engine process could not be started")

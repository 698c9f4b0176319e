"""The hub's engine process: the session table, the schedulers, the runners and their KV pools,
away from the interpreter that serves HTTP (`engine_link.py` is the front end's side).

The process holds `service.Hub` and answers the front ends' messages (`ipc.py`) on one asyncio
loop: each call a task on the hub, exactly as an HTTP route would make it, its answer sent back
with every other answer ready at the same moment. The passes of a worker in this process run on
that loop too, between its turns (`scheduler.py`, Drivers): a request's way to its pass and back
crosses no thread, and a pass never shares the GIL with the requests' handling. HTTP, token
checks and body parsing are the front ends'. Ray workers' passes are waited on by their
schedulers' threads.

    front ends ──Unix socket, a connection each──▶ EngineServer ── service.Hub ── Scheduler ── runner / Ray workers

The process ignores SIGINT and SIGTERM: a signal to the whole process group (Ctrl+C in a
terminal, `timeout`, systemd's stop) is the front end's to act on, which drains its requests
first. It stops at the end of its stdin, which the process that started it holds open: closed
to stop the engine, or ended with that process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from hub_server import ipc
from hub_server.accounts import token_check_for
from hub_server.config import HubSettings
from hub_server.engine_api import Engine
from hub_server.errors import BadRequest, ClusterError, KVBudgetError, NotReady, RequestRefused
from hub_server.heap import freeze_startup_heap
from hub_server.logging_setup import bind_request, configure_logging
from hub_server.metrics import HubMetrics
from hub_server.service import Hub

log = logging.getLogger("hub_server")

# Methods that answer from memory at once run on the loop; the others may wait for a worker (a
# Ray round trip, a KV slot) and run on threads, as the HTTP layer ran them before.
ON_THE_LOOP = frozenset({"info", "whoami"})
ASYNC_METHODS = frozenset({"feed", "verify", "close"})


def main() -> None:
    """The engine process's entry point: its settings, socket address and incarnation come
    pickled on stdin from the process that started it (`engine_link.EngineProcess`), which then
    holds stdin open for the engine's life: its end (closed, or that process gone) stops the
    engine. Signals to the whole process group (Ctrl+C, `timeout`, systemd's stop) are the
    front end's to act on: it drains its requests, which need the engine, and then closes it."""
    settings, address, incarnation = pickle.load(sys.stdin.buffer)
    configure_logging(settings.log_format)
    failure = None
    if not settings.in_process:
        try:  # in the main thread, where Ray's driver expects to be set up
            join_cluster(settings)
        except ClusterError as exc:
            failure = f"--ray-address: {exc}"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # Windows: asyncio's own loop
        pass
    asyncio.run(EngineServer(settings, address, incarnation, failure).serve())
    logging.shutdown()
    os._exit(0)  # the schedulers' and workers' threads end with the process, not one by one


def join_cluster(settings: HubSettings) -> None:
    """Start or join the Ray cluster the workers run on (several workers, or --ray-address)."""
    if settings.ray_address is None:
        # Read by Ray as it is imported: a Ray of this machine alone, whose node address is then
        # 127.0.0.1, so that its GCS, raylet and workers listen on loopback only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from hub_server.workers import connect

    connect(settings)


def make_engines(settings: HubSettings) -> Sequence[Engine]:
    """The hub's engines: the runner in this process for one worker (no Ray imported); Ray
    workers otherwise (on the cluster `join_cluster` joined)."""
    if settings.in_process:
        from hub_server.engine.runner import ModelRunner

        return [ModelRunner(settings)]
    from hub_server.workers import start_workers

    return start_workers(settings)


class EngineServer:
    """The hub behind the engine process's socket: calls in, answers out, batched both ways."""

    def __init__(self, settings: HubSettings, address: str, incarnation: str, failure: str | None = None):
        self.settings = settings
        self.address = address
        self.hub: Hub | None = None
        self.metrics = HubMetrics()
        self.status = ipc.EngineStatus(
            "loading", incarnation, os.getpid(), "the target model is loading", model=settings.model
        )
        self._outboxes: dict[asyncio.StreamWriter, list[list[Any]]] = {}  # a front end's connection: its answers
        self._tasks: dict[tuple[asyncio.StreamWriter, int], asyncio.Task] = {}
        self._front_ends: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure = failure  # why the engine cannot load at all (the cluster could not be joined)

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):  # left by the incarnation before this one
            os.unlink(self.address)
        server = await asyncio.start_unix_server(self._serve_front_end, path=self.address)
        stopped = asyncio.Event()
        threading.Thread(target=self._until_stdin_ends, args=(stopped,), name="parent-watch", daemon=True).start()
        threading.Thread(target=self._load, name="model-load", daemon=True).start()
        await stopped.wait()
        server.close()
        log.info("engine process stopping")

    def _until_stdin_ends(self, stopped: asyncio.Event) -> None:
        sys.stdin.buffer.read()  # returns at its end: the parent closed it, or is gone
        assert self._loop is not None
        self._loop.call_soon_threadsafe(stopped.set)

    async def _serve_front_end(self, reader: asyncio.StreamReader, front_end: asyncio.StreamWriter) -> None:
        """One front end's connection, until it ends: what it still waits for is given up."""
        self._front_ends.add(front_end)
        try:
            async for frame in ipc.frames(reader):
                try:
                    messages = ipc.unpack(frame)
                except ValueError:
                    log.warning("engine process: a front end sent a frame that is not msgpack; ignored")
                    continue
                for message in messages:
                    self._take(front_end, message)
        finally:
            self._front_ends.discard(front_end)
            for (connection, _), task in list(self._tasks.items()):
                if connection is front_end:
                    task.cancel()  # nobody waits for its answer: as if its client had gone
            front_end.close()

    def _take(self, front_end: asyncio.StreamWriter, message: list[Any]) -> None:
        kind = message[0]
        if kind == ipc.PING:
            if self.hub is not None:  # workers lost or back since: the pong says how many are up
                self.status = replace(self.status, workers_ready=self.hub.workers.ready_count().ready)
            self._send(front_end, [ipc.PONG, message[1], ipc.encode_status(self.status)])
        elif kind == ipc.COUNT_REFUSAL:
            self.metrics.record_refusal(message[1])
        elif kind == ipc.CANCEL:
            task = self._tasks.get((front_end, message[1]))
            if task is not None:
                task.cancel()
        elif kind in (ipc.CALL, ipc.STREAM):
            _, request_id, method, args, fields = message
            answer = self._call if kind == ipc.CALL else self._stream
            assert self._loop is not None
            task = self._loop.create_task(answer(front_end, request_id, method, args, fields))
            key = (front_end, request_id)
            self._tasks[key] = task
            task.add_done_callback(lambda _: self._tasks.pop(key, None))

    # --- answers ------------------------------------------------------------------------
    async def _call(
        self, front_end: asyncio.StreamWriter, request_id: int, method: str, args: list, fields: dict
    ) -> None:
        try:
            hub, values = self._prepare(method, args, fields)
            answer = await self._invoke(hub, method, values)
            self._send(front_end, [ipc.OK, request_id, ipc.encode(answer)])
        except RequestRefused as exc:
            self._send(front_end, [ipc.REFUSED, request_id, ipc.encode_refusal(exc)])
        except asyncio.CancelledError:
            pass  # its client went away: nobody waits for an answer
        except Exception as exc:  # a bug: answered as a 500 that says so, the process goes on
            log.exception("engine process: %s failed", method)
            failure = RequestRefused(f"the hub's engine failed on {method}: {exc}")
            self._send(front_end, [ipc.REFUSED, request_id, ipc.encode_refusal(failure)])

    async def _stream(
        self, front_end: asyncio.StreamWriter, request_id: int, method: str, args: list, fields: dict
    ) -> None:
        generation = None
        try:
            hub, values = self._prepare(method, args, fields)
            generation = await hub.generate(*values)
            self._send(front_end, [ipc.OK, request_id, None])  # its checks passed: the front end answers 200
            async for chunk in generation:
                self._send(front_end, [ipc.CHUNK, request_id, ipc.encode(chunk)])
            self._send(front_end, [ipc.END, request_id])
        except RequestRefused as exc:
            self._send(front_end, [ipc.REFUSED, request_id, ipc.encode_refusal(exc)])
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            log.exception("engine process: a generation failed")
            failure = RequestRefused(f"the hub's engine failed mid-generation: {exc}")
            self._send(front_end, [ipc.REFUSED, request_id, ipc.encode_refusal(failure)])
        finally:
            if generation is not None:  # its session's turn comes back however the stream ended
                await generation.aclose()

    def _prepare(self, method: str, args: list, fields: dict) -> tuple[Hub, list[Any]]:
        if fields:
            bind_request(**fields)  # this task's log lines carry the request's id, as in the front end
        if self.hub is None:
            raise NotReady(self.status.reason or "the target model is loading")
        try:
            return self.hub, ipc.decode_args(method, args)
        except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            raise BadRequest(f"malformed request for {method}: {exc}") from exc

    async def _invoke(self, hub: Hub, method: str, values: list[Any]) -> Any:
        target: Callable[..., Any] = getattr(hub, method)
        if method in ASYNC_METHODS:
            return await target(*values)
        if method in ON_THE_LOOP:
            return target(*values)
        assert self._loop is not None
        return await self._loop.run_in_executor(None, functools.partial(target, *values))

    def _send(self, front_end: asyncio.StreamWriter, message: list[Any]) -> None:
        """Queue a message; everything queued before the loop's next turn leaves in one frame."""
        outbox = self._outboxes.get(front_end)
        if outbox is not None:
            outbox.append(message)
            return
        self._outboxes[front_end] = [message]
        if len(self._outboxes) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        outboxes, self._outboxes = self._outboxes, {}
        for front_end, messages in outboxes.items():
            if not front_end.is_closing():  # a front end gone meanwhile: its answers with it
                front_end.write(ipc.pack(messages))

    # --- start-up -----------------------------------------------------------------------
    def _load(self) -> None:
        """Load the target and build the hub (a thread: pings are answered meanwhile)."""
        if self._failure:
            self._fail(self._failure)
            return
        started = time.monotonic()
        try:
            engines = make_engines(self.settings)
            hub = Hub(self.settings, engines, self.metrics, token_check_for(self.settings), loop=self._loop)
        except KVBudgetError as exc:  # a configuration to change, not a crash: no traceback
            self._fail(f"the hub cannot hold its sessions: {exc}")
            return
        except ClusterError as exc:  # workers the cluster cannot place: the message says what is missing
            self._fail(str(exc))
            return
        except Exception as exc:
            log.exception("model load failed")
            self._fail(f"the target model failed to load: {exc}")
            return
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._ready, hub, time.monotonic() - started)

    def _ready(self, hub: Hub, seconds: float) -> None:
        self.hub = hub
        freeze_startup_heap("engine process")  # the model and its libraries: alive for good
        ready = hub.workers.ready_count()
        self.status = ipc.EngineStatus(
            "ready",
            self.status.incarnation,
            self.status.pid,
            model=hub.engine.name,
            workers_ready=ready.ready,
            workers_total=ready.total,
        )
        log.info("engine process %d ready in %.1f s: %s", os.getpid(), seconds, hub.engine.name)
        self._announce()

    def _announce(self) -> None:
        """Tell every front end the engine's state now, not at its next ping: front ends serving
        side by side start (or stop) answering together."""
        for front_end in self._front_ends:
            self._send(front_end, [ipc.PONG, -1, ipc.encode_status(self.status)])

    def _fail(self, reason: str) -> None:
        log.error(reason)
        self.status = ipc.EngineStatus("failed", self.status.incarnation, self.status.pid, reason)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._announce)


if __name__ == "__main__":
    main()

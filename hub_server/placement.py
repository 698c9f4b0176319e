"""The hub's engine workers as the front end sees them, and where a new session goes. Plain Python.

A worker is one engine (one device with the target and its KV pool) and the batch scheduler that
feeds it, so a verify never waits on another device. In-process there is one worker; with Ray
(`hub_server/workers.py`) each engine is a proxy to an actor on some node. The front end keeps
the session table (each `Session` names its worker) and chooses a worker for each new session:
the one with the most KV blocks free (or cached for a prefix no session holds) for each of its
sessions, the new one included, then the fewest sessions, then the shortest queue. Blocks are
what a worker runs out of (its sessions hold as many as their contexts fill), but not blocks
alone: two equal workers whose pools differ by a few blocks would otherwise take every session
on the larger until it filled, one device batching them all while the other idles. A session
stays on its worker for its whole life, since its KV cache lives there.

Worker states:
- `ready`     takes new sessions
- `draining`  its open sessions finish, no new ones come (`hub_server workers drain ID`;
              `undrain ID` makes it ready again)
- `lost`      its process, device or node is gone; its sessions were dropped (they answer 404
              `session_not_found`, and clients reopen them elsewhere) until it comes back
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from hub_server.engine_api import Engine, EngineStats
from hub_server.scheduler import Scheduler

WorkerState = Literal["ready", "draining", "lost"]
READY: WorkerState = "ready"
DRAINING: WorkerState = "draining"
LOST: WorkerState = "lost"


@dataclass(frozen=True)
class WorkerIdentity:
    """Where a worker runs. `incarnation` changes whenever its process starts again (its KV pool
    is then empty: sessions it held before are gone)."""

    node: str
    pid: int
    device: str
    incarnation: str
    devices: tuple[str, ...] = ()  # every device its passes run on (a tensor-parallel worker's ranks, in order)
    pids: tuple[int, ...] = ()  # every process of it (its ranks'), `pid` first


@runtime_checkable
class Supervised(Protocol):
    """An engine in another process, which may die: the front end probes it."""

    def probe(self) -> WorkerIdentity:
        """Its identity now; raises `errors.WorkerLost` when it does not answer in time."""

    def rest(self, seconds: float) -> None:
        """Wait until its next probe is due: `seconds`, or longer while it can tell at once that
        its process died (then at once)."""


@dataclass(frozen=True)
class WorkerLoad:
    """What placement needs to know of one worker."""

    worker_id: str
    state: WorkerState
    free_slots: int  # rows of its session table left
    queue_depth: int
    free_blocks: int | None = None  # KV blocks a session can take now (free or cached); None: not counted
    sessions: int = 0

    @property
    def has_room(self) -> bool:
        return self.state == READY and self.free_slots > 0 and self.free_blocks != 0

    @property
    def blocks_per_session(self) -> float:
        """The free blocks each of its sessions could grow into, a new one included (0: not counted)."""
        return (self.free_blocks or 0) / (self.sessions + 1)


def placement_order(loads: Iterable[WorkerLoad]) -> list[str]:
    """Workers that may take a new session, best first: the most free KV blocks for each of its
    sessions (the new one included), then the most free session slots, then the shortest queue
    (then the id, so ties break the same way every time). Empty when every one is full."""
    open_ = [load for load in loads if load.has_room]
    open_.sort(key=lambda load: (-load.blocks_per_session, -load.free_slots, load.queue_depth, load.worker_id))
    return [load.worker_id for load in open_]


def free_blocks(stats: EngineStats) -> int | None:
    """The KV blocks a new or growing session can take on an engine: free ones and cached ones no
    session holds (None: an engine that counts no blocks)."""
    return stats.kv_blocks - stats.kv_blocks_used if stats.kv_blocks else None


class Worker:
    """One engine, its own scheduler, and what the front end knows of it."""

    def __init__(self, worker_id: str, engine: Engine, scheduler: Scheduler, identity: WorkerIdentity):
        self.worker_id = worker_id
        self.engine = engine
        self.scheduler = scheduler
        self.identity = identity
        self.state: WorkerState = READY
        self.draining = False  # kept across a loss: a drained worker that comes back stays drained
        self.restarts = 0  # times it came back as a new process

    @property
    def supervised(self) -> bool:
        return isinstance(self.engine, Supervised)

    def load(self, sessions: int, slots: int) -> WorkerLoad:
        """Its load now; its blocks are asked of its engine only while it takes new sessions."""
        blocks = free_blocks(self.engine.stats()) if self.state == READY else None
        return WorkerLoad(self.worker_id, self.state, slots - sessions, self.scheduler.queue_depth, blocks, sessions)

    def lose(self) -> None:
        self.state = LOST

    def rejoin(self, identity: WorkerIdentity) -> None:
        self.identity = identity
        self.restarts += 1
        self.state = DRAINING if self.draining else READY

    def drain(self) -> None:
        self.draining = True
        if self.state == READY:
            self.state = DRAINING

    def undrain(self) -> None:
        self.draining = False
        if self.state == DRAINING:
            self.state = READY


def local_identity(engine: Engine, fallback_device: str) -> WorkerIdentity:
    """The identity of an engine in this process."""
    device = str(getattr(engine, "device", fallback_device))
    return WorkerIdentity(socket.gethostname(), os.getpid(), device, "in-process", (device,), (os.getpid(),))

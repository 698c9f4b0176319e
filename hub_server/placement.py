"""Where a new session goes among the hub's engine workers. Plain Python, no torch.

A worker is one engine (one device with the target and its KV pool) and the batch scheduler that
feeds it. A session stays on its worker for its whole life, since its KV cache lives there, so
the choice is made once, when it opens: the worker with the most free KV slots, then the
shortest queue. Used by the hub's front end and by the fleet simulation
(`specedge_bench/fleet.py`), so both place sessions by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

READY, DRAINING, LOST = "ready", "draining", "lost"


@dataclass(frozen=True)
class WorkerLoad:
    """What placement needs to know of one worker."""

    worker_id: str
    state: str
    free_slots: int
    queue_depth: int


def placement_order(loads: Iterable[WorkerLoad]) -> list[str]:
    """Workers that may take a new session, best first: most free KV slots, then the shortest
    queue (then the id, so ties break the same way every time). Empty when every one is full."""
    open_ = [load for load in loads if load.state == READY and load.free_slots > 0]
    open_.sort(key=lambda load: (-load.free_slots, load.queue_depth, load.worker_id))
    return [load.worker_id for load in open_]

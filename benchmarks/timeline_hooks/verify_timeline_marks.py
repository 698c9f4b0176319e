"""The moments `verify_timeline.py` reads: a few functions of the hub's modules and of the
client's stream, wrapped as each module loads, so that each call notes (event, time) in its
process. The product's code is not changed, and a process that never loads a module is not
made to. Times are `time.perf_counter_ns()`: CLOCK_MONOTONIC, one clock for every process of
the machine. Each process appends its events to SPECEDGE_TIMELINE/<pid>.txt every
`FLUSH_EVERY` events (the hub's processes are stopped, not asked: the events after their last
write are lost)."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import Any

FLUSH_EVERY = 500  # a write every ~100 verifies: it lands inside one, which the medians ignore

# module: [(its class, or None for a function of the module; the function; what its start
# means, or None; what its end means, or None)]. The engine process runs `engine_process.py` as
# __main__, so its own functions cannot be wrapped: its moments are taken in `ipc`.
WRAPPED: dict[str, list[tuple[str | None, str, str | None, str | None]]] = {
    "specedge_cli.remote.stream": [("SessionStream", "verify", "sends", "has the answer")],
    "hub_server.stream": [
        ("SessionStream", "_take", "has the frame", None),
        ("SessionStream", "_send", "sends the answer", "has sent it"),
    ],
    "hub_server.ipc": [(None, "unpack", "reads a message", None), (None, "pack", "writes a message", None)],
    "hub_server.service": [("Hub", "verify", "verify begins", "verify ends")],
    "hub_server.scheduler": [("Scheduler", "submit", None, "queued for a pass")],
    "hub_server.engine.runner": [("ModelRunner", "_verify_pass", "pass begins", "pass ends")],
}

_events: list[tuple[str, int]] = []


@functools.cache
def role() -> str:
    """Who notes: the engine process, a front end, or a client (the bench)."""
    if "engine_process" in sys.argv[0]:
        return "engine"
    return "front end" if "hub_server" in sys.argv[0] else "client"


def note(event: str) -> None:
    _events.append((f"{role()} {event}", time.perf_counter_ns()))
    if len(_events) >= FLUSH_EVERY:
        flush()


def flush() -> None:
    folder = os.environ.get("SPECEDGE_TIMELINE")
    if folder and _events:
        with open(os.path.join(folder, f"{os.getpid()}.txt"), "a") as out:
            out.writelines(f"{event}\t{at}\n" for event, at in _events)
    _events.clear()


def wrapped(function: Callable, start: str | None, end: str | None) -> Callable:
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            if start:
                note(start)
            try:
                return await function(*args, **kwargs)
            finally:
                if end:
                    note(end)

        return timed_async

    @functools.wraps(function)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if start:
            note(start)
        try:
            return function(*args, **kwargs)
        finally:
            if end:
                note(end)

    return timed


def wrap_module(module: Any) -> None:
    for owner, name, start, end in WRAPPED.get(module.__name__, []):
        holder = module if owner is None else getattr(module, owner)
        setattr(holder, name, wrapped(getattr(holder, name), start, end))


class _Loader(importlib.abc.Loader):
    """The module's own loader, then its functions wrapped."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        wrap_module(module)

    def __getattr__(self, name: str) -> Any:  # the rest of the module's loader (runpy's get_code)
        return getattr(self.loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in WRAPPED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Wrap the listed modules loaded from now on, and those loaded already."""
    sys.meta_path.insert(0, _Finder())
    for name in WRAPPED:
        if name in sys.modules:
            wrap_module(sys.modules[name])

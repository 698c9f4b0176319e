"""A hub started as a child process for `hub_server bench` and the benchmarks, pinned away from the simulated edges."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from specedge_common.launcher import HubProcess


class LocalHub:
    def __init__(
        self,
        model: str,
        draft: Path,
        device: str,
        max_batch: int,
        dtype: str = "auto",
        serve_args: tuple[str, ...] = (),
        pin_hub: bool = True,
    ):
        hub_cores, edge_cores = split_cores() if pin_hub else (set(), set())
        self.hub_cores = hub_cores  # empty: not pinned
        args = ["--model", model, "--draft", str(draft), "--device", device, "--dtype", dtype]
        args += ["--max-batch", str(max_batch), "--max-sessions", str(max(64, max_batch))]
        # --no-auth: loopback only, and a benchmark's own process.
        self._process = HubProcess([*args, "--no-auth", *serve_args], cores=hub_cores)
        self.url = self._process.url
        self._caller_cores = os.sched_getaffinity(0)  # given back at stop: a next hub may want them all
        if edge_cores:
            os.sched_setaffinity(0, edge_cores)
        try:
            self._process.wait_ready(timeout_s=900)
        except BaseException:
            self.stop()
            raise

    @classmethod
    @contextlib.contextmanager
    def maybe(
        cls,
        model: str | None,
        draft: Path,
        device: str,
        max_batch: int,
        dtype: str = "auto",
        serve_args: tuple[str, ...] = (),
        pin_hub: bool = True,
    ) -> Iterator[LocalHub | None]:
        """A local hub when `model` is given, else nothing (the caller measures a running hub)."""
        if model is None:
            yield None
            return
        hub = cls(model, draft, device, max_batch, dtype, serve_args, pin_hub)
        try:
            yield hub
        finally:
            hub.stop()

    def stop(self) -> None:
        self._process.stop(timeout_s=30)
        os.sched_setaffinity(0, self._caller_cores)


def split_cores() -> tuple[set[int], set[int]]:
    """Half the cores for the hub, the rest for its clients (nothing to split on one core)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(), set()
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])

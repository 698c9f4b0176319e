"""A hub started as a child process for `hub_server bench`, pinned away from the simulated edges."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


class LocalHub:
    def __init__(
        self,
        model: str,
        draft: Path,
        device: str,
        max_batch: int,
        dtype: str = "auto",
        serve_args: tuple[str, ...] = (),
    ):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        hub_cores, edge_cores = _split_cores()
        self.hub_cores = hub_cores  # empty: not pinned
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hub_server",
                "serve",
                "--model",
                model,
                "--draft",
                str(draft),
                "--port",
                str(port),
                "--device",
                device,
                "--dtype",
                dtype,
                "--max-batch",
                str(max_batch),
                "--max-sessions",
                str(max(64, max_batch)),
                "--no-auth",
                *serve_args,
            ],  # loopback only, and a benchmark's own process
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=(lambda: os.sched_setaffinity(0, hub_cores)) if hub_cores else None,
        )
        if edge_cores:
            os.sched_setaffinity(0, edge_cores)
        self._wait_ready()

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
    ) -> Iterator[LocalHub | None]:
        """A local hub when `model` is given, else nothing (the caller measures a running hub)."""
        if model is None:
            yield None
            return
        hub = cls(model, draft, device, max_batch, dtype, serve_args)
        try:
            yield hub
        finally:
            hub.stop()

    def _wait_ready(self, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the hub exited with code {self._process.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("the hub did not become ready")

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


def _split_cores() -> tuple[set[int], set[int]]:
    """Half the cores for the hub, the rest for the simulated edges (nothing to split on one core)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return set(), set()
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])

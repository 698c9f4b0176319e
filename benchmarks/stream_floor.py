"""The least a verify over the session stream can add to its pass on this machine: the hub's own
libraries with none of its logic.

    .venv/bin/python benchmarks/stream_floor.py [--pass-ms 0 2 4 6] [--verifies 3000]

The same three processes and hops as a verify over the stream, pinned as `verify_overhead.py`
pins them (the hub's two processes on half the cores, the client on the rest):
- the client: the specedge client's `SessionStream`, on websockets' sync connection;
- a front end: uvicorn (uvloop, its sans-I/O WebSocket) serving a bare ASGI app that reads a
  frame, forwards it over a Unix socket as the hub's front end does (a length and a msgpack
  batch) and sends the answer back as a frame; no FastAPI, no checks;
- an engine: a uvloop server on that socket that spends the pass's time in small torch matrix
  products (one thread: the dispatch-bound target's kind of work) and answers with the time it
  spent, as `verify_ms`.
Overhead = round trip - the engine's pass, the figure `verify_overhead.py` gives for the hub. The
pass matters: a process woken after milliseconds of another's matrix work finds its caches cold.
`--in-engine` serves the stream from the engine's own process instead (no front end, one hop
fewer each way): what a design that ends the stream where the pass runs could reach.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]

from specedge_bench.local_hub import split_cores  # noqa: E402
from specedge_common.net import free_port  # noqa: E402

_LENGTH = struct.Struct("<I")
WARM_UP = 300  # verifies not counted
DRAFT = [5, 6, 7, 8]


def pass_of(pass_ms: float) -> Callable[[], float]:
    """A pass: `pass_ms` of small matrix products on one thread; returns the milliseconds spent."""
    import torch

    torch.set_num_threads(1)
    weights = [torch.randn(64, 64) for _ in range(16)]

    def forward() -> float:
        started = time.perf_counter()
        while (time.perf_counter() - started) * 1000 < pass_ms:
            for weight in weights:
                torch.nn.functional.linear(weight, weight)
        return (time.perf_counter() - started) * 1000

    return forward


def answer_after(forward: Callable[[], float]) -> dict:
    return {"accepted": 0, "tokens": [9], "context_len": 9, "verify_ms": forward()}


def run_engine(address: str, pass_ms: float) -> None:
    """Answer each forwarded verify after a pass."""
    import uvloop

    forward = pass_of(pass_ms)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                messages = msgpack.unpackb(await reader.readexactly(length))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            answer = answer_after(forward)
            body = msgpack.packb([[0, message[1], answer] for message in messages])
            writer.write(_LENGTH.pack(len(body)) + body)

    async def main() -> None:
        await asyncio.start_unix_server(serve, path=address)
        await asyncio.Event().wait()

    uvloop.run(main())


def run_front_end(port: int, address: str | None, pass_ms: float) -> None:
    """Serve one WebSocket at a time: each frame forwarded to the engine at `address` and its
    answer sent back; with no address, answered here after a pass (the stream in the engine)."""
    import uvicorn

    forward = pass_of(pass_ms) if address is None else None

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "websocket":
            return
        reader, writer = await asyncio.open_unix_connection(address) if address else (None, None)
        await receive()  # the connection
        await send({"type": "websocket.accept"})
        while (message := await receive())["type"] == "websocket.receive":
            frame = msgpack.unpackb(message["bytes"])
            frame_id = frame.pop("id")
            if reader is None or writer is None:
                assert forward is not None
                answer = answer_after(forward)
            else:
                body = msgpack.packb([[0, frame_id, "verify", ["session", frame], {}]])
                writer.write(_LENGTH.pack(len(body)) + body)
                (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                answer = msgpack.unpackb(await reader.readexactly(length))[0][2]
            await send({"type": "websocket.send", "bytes": msgpack.packb({"id": frame_id, **answer})})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", ws="websockets-sansio", log_level="warning")


def floor_overhead(
    pass_ms: float, verifies: int, hub_cores: set[int], client_cores: set[int], in_engine: bool = False
) -> float:
    """The median overhead of `verifies` verifies one at a time, around a pass of `pass_ms`
    (`in_engine`: the stream served by the process that runs the pass, no hop between)."""
    from websockets.sync.client import connect

    from specedge_cli.remote.stream import SessionStream

    folder = tempfile.mkdtemp(prefix="specedge-floor-")
    address, port = os.path.join(folder, "engine.sock"), free_port()
    processes: list[subprocess.Popen] = []
    try:
        if not in_engine:
            processes.append(start_role(["engine", "0", address, str(pass_ms)], hub_cores))
            wait_for(lambda: os.path.exists(address), "the floor's engine")
        front_end = ["front-end", str(port), "" if in_engine else address, str(pass_ms if in_engine else 0)]
        processes.append(start_role(front_end, hub_cores))
        if client_cores:
            os.sched_setaffinity(0, client_cores)
        connection = connect_when_up(connect, f"ws://127.0.0.1:{port}/floor")
        stream = SessionStream(connection, f"http://127.0.0.1:{port}", timeout_s=30)
        overheads = []
        for done in range(WARM_UP + verifies):
            started = time.perf_counter()
            answer = stream.verify([], DRAFT)
            if done >= WARM_UP:
                overheads.append((time.perf_counter() - started) * 1000 - answer.verify_ms)
        stream.close()
        return statistics.median(overheads)
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def start_role(role: list[str], cores: set[int]) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, __file__, "--role", *role])
    if cores:
        os.sched_setaffinity(process.pid, cores)
    return process


def wait_for(ready: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up in {timeout_s:.0f} s")
        time.sleep(0.05)


def connect_when_up(connect: Callable, url: str) -> Any:
    """websockets' connection to `url` once the floor's front end listens."""
    connection: list[Any] = []

    def connected() -> bool:
        try:
            connection.append(connect(url, compression=None))
        except OSError:  # not listening yet
            return False
        return True

    wait_for(connected, "the floor's front end")
    return connection[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pass-ms", type=float, nargs="+", default=[0.0, 2.0, 4.0, 6.0])
    parser.add_argument("--verifies", type=int, default=3000)
    parser.add_argument("--in-engine", action="store_true", help="the stream served where the pass runs")
    parser.add_argument("--role", nargs=4, help=argparse.SUPPRESS)  # a process of the floor itself
    args = parser.parse_args()
    if args.role:
        role, port, address, pass_ms = args.role
        if role == "engine":
            run_engine(address, float(pass_ms))
        else:
            run_front_end(int(port), address or None, float(pass_ms))
        return
    hub_cores, client_cores = split_cores()
    for pass_ms in args.pass_ms:
        overhead = floor_overhead(pass_ms, args.verifies, hub_cores, client_cores, args.in_engine)
        print(f"pass {pass_ms:4.1f} ms: overhead p50 {overhead:.3f} ms", flush=True)


if __name__ == "__main__":
    main()

"""The hub's speed through its API, this tree against an older commit, side by side in one run.

    .venv/bin/python benchmarks/hub_saturation.py [--target dispatch|gemma|PATH] [--base 7ade0de]
        [--users 16] [--verifies 400] [--contexts 50 2000] [--rounds 40] [--hub-arg=--threads --hub-arg=1]

Each tree (`--base`, unpacked with `git archive`, and this working tree) runs as a real hub on
loopback (`python -m hub_server serve`, PYTHONPATH at the tree) as it configures itself unless
`--hub-arg` says more, on the dispatch-bound stand-in by default (a 16-layer, hidden-64 Llama
with a 512-token vocabulary: its pass is all operator launches, as a small model's GPU pass is).
For each it measures:

- **at saturation**: `--users` sessions each sending `--verifies` 8-token chain drafts back to
  back (after 20 not counted), all starting together; verifies per second, the CPU the hub's
  whole process tree used (front ends, engine, anything they started; from /proc), verifies per
  hub CPU-second, and the CPU a verify costs beyond the device's busy time (/metrics: on a CPU
  target the passes are CPU too), the hub's own work, which bounds a GPU's verifies per second;
  and the sessions a pass carried on average. Over HTTP in every tree, and again over the session
  stream where the hub offers it (protocol 2 on: how the specedge client verifies). Every tree
  does the same work: each verify adds a token to its session, so a run of fixed length would
  give the faster hub longer contexts, and dearer passes, than the slower one;
- **8 sessions at once** at each context length of `--contexts`: all eight send a verify
  together, `--rounds` times; the device ms per verify the hub reports in /metrics (its busy time
  over its verifies), and the device ms of a pass of 8 inside the hub (per verify).

Beside the second, in this tree, `--alone` (on by default) times the same pass of 8 on this tree's
runner alone (`benchmarks/verify_speed.py`'s worker, one torch thread) at the hub's sessions' mean
context over the rounds, just before and just after the hub's rounds (the hub idle meanwhile), so
the pass inside the hub reads against the pass by itself at the same moment: this machine's speed
drifts by 10% and more within minutes. The client's own CPU is not the hub's: it is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgpack
from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from verify_speed import resolve_target, run_tree, unpack  # noqa: E402

from specedge_bench.metrics import MetricsPage  # noqa: E402
from specedge_cli.remote.stream import STREAM_VERSION  # noqa: E402
from specedge_common import metric_names as names  # noqa: E402
from tests.test_ray_workers import cpu_seconds, is_engine, process_tree  # noqa: E402

DRAFT_TOKENS = 8
WARM_VERIFIES = 20  # a user's verifies before the measured part
READY_TIMEOUT_S = 900


class TreeHub:
    """A hub of one tree on a free loopback port."""

    def __init__(self, tree: Path, target: str, hub_args: list[str], log: Path):
        with socketless_port() as port:
            self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "hub_server", "serve", "--model", target, "--no-auth", "--port", str(port)]
        env = dict(os.environ, PYTHONPATH=str(tree))
        self._log = log.open("w")
        self.process = subprocess.Popen(
            command + hub_args, env=env, cwd=tree, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit(f"the hub of {tree} did not start; see {log}")
            time.sleep(0.5)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def cpu_seconds(self) -> tuple[float, float | None]:
        """CPU seconds of the hub's whole process tree, and of its engine process alone (None: a
        hub with no engine process of its own)."""
        total, engine = 0.0, None
        for pid in process_tree(self.process.pid):
            used = cpu_seconds(pid)
            total += used
            with contextlib.suppress(OSError):  # a process that ended meanwhile
                if is_engine(pid):
                    engine = (engine or 0.0) + used
        return total, engine

    def metrics(self) -> MetricsPage:
        return MetricsPage.parse(httpx.get(f"{self.url}/metrics", timeout=30).text)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


class socketless_port:
    """A free port, released before the hub binds it."""

    def __enter__(self) -> int:
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        return self._socket.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self._socket.close()


async def open_fed(client: httpx.AsyncClient, info: dict, context: int, seed: int) -> str:
    body = {key: info[key] for key in ("protocol_version", "vocab_size", "vocab_fingerprint")}
    session = (await client.post("/v1/sessions", json=body)).json()["session_id"]
    tokens = random.Random(seed).choices(range(3, min(info["vocab_size"], 500)), k=context)
    (await client.post(f"/v1/sessions/{session}/feed", json={"tokens": tokens})).raise_for_status()
    return session


async def verify(client: httpx.AsyncClient, session: str, rng: random.Random, vocab: int) -> None:
    draft = rng.choices(range(3, min(vocab, 500)), k=DRAFT_TOKENS)
    (await client.post(f"/v1/sessions/{session}/verify", json={"draft": draft})).raise_for_status()


async def stream_user(url: str, session: str, seed: int, vocab: int, run: Run) -> None:
    """A user verifying over the session's stream: one msgpack frame each way."""
    rng = random.Random(seed)
    async with connect(url.replace("http", "ws", 1) + f"/v1/sessions/{session}/stream", compression=None) as stream:
        frame_id = 0
        async for _ in run.turns():
            draft = rng.choices(range(3, min(vocab, 500)), k=DRAFT_TOKENS)
            started = time.perf_counter()
            await stream.send(msgpack.packb({"id": frame_id, "tokens": [], "draft": draft, "parents": None}))
            answer = msgpack.unpackb(await stream.recv())
            run.took(time.perf_counter() - started)
            if "error" in answer:
                raise RuntimeError(f"a stream verify was refused: {answer['error']}")
            frame_id += 1


class Run:
    """Each user's verifies: WARM_VERIFIES not counted (every shape of pass seen), then, once every
    user is warm, `counted` more, so every tree serves the same sessions at the same contexts."""

    def __init__(self, users: int, counted: int):
        self.counted = counted
        self._warming = users
        self.measured = asyncio.Event()  # every user is warm: the measured part begins
        self.round_trips: list[float] = []  # seconds, of the measured verifies

    def took(self, seconds: float) -> None:
        """A verify's round trip, as its user saw it."""
        if self.measured.is_set():
            self.round_trips.append(seconds)

    async def turns(self) -> AsyncIterator[None]:
        """One item per verify the calling user sends."""
        for _ in range(WARM_VERIFIES):
            yield
        self._warming -= 1
        if not self._warming:
            self.measured.set()
        await self.measured.wait()
        for _ in range(self.counted):
            yield


async def saturation(hub: TreeHub, users: int, verifies: int, way: str = "http") -> dict:
    limits = httpx.Limits(max_connections=users + 4)
    async with httpx.AsyncClient(base_url=hub.url, timeout=120, limits=limits) as client:
        info = (await client.get("/v1/info")).json()
        sessions = [await open_fed(client, info, 32, seed) for seed in range(users)]
        run = Run(users, verifies)

        async def user(session: str, seed: int) -> None:
            if way == "stream":
                return await stream_user(hub.url, session, seed, info["vocab_size"], run)
            rng = random.Random(seed)
            async for _ in run.turns():
                started = time.perf_counter()
                await verify(client, session, rng, info["vocab_size"])
                run.took(time.perf_counter() - started)

        tasks = [asyncio.create_task(user(s, i)) for i, s in enumerate(sessions)]
        await run.measured.wait()
        before = hub.metrics()
        (cpu, engine_cpu), started = hub.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*tasks)
        elapsed, (cpu_after, engine_after) = time.perf_counter() - started, hub.cpu_seconds()
        used = cpu_after - cpu
        page = hub.metrics().since(before)
        busy, passes = page.value(names.DEVICE_BUSY_SECONDS), page.value(names.VERIFY_PASSES)
        for session in sessions:
            await client.delete(f"/v1/sessions/{session}")
    counted = users * verifies
    return {
        "verifies_per_s": round(counted / elapsed, 1),
        "hub_cpu_per_s": round(used / elapsed, 2),
        "verifies_per_cpu_s": round(counted / used, 1),
        # The hub's own work per verify: its CPU beyond what the device (here the CPU too) was busy with.
        "cpu_beyond_device_ms_per_verify": round((used - busy) * 1000 / counted, 3),
        # The engine's share of it: its loop runs the passes too, so this work per verify bounds the
        # verifies a second one engine feeds a GPU, however many front ends serve in front of it.
        "engine_cpu_beyond_device_ms_per_verify": (
            round((engine_after - engine_cpu - busy) * 1000 / counted, 3)
            if engine_cpu is not None and engine_after is not None
            else None
        ),
        # How full the passes were: a hub with time to spare runs smaller passes sooner.
        "sessions_per_pass": round(page.value(names.VERIFY_REQUESTS) / passes, 2) if passes else None,
        "seconds": round(elapsed, 1),
        # What a user waits at worst: a pause of the hub's (a full garbage collection, say) shows here.
        "round_trip_p50_ms": round(statistics.median(run.round_trips) * 1000, 1),
        "round_trip_p999_ms": round(sorted(run.round_trips)[int(0.999 * (len(run.round_trips) - 1))] * 1000, 1),
        "round_trip_max_ms": round(max(run.round_trips) * 1000, 1),
    }


async def eight_at_once(hub: TreeHub, context: int, rounds: int) -> dict:
    async with httpx.AsyncClient(base_url=hub.url, timeout=300) as client:
        info = (await client.get("/v1/info")).json()
        sessions = [await open_fed(client, info, context, seed) for seed in range(8)]
        rngs = [random.Random(seed) for seed in range(8)]
        for _ in range(3):  # warm
            await asyncio.gather(*(verify(client, s, r, info["vocab_size"]) for s, r in zip(sessions, rngs)))
        before = hub.metrics()
        for _ in range(rounds):
            await asyncio.gather(*(verify(client, s, r, info["vocab_size"]) for s, r in zip(sessions, rngs)))
        page = hub.metrics().since(before)
        for session in sessions:
            await client.delete(f"/v1/sessions/{session}")
    verifies = page.value(names.VERIFY_REQUESTS)
    passes_of_8 = page.value(names.VERIFY_PASSES, sessions="8")
    pass_s = page.value(names.VERIFY_PASS_SECONDS, sessions="8")
    return {
        "device_ms_per_verify": round(page.value(names.DEVICE_BUSY_SECONDS) * 1000 / verifies, 3),
        "pass_of_8_ms_per_verify": round(pass_s * 1000 / passes_of_8 / 8, 3) if passes_of_8 else None,
        "passes_of_8": int(passes_of_8),
        "verifies": int(verifies),
    }


def measure(tree: Path, target: str, args: argparse.Namespace, log: Path, beside: bool = False) -> dict:
    """The tree's figures; `beside`: the runner alone timed just before and after each context's rounds."""
    hub = TreeHub(tree, target, args.hub_arg, log)
    try:
        figures = {"saturation": asyncio.run(saturation(hub, args.users, args.verifies))}
        if httpx.get(f"{hub.url}/v1/info", timeout=30).json()["protocol_version"] >= STREAM_VERSION:
            figures["saturation (stream)"] = asyncio.run(saturation(hub, args.users, args.verifies, "stream"))
        for context in args.contexts:
            before = alone(target, args, context) if beside else None
            figures[f"8 at {context}"] = asyncio.run(eight_at_once(hub, context, args.rounds))
            if beside:
                figures[f"8 at {context}"]["alone_ms_per_verify"] = [before, alone(target, args, context)]
        return figures
    finally:
        hub.stop()


def alone(target: str, args: argparse.Namespace, context: int) -> float:
    """The mean ms per verify of the same pass of 8 on this tree's runner alone (verify_speed's
    worker, eager, one thread), at the hub's sessions' mean context over their rounds beside
    `context` (each verify adds a token to a session; the runner alone keeps its contexts)."""
    grown = context + (args.rounds + 1) // 2
    options = argparse.Namespace(
        contexts=[grown],
        sessions=8,
        draft_tokens=DRAFT_TOKENS,
        rounds=args.rounds,
        threads=1,
        device="cpu",
        accepted=[0],
        attention="auto",
    )
    return round(run_tree(REPO, options, target, "off")[str(grown)]["mean_ms"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="dispatch", help="dispatch, gemma, or a .gguf file / model folder")
    parser.add_argument("--base", default="7ade0de")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--verifies", type=int, default=400, help="each user's measured verifies at saturation")
    parser.add_argument("--contexts", type=int, nargs="+", default=[50, 2000])
    parser.add_argument("--rounds", type=int, default=40, help="passes of 8 at each context")
    parser.add_argument("--hub-arg", action="append", default=[], help="passed to both hubs' `serve`")
    parser.add_argument("--no-alone", dest="alone", action="store_false")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        target = resolve_target(args.target, Path(tempfile.gettempdir()) / "specedge-bench-targets")
        results = {}
        if args.base:
            (Path(scratch) / "base").mkdir()
            base = unpack(args.base, Path(scratch) / "base")
            results[args.base] = measure(base, target, args, Path(scratch) / "base.log")
        results["this tree"] = measure(REPO, target, args, Path(scratch) / "this.log", beside=args.alone)
    report(results, args, target)


def report(results: dict, args: argparse.Namespace, target: str) -> None:
    print(f"target {Path(target).name}; hub args {' '.join(args.hub_arg) or '(as it configures itself)'}")
    print(json.dumps(results, indent=1))
    if args.base and args.base in results:
        old, new = results[args.base], results["this tree"]
        ratio = new["saturation"]["verifies_per_cpu_s"] / old["saturation"]["verifies_per_cpu_s"]
        print(f"verifies per hub CPU-second: {ratio:.2f}x {args.base}")
        if "saturation (stream)" in new:
            ratio = new["saturation (stream)"]["verifies_per_cpu_s"] / old["saturation"]["verifies_per_cpu_s"]
            print(f"verifies per hub CPU-second over the session stream: {ratio:.2f}x {args.base} over HTTP")
        # Only this tree's: an engine sharing its interpreter with HTTP counts GIL waits as device time.
        beyond = ", ".join(
            f"{way} {new[way]['cpu_beyond_device_ms_per_verify']:.3f} ms"
            f" (its engine process {new[way]['engine_cpu_beyond_device_ms_per_verify']} ms)"
            for way in ("saturation", "saturation (stream)")
            if way in new
        )
        print(f"the hub's CPU a verify beyond the device's work at saturation: {beyond}")
        for context in args.contexts:
            key = f"8 at {context}"
            speedup = old[key]["device_ms_per_verify"] / new[key]["device_ms_per_verify"]
            print(
                f"device ms per verify at 8 sessions, {context}-token contexts: {speedup:.2f}x lower than {args.base}"
            )
    for context in args.contexts:
        figures = results["this tree"][f"8 at {context}"]
        inside, by_itself = figures["pass_of_8_ms_per_verify"], figures.get("alone_ms_per_verify")
        if inside and by_itself:  # the hub's figure is a mean (busy time over passes), as the runner's
            ratios = " and ".join(f"{inside / alone_ms:.2f}x" for alone_ms in by_itself)
            print(f"a pass of 8 at {context} tokens inside the hub: {ratios} the pass alone (timed before and after)")


if __name__ == "__main__":
    main()

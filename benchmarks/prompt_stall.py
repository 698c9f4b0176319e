"""What a long prompt costs the other users of a hub: verify latency while it is fed, and how long
prompts take beside verifies and beside each other.

Runs a hub on TARGET (through the project's launcher) and measures, side by side in one run:
1. 8 sessions sending 8-token chain drafts back to back: their verify latency (p50, p99);
2. the same while another session feeds a 3,000-token prompt: their latency during the feed, and
   the feed's time;
3. the prompt fed alone; 4. two such prompts fed at once (each one's time).
Bars (chunked prefill): p99 in 2 at most 3x that of 1; the feed in 2 within 2.5x of 3; both of 4
within 2.5x of 3. The feed starts once every user has had SETTLE_VERIFIES verifies, so what 2
measures is the feed, not the users' own first passes (1 leaves out its first tenth for the same
reason). `--hub-repo` (repeatable) runs the hub of each checkout given, in turn, `--rounds` times:
an older commit beside this one in one run, on a machine whose load is the same for both.

    .venv/bin/python benchmarks/prompt_stall.py --target ~/.cache/specedge/models/gemma-3-270m-Q4_K_M.gguf \
        --hub-repo /tmp/older --hub-repo . --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from specedge_common.launcher import HubProcess  # noqa: E402

SETTLE_VERIFIES = 5  # each user's verifies before a prompt is fed beside them


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def open_session(client: httpx.AsyncClient, info: dict) -> str:
    body = {
        "protocol_version": info["protocol_version"],
        "vocab_size": info["vocab_size"],
        "vocab_fingerprint": info["vocab_fingerprint"],
    }
    answer = await client.post("/v1/sessions", json=body)
    answer.raise_for_status()
    return answer.json()["session_id"]


async def verifier(client: httpx.AsyncClient, info: dict, seed: int, stop: asyncio.Event, out: list) -> None:
    """One user sending 8-token chain drafts back to back; (finished at, seconds) per verify."""
    rng = random.Random(seed)
    session = await open_session(client, info)
    tokens = rng.choices(range(100, 20000), k=32)
    while not stop.is_set():
        draft = rng.choices(range(100, 20000), k=8)
        started = time.perf_counter()
        answer = await client.post(f"/v1/sessions/{session}/verify", json={"tokens": tokens, "draft": draft})
        answer.raise_for_status()
        out.append((time.perf_counter(), time.perf_counter() - started))
        tokens = []
    await client.delete(f"/v1/sessions/{session}")


async def feed(client: httpx.AsyncClient, info: dict, length: int, seed: int) -> tuple[float, float]:
    """A new session fed a `length`-token prompt: (started, finished)."""
    session = await open_session(client, info)
    prompt = random.Random(seed).choices(range(100, 20000), k=length)
    started = time.perf_counter()
    answer = await client.post(f"/v1/sessions/{session}/feed", json={"tokens": prompt})
    answer.raise_for_status()
    finished = time.perf_counter()
    await client.delete(f"/v1/sessions/{session}")
    return started, finished


async def measure(url: str, users: int, prompt_tokens: int, seconds: float) -> dict:
    limits = httpx.Limits(max_connections=users + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        info = (await client.get("/v1/info")).json()
        await feed(client, info, prompt_tokens, seed=99)  # warm: the first long pass of each shape

        async def verifiers_for(window: float, during=None) -> tuple[list, tuple[float, float] | None]:
            stop, out = asyncio.Event(), []
            tasks = [asyncio.create_task(verifier(client, info, seed, stop, out)) for seed in range(users)]
            await asyncio.sleep(1.0)  # everyone verifying
            while len(out) < SETTLE_VERIFIES * users:  # past their sessions' opening and first passes
                await asyncio.sleep(0.05)
            fed = await during() if during else None
            if fed is None:
                await asyncio.sleep(window)
            stop.set()
            await asyncio.gather(*tasks)
            return out, fed

        base, _ = await verifiers_for(seconds)
        base_latency = [s for _, s in base[len(base) // 10 :]]
        busy, fed = await verifiers_for(0, lambda: feed(client, info, prompt_tokens, seed=1))
        assert fed is not None
        # Every verify whose wait overlapped the feed (one frozen by it included).
        during = [s for at, s in busy if at - s < fed[1] and at > fed[0]]
        alone = await feed(client, info, prompt_tokens, seed=2)
        both = await asyncio.gather(*(feed(client, info, prompt_tokens, seed=s) for s in (3, 4)))
    alone_s = alone[1] - alone[0]
    return {
        "users": users,
        "prompt_tokens": prompt_tokens,
        "verify_p50_ms": round(statistics.median(base_latency) * 1000, 1),
        "verify_p99_ms": round(percentile(base_latency, 0.99) * 1000, 1),
        "verify_p50_ms_during_feed": round(statistics.median(during) * 1000, 1),
        "verify_p99_ms_during_feed": round(percentile(during, 0.99) * 1000, 1),
        "verifies_during_feed": len(during),
        "feed_s_beside_verifies": round(fed[1] - fed[0], 2),
        "feed_s_alone": round(alone_s, 2),
        "two_feeds_s": [round(b - a, 2) for a, b in both],
        "p99_ratio": round(percentile(during, 0.99) / percentile(base_latency, 0.99), 2),
        "feed_ratio": round((fed[1] - fed[0]) / alone_s, 2),
        "two_feeds_ratio": round(max(b - a for a, b in both) / alone_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="target model (.gguf or a Hugging Face folder)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the users verify without a prompt")
    parser.add_argument(
        "--hub-repo", type=Path, action="append", help="a checkout whose hub runs (repeatable; default: this one)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="how many times each hub runs, the hubs in turn")
    parser.add_argument("--hub-arg", action="append", default=[], help="an extra `hub_server serve` argument")
    args = parser.parse_args()
    results = []
    for _ in range(args.rounds):
        for repo in args.hub_repo or [REPO]:
            results.append(run_hub(repo, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # each as it comes: a long run
    print(json.dumps(results[0] if len(results) == 1 else results, indent=2))


def run_hub(repo: Path, args: argparse.Namespace) -> dict:
    """The measures on a hub of the checkout `repo`, with the machine's load around them."""
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as workdir:
        serve = ["--model", str(args.target), "--no-auth", "--max-sessions", str(args.users + 8), *args.hub_arg]
        hub = HubProcess(serve, log_path=Path(workdir) / "hub.log", cwd=repo)
        try:
            hub.wait_ready(timeout_s=600)
            result = asyncio.run(measure(hub.url, args.users, args.prompt_tokens, args.seconds))
        finally:
            hub.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    result["hub_repo"], result["hub_commit"] = str(repo), commit.stdout.strip()
    result["load_1min"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]  # before and after
    return result


if __name__ == "__main__":
    main()

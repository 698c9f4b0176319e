"""KV memory that follows use: how many sessions one KV budget holds, whatever their context
limit; and what sessions opening with one prefix hold and cost.

    .venv/bin/python benchmarks/kv_blocks.py [--target dispatch] [--kv-memory-gib 0.05]
        [--limits 8192 512] [--tokens 200] [--prefix 1500] [--sessions 16] [--threads 1]

For each context limit (`--max-context`) it loads the hub's runner alone (no HTTP) with
`--max-sessions 4096` and the budget, then opens sessions and feeds each a prompt of `--tokens`
tokens until the engine refuses one (no session row or blocks for a new session, or
`kv_memory_full` for its prompt). Every admitted session then verifies a 4-token draft (batches
of 8); each must answer. Beside the count: what the budget holds at the model's bytes per token
with blocks rounded up (the most any paging of this block size could admit), and the share
reached. The target is to hold at least 0.8x as many at the long limit as at the short one, and
at least 80% of that ideal.

Shared prefix: `--sessions` sessions of one account open with the same `--prefix` tokens plus 16
of their own; the KV blocks they hold together against one session's, and each feed's time (the
2nd to last against the first). Targets: at most 2.5x the KV of one, later feeds at most 25% of
the first's time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hub_server.config import HubSettings
from hub_server.engine.kv_pool import BLOCK_TOKENS, blocks_for
from hub_server.engine.runner import ModelRunner
from hub_server.engine_api import VerifyJob
from hub_server.errors import KVMemoryFull
from hub_server.tree import chain_parents


def resolve(target: str) -> str:
    if target != "dispatch":
        return target
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dispatch_target import build_dispatch_target

    return str(build_dispatch_target(Path(tempfile.gettempdir()) / "specedge-bench-targets"))


def sessions_held(runner: ModelRunner, tokens: int) -> list:
    """Open and feed sessions until the engine refuses one; the admitted ones, fed."""
    held = []
    while (kv := runner.new_kv()) is not None:
        prompt = [1] + [(7 * len(held) + i) % 400 + 3 for i in range(tokens - 1)]
        try:
            runner.prefill(kv, prompt)
        except KVMemoryFull:
            runner.release(kv)
            break
        held.append((kv, prompt))
    return held


def all_answer(runner: ModelRunner, held: list) -> bool:
    """Every admitted session verifies a 4-token draft, 8 sessions a pass."""
    answered = 0
    for start in range(0, len(held), 8):
        jobs = [
            VerifyJob(kv, prompt[kv.length :], [5, 6, 7, 8], chain_parents(4), 0.0, 0, frozenset())
            for kv, prompt in held[start : start + 8]
        ]
        runner.verify_batch(jobs)
        answered += sum(bool(job.emitted) for job in jobs)
    return answered == len(held)


def shared_prefix(target: str, prefix_tokens: int, sessions: int) -> None:
    runner = ModelRunner(HubSettings(model=target, device="cpu", max_sessions=sessions, kv_memory_gib=0.5))
    prefix = [1] + [(11 * i) % 400 + 3 for i in range(prefix_tokens - 1)]
    used, feeds = [], []
    for s in range(sessions):
        kv = runner.new_kv(scope="acct_bench")
        started = time.perf_counter()
        runner.prefill(kv, prefix + [(s * 16 + i) % 400 + 3 for i in range(16)])
        feeds.append(time.perf_counter() - started)
        used.append(runner.pool.used_blocks)
    later = statistics.median(feeds[1:])
    print(
        f"{sessions} sessions opening with one {prefix_tokens}-token prefix (+16 each): {used[-1]} blocks held, "
        f"{used[-1] / used[0]:.2f}x one session's {used[0]}; first feed {feeds[0] * 1000:.0f} ms, "
        f"later feeds median {later * 1000:.1f} ms ({later / feeds[0]:.0%}), slowest {max(feeds[1:]) * 1000:.1f} ms; "
        f"{runner.pool.tally.tokens_reused} tokens not computed"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="dispatch")
    parser.add_argument("--kv-memory-gib", type=float, default=0.05)
    parser.add_argument("--limits", type=int, nargs="+", default=[8192, 512])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--prefix", type=int, default=1500)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = resolve(args.target)
    counts = {}
    for limit in args.limits:
        settings = HubSettings(
            model=target, device="cpu", max_sessions=4096, max_context=limit, kv_memory_gib=args.kv_memory_gib
        )
        runner = ModelRunner(settings)
        held = sessions_held(runner, args.tokens)
        ideal = runner.pool.usable_blocks // blocks_for(args.tokens)
        answered = all_answer(runner, held)
        counts[limit] = len(held)
        print(
            f"--max-context {limit}: {len(held)} sessions of {args.tokens} tokens held, all answering: {answered}; "
            f"the budget holds {ideal} at {runner.pool.shape.token_bytes} B a token in blocks of {BLOCK_TOKENS} "
            f"({len(held) / ideal:.0%}); {runner.pool.usable_blocks} blocks"
        )
    longest, shortest = max(args.limits), min(args.limits)
    print(f"sessions at {longest} / at {shortest}: {counts[longest] / counts[shortest]:.2f}x")
    shared_prefix(target, args.prefix, args.sessions)


if __name__ == "__main__":
    main()

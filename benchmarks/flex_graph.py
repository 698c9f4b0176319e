"""FlexAttention's compiled passes on a real target: one graph per bucket, and none again after.

    .venv/bin/python benchmarks/flex_graph.py --target dispatch|gemma|PATH [--passes 200] [--max-batch 2]
        [--max-draft 8] [--sessions 4]

Starts a runner with `--attention flex --compile on` (the whole decoder compiled with
`fullgraph=True`, one graph per bucket, at start), then runs `--passes` verify passes as the hub
would: sessions opening (a prompt fed) and closing, one or more sessions a pass, chains and
trees of random drafts (mostly rejected: each context grows a token or so a pass, across
blocks). Prints the start-up compile time, the graphs compiled (AOTAutograd's count) at start and
after the passes (a recompile adds one), the graph breaks it counted, and the median
device time of a pass.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from verify_speed import resolve_target

from hub_server.config import HubSettings
from hub_server.engine.runner import ModelRunner
from hub_server.engine_api import VerifyJob
from hub_server.tree import chain_parents


def run_passes(runner: ModelRunner, args: argparse.Namespace, vocab: int) -> list[float]:
    """`args.passes` verify passes of sessions coming and going; the device seconds of each."""
    rng = random.Random(0)
    opened, contexts, seconds = [], {}, []
    for number in range(args.passes):
        while len(opened) < min(args.sessions, args.max_batch) or (rng.random() < 0.1 and len(opened) < args.sessions):
            kv = runner.new_kv()
            contexts[id(kv)] = [1] + [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 60))]
            runner.prefill(kv, contexts[id(kv)])
            opened.append(kv)
        if rng.random() < 0.05 and len(opened) > 1:
            runner.release(opened.pop(rng.randrange(len(opened))))
        jobs = []
        for kv in rng.sample(opened, rng.randint(1, min(len(opened), args.max_batch))):
            size = rng.randrange(0, args.max_draft + 1)
            parents = [rng.randrange(-1, i) for i in range(size)] if number % 2 else chain_parents(size)
            draft = [rng.randrange(3, vocab) for _ in range(size)]
            jobs.append(VerifyJob(kv, contexts[id(kv)][kv.length :], draft, parents, 0.0, 0, frozenset()))
        seconds.append(runner.verify_batch(jobs))
        for job in jobs:
            contexts[id(job.kv)] += job.emitted
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="dispatch, gemma, or a .gguf file / model folder")
    parser.add_argument("--passes", type=int, default=200)
    parser.add_argument("--max-batch", type=int, default=2)
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the runner's start-up lines
    with tempfile.TemporaryDirectory() as work:
        target = resolve_target(args.target, Path(work))
        settings = HubSettings(
            model=target,
            device="cpu",
            attention="flex",
            compile="on",
            max_batch=args.max_batch,
            max_draft_tokens=args.max_draft,
            max_sessions=args.sessions + 2,
            kv_memory_gib=0.5,
            threads=args.threads,
            cache_dir=Path(work) / "cache",
        )
        started = time.perf_counter()
        runner = ModelRunner(settings)
        compiled_in = time.perf_counter() - started
        graphs, breaks = counters["aot_autograd"]["total"], sum(counters["graph_break"].values())
        seconds = run_passes(runner, args, runner.vocab_size)
        print(f"{Path(target).name}: started (buckets compiled) in {compiled_in:.0f} s")
        print(f"graphs compiled: {graphs} at start, {counters['aot_autograd']['total']} after {args.passes} passes")
        print(f"graph breaks: {breaks} after start, {sum(counters['graph_break'].values())} after the passes")
        print(f"compiled passes {runner.compiled_hits}, eager (no bucket) {runner.compiled_misses}")
        print(f"device time a pass: median {statistics.median(seconds) * 1e3:.1f} ms")


if __name__ == "__main__":
    with torch.inference_mode():
        main()

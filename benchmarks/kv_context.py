"""Verify cost against context length: what keeping every session's KV in place saves.

    .venv/bin/python benchmarks/kv_context.py --target MODEL [--contexts 512 2048] [--sessions 1 8] [--rounds 5] [--threads 1]

Loads the runner alone (no HTTP), fills N sessions with a context of L tokens each, then times
batched verifies of one 4-token draft per session: the runner's device time per pass, and what
it would cost per verified session (the fastest of --rounds passes). Run it on two commits to
compare KV layouts.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch

from hub_server.config import HubSettings
from hub_server.engine.runner import ModelRunner
from hub_server.engine_api import VerifyJob
from hub_server.tree import chain_parents


def settings_for(target: str, sessions: int, context: int) -> HubSettings:
    room = context + 64
    if "kv_memory_gib" in inspect.signature(HubSettings).parameters:  # a KV pool to size
        return HubSettings(model=target, device="cpu", max_sessions=sessions, max_context=room, kv_memory_gib=2)
    return HubSettings(model=target, device="cpu", max_context=room)


def pass_ms(runner: ModelRunner, sessions: int, context: int, rounds: int) -> float:
    slots = []
    for s in range(sessions):
        kv = runner.new_kv()
        runner.prefill(kv, [1] + [(7 * s + i) % 500 + 3 for i in range(context - 1)])
        slots.append(kv)
    draft = [5, 6, 7, 8]
    times = []
    for r in range(rounds):
        jobs = [VerifyJob(kv, [9 + r], draft, chain_parents(len(draft)), 0.0, 0, frozenset()) for kv in slots]
        busy = runner.busy_seconds
        runner.verify_batch(jobs)
        times.append(runner.busy_seconds - busy)
    for kv in slots:
        if hasattr(runner, "release"):
            runner.release(kv)
    return 1000 * min(times)  # the least disturbed pass: other work on a shared machine only adds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = ModelRunner(settings_for(args.target, max(args.sessions), max(args.contexts)))
    print("| context | sessions | ms per pass | ms per session |\n|---|---|---|---|")
    for context in args.contexts:
        for sessions in args.sessions:
            started = time.perf_counter()
            ms = pass_ms(runner, sessions, context, args.rounds)
            print(
                f"| {context} | {sessions} | {ms:.1f} | {ms / sessions:.1f} |  (setup {time.perf_counter() - started:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()

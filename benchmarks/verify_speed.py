"""Device time per verify through the hub's runner, this tree against an older commit, side by side.

    .venv/bin/python benchmarks/verify_speed.py --target dispatch|gemma|PATH [--contexts 50 2000]
        [--sessions 8] [--draft-tokens 8] [--rounds 20] [--compile on] [--base 7ade0de] [--turns 2]
        [--attention auto|reference|kernel|flex]

For each tree (the commit `--base`, unpacked with `git archive` into a temporary folder, and this
working tree) it starts a worker process with PYTHONPATH pointing there, so each measures its own
`ModelRunner`. A worker fills `--sessions` KV slots with contexts of each length, then times
batched verify passes of all of them, each session with its last context token and a chain draft
of `--draft-tokens` tokens (see `--accepted`); slot lengths are reset after each pass, so every pass sees the
same contexts. The figure is the runner's own device time (`busy_seconds`) per pass divided by
the sessions in it: device time per verify; beside it the process's CPU time over the same pass
(one torch thread: on a loaded machine it leaves out the time the process waited for a core).
Trees run in turns (`--turns`), one torch thread each, and the best turn's median is kept: a
shared machine only ever adds time.

Beside the device time it prints the host-side parts of a pass the tree's runner has (timed
by wrapping its methods): laying the pass out (`_batch`) and reading the target's choices
(`_choices`), ms per pass, both included in the device time.

`--accepted 0 4 8` times drafts the target accepts that far: each starts with that many of the
target's own greedy next tokens (decoded by the runner first), then tokens it would not choose;
the default 0 is a draft the target rejects at once.

`--target dispatch` builds the dispatch-bound stand-in (benchmarks/dispatch_target.py); `gemma`
is the default Gemma 3 270M GGUF (assembled from its PyPI package).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def resolve_target(target: str, work: Path) -> str:
    if target == "dispatch":
        sys.path.insert(0, str(REPO / "benchmarks"))
        from dispatch_target import build_dispatch_target

        return str(build_dispatch_target(work))
    if target == "gemma":
        sys.path.insert(0, str(REPO))
        from specedge_cli.models import resolve_model

        models = Path(os.environ.get("SPECEDGE_HOME", Path.home() / ".cache" / "specedge")) / "models"
        return str(resolve_model("gemma3-270m", models).path)
    return target


# --- the worker: one tree's runner ------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    # Only the tree on PYTHONPATH: an editable install of another checkout would otherwise lend
    # this one the modules it lacks (hub_server.engine to a tree from before it existed).
    sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder).lower()]
    import numpy as np
    import torch

    from hub_server.config import HubSettings

    if (Path.cwd() / "hub_server" / "engine" / "runner.py").exists():  # the hub by role, or a tree from before it
        from hub_server.engine.runner import ModelRunner, VerifyJob
        from hub_server.tree import chain_parents
    else:
        from hub_server.runner import ModelRunner, VerifyJob
        from hub_server.verify import chain_parents

    torch.set_num_threads(args.threads)
    fields = {
        "model": args.target,
        "device": args.device,
        "max_sessions": args.sessions,
        "max_context": max(args.contexts) + args.draft_tokens + 64,
        "kv_memory_gib": 2,  # a pool of blocks takes the whole budget at start (virtual memory on a CPU)
        "max_batch": args.sessions,
        "max_draft_tokens": args.draft_tokens,
        "compile": args.compile,
        "attention": args.attention,
        # A tree from before the attention backends names the same choices its own way.
        "cpu_attention": {"reference": "sdpa", "kernel": "kernel"}.get(args.attention, "auto"),
    }
    accepted = inspect.signature(HubSettings).parameters
    runner = ModelRunner(HubSettings(**{k: v for k, v in fields.items() if k in accepted}))
    print(f"worker: {sys.modules[ModelRunner.__module__].__file__}", file=sys.stderr)
    parts = time_parts(runner)
    rng = np.random.default_rng(0)
    figures = {}
    for context in args.contexts:
        slots = [runner.new_kv() for _ in range(args.sessions)]
        contexts = [[1] + rng.integers(10, runner.vocab_size, context - 1).tolist() for _ in slots]
        torch.set_num_threads(len(os.sched_getaffinity(0)))  # untimed: the contexts, on every core
        for slot, tokens in zip(slots, contexts):
            runner.prefill(slot, tokens)
        truths = target_continuations(runner, VerifyJob, slots, contexts, args.draft_tokens)
        torch.set_num_threads(args.threads)
        for accepted in args.accepted:
            times, cpu_times = [], []
            part_times: dict[str, list[float]] = {}
            for round_ in range(args.rounds + 2):  # two warm-up passes
                jobs = []
                for slot, tokens, truth in zip(slots, contexts, truths):
                    slot.length = len(tokens) - 1
                    # The target's own next tokens for the first `accepted`, then a token it would not choose.
                    wrong = [(t + 1 + int(rng.integers(1, runner.vocab_size - 11))) % runner.vocab_size for t in truth]
                    draft = (truth[:accepted] + wrong[accepted:])[: args.draft_tokens]
                    jobs.append(VerifyJob(slot, tokens[-1:], draft, chain_parents(len(draft)), 0.0, 0, frozenset()))
                for spent in parts.values():
                    spent.clear()
                busy, cpu = runner.busy_seconds, time.process_time()
                runner.verify_batch(jobs)
                if round_ >= 2:
                    times.append((runner.busy_seconds - busy) * 1000 / args.sessions)
                    cpu_times.append((time.process_time() - cpu) * 1000 / args.sessions)
                    for name, spent in parts.items():
                        part_times.setdefault(name, []).append(sum(spent) * 1000)
            figures[key(context, accepted, args)] = {
                "median_ms": statistics.median(times),
                "mean_ms": statistics.mean(times),  # what a hub's /metrics gives: busy time over passes
                "min_ms": min(times),
                "cpu_median_ms": statistics.median(cpu_times),
            } | {f"{name}_pass_ms": statistics.median(spent) for name, spent in part_times.items()}
        for slot in slots:
            runner.release(slot)
    print("RESULT " + json.dumps(figures), flush=True)


def time_parts(runner) -> dict[str, list[float]]:
    """The host-side parts of a pass, timed by wrapping the runner's own methods (where the tree
    has them): laying the pass out (`_batch`: ids, places, positions, masks) and reading the
    target's choices (`_choices`: the projection's walk, argmax included). Whole ms per pass."""
    parts: dict[str, list[float]] = {}
    for name, method in (("layout", "_batch"), ("choices", "_choices")):
        own = getattr(runner, method, None)
        if own is None:
            continue
        spent = parts[name] = []

        def timed(*args, _own=own, _spent=spent, **kwargs):
            started = time.perf_counter()
            try:
                return _own(*args, **kwargs)
            finally:
                _spent.append(time.perf_counter() - started)

        setattr(runner, method, timed)
    return parts


def target_continuations(runner, VerifyJob, slots, contexts, n: int) -> list[list[int]]:
    """Each session's next `n` greedy tokens, as the target decodes them (one verify pass a token,
    all sessions batched); the slots are left as they were."""
    extended = [list(tokens) for tokens in contexts]
    for _ in range(n):
        jobs = [
            VerifyJob(slot, tokens[slot.length :], [], [], 0.0, 0, frozenset()) for slot, tokens in zip(slots, extended)
        ]
        runner.verify_batch(jobs)
        for tokens, job in zip(extended, jobs):
            tokens.extend(job.emitted)
    return [tokens[len(context) :] for tokens, context in zip(extended, contexts)]


def key(context: int, accepted: int, args: argparse.Namespace) -> str:
    """A figure's name: its context, and its accepted draft tokens when more than one count is run."""
    return str(context) if len(args.accepted) == 1 else f"{context}/{accepted}"


# --- the driver: both trees in turns ----------------------------------------------------
def run_tree(tree: Path, args: argparse.Namespace, target: str, compile_mode: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--target", target]
    command += ["--contexts", *map(str, args.contexts), "--sessions", str(args.sessions)]
    command += ["--draft-tokens", str(args.draft_tokens), "--rounds", str(args.rounds)]
    command += ["--threads", str(args.threads), "--compile", compile_mode, "--device", args.device]
    command += ["--accepted", *map(str, args.accepted), "--attention", args.attention]
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tree)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        sys.exit(f"the worker for {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def unpack(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="dispatch, gemma, or a .gguf file / model folder")
    parser.add_argument("--contexts", type=int, nargs="+", default=[50, 2000])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--draft-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the runner's device)")
    parser.add_argument("--compile", default="on", help="this tree's --compile: off, auto, on, or several (off,on)")
    parser.add_argument(
        "--attention",
        default="auto",
        help="both trees' attention: auto (each times the kernel at start: on a loaded machine the trees may "
        "choose differently), kernel or reference (SDPA over views: the same in both), flex (this tree; a tree "
        "from before the backends takes auto)",
    )
    parser.add_argument("--base", default="7ade0de", help="the commit to compare against ('' for none)")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument(
        "--accepted",
        type=int,
        nargs="+",
        default=[0],
        help="draft tokens the target accepts: each draft starts with this many of the target's own next tokens",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as scratch:
        target = resolve_target(args.target, Path(tempfile.gettempdir()) / "specedge-bench-targets")
        trees = {f"this tree (--compile {mode})": (REPO, mode) for mode in args.compile.split(",")}
        if args.base:
            trees = {f"{args.base} (eager)": (unpack(args.base, Path(scratch)), "off")} | trees
        best: dict[str, dict] = {}
        for _ in range(args.turns):
            for name, (tree, mode) in trees.items():
                figures = run_tree(tree, args, target, mode)
                for context, row in figures.items():
                    kept = best.setdefault(name, {}).get(context)
                    if kept is None or row["median_ms"] < kept["median_ms"]:
                        best[name][context] = row
        report(best, args, target)


def report(best: dict[str, dict], args: argparse.Namespace, target: str) -> None:
    print(
        f"target {Path(target).name}, {args.sessions} sessions per pass, chain drafts of {args.draft_tokens}, "
        f"{args.device}, {args.threads} torch thread(s); device ms per verify (median of {args.rounds} passes, best of {args.turns} turns)"
    )
    names = list(best)
    base = names[0] if args.base else None
    ratios = [f"{base[:8]}/{name.split('(')[-1].rstrip(')')}" for name in names[1:]] if base else []
    print(f"{'context':>8} " + " ".join(f"{name:>28}" for name in names) + " " + " ".join(f"{r:>22}" for r in ratios))
    figures = [("median_ms", "device time, ms per verify"), ("cpu_median_ms", "the process's CPU time, ms per verify")]
    # The host-side parts of a pass, where every tree's runner has them.
    parts = [
        ("layout_pass_ms", "laying a pass out (_batch), host ms per pass (included in the device time)"),
        ("choices_pass_ms", "the choices (_choices), host ms per pass (included in the device time)"),
    ]
    figures += [part for part in parts if all(part[0] in row for rows in best.values() for row in rows.values())]
    for figure, label in figures:
        print(f"-- {label}")
        for context in [key(c, a, args) for c in args.contexts for a in args.accepted]:
            cells = [best[name][context][figure] for name in names]
            shown = [f"{cells[0] / cell:.2f}x" for cell in cells[1:]] if base else []
            print(
                f"{context:>8} "
                + " ".join(f"{cell:>28.3f}" for cell in cells)
                + " "
                + " ".join(f"{r:>22}" for r in shown)
            )
    print("JSON " + json.dumps({"target": Path(target).name, "args": vars(args), "figures": best}))


if __name__ == "__main__":
    main()

"""A tensor-parallel target on this machine: two gloo ranks (one core each) against one process.

    .venv/bin/python benchmarks/tensor_parallel.py --target GGUF_OR_FOLDER [--cache-dir DIR] [--tokens 24] [--json OUT]

The target alone (transformers, float32, full recomputation) decodes three prompts, two greedy
and one seeded; then the same replies go through verify passes of all three sessions at once,
with drafts of the target's own tokens of varying length, a wrong one now and then, and every
third round a tree for the first of the three: once through `engine.tensor_parallel` (two rank
processes, spawned, one thread each) and once through one `ModelRunner` (one thread, as a CPU
hub's verify passes run). Prints whether each equals the target alone, each rank's parameter
bytes against the whole target's, and the verify passes' median time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPTS = ["def fibonacci(n):", "The capital of France is", "Once upon a time, in a small village,"]
SAMPLED = {2: (0.8, 7)}  # the third prompt samples: temperature, seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    from specedge_common.net import free_port

    prompts = _tokenized(args.target)
    started = time.perf_counter()
    expected = _target_alone(args.target, args.cache_dir, prompts, args.tokens)
    print(f"target alone: {len(prompts)} replies of {args.tokens} tokens in {time.perf_counter() - started:.0f} s")
    out = Path(f"/tmp/tensor-parallel-{free_port()}")
    out.mkdir()
    where = (str(out / "group-store"), args.target, str(args.cache_dir or ""), prompts, expected, str(out))
    mp.start_processes(_rank, args=where, nprocs=2, start_method="spawn", join=True)
    ranks = [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]
    single = _played(_runner(args.target, args.cache_dir), prompts, expected)
    result = {"target": args.target, "tokens": args.tokens, "ranks": ranks, "one_process": single}
    _print(result, expected)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def _tokenized(target: str) -> list[list[int]]:
    from specedge_cli.drafting.engine import DraftEngine

    if not Path(target).is_file():
        raise SystemExit("--target: a .gguf file (its llama.cpp tokenizer writes the prompts)")
    engine = DraftEngine(Path(target), n_ctx=256, n_threads=1)
    return [engine.vocab.tokenize(prompt, add_bos=True) for prompt in PROMPTS]


def _target_alone(target: str, cache_dir: Path | None, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    import torch

    from hub_server.config import default_cache_dir
    from hub_server.engine.loading import load_target
    from hub_server.engine.sampling import sample_row
    from hub_server.tree import position_uniform

    model = load_target(Path(target), "cpu", torch.float32, cache_dir or default_cache_dir())
    replies = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            temperature, seed = SAMPLED.get(i, (0.0, 0))
            context = list(prompt)
            for _ in range(tokens):
                logits = model(input_ids=torch.tensor([context])).logits[0, -1].float()
                if temperature:
                    context.append(sample_row(logits, temperature, position_uniform(seed, len(context))))
                else:
                    context.append(int(logits.argmax()))
            replies.append(context[len(prompt) :])
    return replies


def _settings(target: str, cache_dir: Path | None):
    from hub_server.config import HubSettings

    return HubSettings(model=target, device="cpu", threads=1, max_sessions=8, cache_dir=cache_dir)


def _runner(target: str, cache_dir: Path | None):
    import torch

    from hub_server.engine.runner import ModelRunner

    torch.set_num_threads(1)
    return ModelRunner(_settings(target, cache_dir))


def _rank(rank: int, store: str, target: str, cache_dir: str, prompts, expected, out: str) -> None:
    import torch

    from hub_server.engine.tensor_parallel import ShardedRunner, ShardGroup

    torch.set_num_threads(1)
    group = ShardGroup.join(Path(store), rank, 2, "cpu", "cpu")
    runner = ShardedRunner(_settings(target, Path(cache_dir) if cache_dir else None), group)
    report: dict = {"layer_bytes": runner.layer_bytes, "weight_bytes": runner.weight_bytes}
    if rank == 0:
        report |= _played(runner, prompts, expected)
        runner.finish()
    else:
        runner.follow()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(report))
    group.close()


def _played(runner, prompts: list[list[int]], expected: list[list[int]]) -> dict:
    """Every session's reply through batched verify passes; the passes' device seconds."""
    from hub_server.engine.tensor_parallel import parameter_bytes

    contexts = [list(prompt) for prompt in prompts]
    slots = [runner.new_kv() for _ in prompts]
    emitted: list[list[int]] = [[] for _ in prompts]
    seconds = []
    tokens = len(expected[0])
    for round_number in range(4 * tokens):
        live = [i for i in range(len(prompts)) if len(emitted[i]) < tokens]
        if not live:
            break
        jobs = [_job(i, round_number, slots[i], contexts[i], expected[i][len(emitted[i]) :]) for i in live]
        seconds.append(runner.verify_batch(jobs))
        for i, job in zip(live, jobs):
            contexts[i] += job.emitted
            emitted[i] += job.emitted
    held = {"bytes_here": parameter_bytes(runner.model), "layer_bytes_here": parameter_bytes(runner.model.model.layers)}
    return {"replies": [reply[:tokens] for reply in emitted], "pass_seconds": seconds} | held


def _job(i: int, round_number: int, kv, context: list[int], truth: list[int]):
    from hub_server.engine_api import VerifyJob
    from hub_server.tree import chain_parents

    temperature, seed = SAMPLED.get(i, (0.0, 0))
    pending = context[kv.length :]
    if i == 0 and round_number % 3 == 2 and len(truth) >= 3:
        wrong = [
            _other(token) for token in truth
        ]  # root -> wrong ; root -> truth0 -> wrong ; truth0 -> truth1 -> truth2
        tokens, parents = [wrong[0], truth[0], wrong[1], truth[1], truth[2]], [-1, -1, 1, 1, 3]
        return VerifyJob(kv, pending, tokens, parents, temperature, seed, frozenset())
    draft = list(truth[: 1 + (i + round_number) % 6])
    if round_number % 3 == i % 3 and draft:
        draft[-1] = _other(draft[-1])
    return VerifyJob(kv, pending, draft, chain_parents(len(draft)), temperature, seed, frozenset())


def _other(token: int) -> int:
    """Another token id, within the vocabulary."""
    return token - 1 if token > 1 else token + 1


def _print(result: dict, expected: list[list[int]]) -> None:
    ranks, single = result["ranks"], result["one_process"]
    print(f"two ranks equal the target alone: {ranks[0]['replies'] == expected}")
    print(f"one process equals the target alone: {single['replies'] == expected}")
    layers, whole = single["layer_bytes_here"], single["bytes_here"]
    for rank, report in enumerate(ranks):
        print(
            f"rank {rank}: decoder layers {report['layer_bytes'] / 1e6:.1f} of {layers / 1e6:.1f} MB "
            f"({report['layer_bytes'] / layers:.0%}), all weights {report['weight_bytes'] / 1e6:.1f} of {whole / 1e6:.1f} MB"
        )
    for name, seconds in (("two ranks", ranks[0]["pass_seconds"]), ("one process", single["pass_seconds"])):
        print(f"{name}: {len(seconds)} verify passes, median {1000 * statistics.median(seconds):.1f} ms")


if __name__ == "__main__":
    main()

"""A tensor-parallel target over two gloo ranks on the CPU, driven directly (no Ray, no hub):
each rank holds half of every layer's heads, KV memory and MLP, and the replies equal the target
decoding alone, greedy and seeded, chains and trees, batched over several sessions.

Each rank is a process of its own (`torch.multiprocessing`, spawned), joined by a real gloo
group: rank 0 plays the sessions through its runner and rank 1 follows its passes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hub_server.config import HubSettings
from hub_server.engine.cpu.products import onednn_available
from hub_server.engine.tensor_parallel import ShardedRunner, ShardGroup, plan_shards
from hub_server.engine_api import VerifyJob
from hub_server.tree import chain_parents
from tests.conftest import ATTENTION, plain_target
from tests.tiny_models import build_tiny_gemma

WORLD = 2
TOKENS = 24  # tokens each session decodes
# Contexts of 1, 2 and 4 blocks: the last one is fed in a pass of its own first.
CONTEXTS = [[1, 40, 41, 42], [1, 7] * 11, [1] + [(5 * i) % 400 + 20 for i in range(60)]]
SAMPLED = {2: (1.0, 9)}  # session 2 samples: temperature, seed; the others are greedy


@pytest.fixture(scope="module")
def gemma_one_kv_head(tiny, tmp_path_factory) -> Path:
    """A random Gemma 3 with one key/value head (as Gemma 3 270M) and a sliding window of 8: each
    rank keeps a copy of the kv head, and contexts pass the window."""
    return build_tiny_gemma(tmp_path_factory.mktemp("gemma-one-kv"), tiny.hf_dir, kv_heads=1, seed=7)


@pytest.fixture(params=["llama", "gemma-one-kv-head"])
def target_folder(request, tiny, gemma_one_kv_head) -> Path:
    return tiny.hf_dir if request.param == "llama" else gemma_one_kv_head


def test_the_shard_layout_splits_heads_and_columns_and_copies_too_few_kv_heads():
    from transformers import Gemma3TextConfig, LlamaConfig

    llama = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    assert [(s.query_heads, s.kv_heads, s.mlp_columns) for s in (plan_shards(llama, r, 2) for r in (0, 1))] == [
        ((0, 2), (0, 1), (0, 64)),
        ((2, 4), (1, 2), (64, 128)),
    ]
    gemma = Gemma3TextConfig(hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1)
    four = [plan_shards(gemma, rank, 4) for rank in range(4)]
    assert [s.kv_heads for s in four] == [(0, 1)] * 4 and all(s.kv_copied for s in four)
    assert "a copy on each of 4 ranks" in four[3].describe() and "query heads 3 of 4" in four[3].describe()
    qwen = LlamaConfig(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2)
    assert [plan_shards(qwen, rank, 2).kv_heads for rank in (0, 1)] == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="does not split this target evenly"):
        plan_shards(qwen, 0, 8)  # 12 query heads over 8 ranks


def test_settings_make_workers_of_n_devices_and_refuse_what_does_not_combine():
    four = HubSettings(model="m", devices=("cuda:0", "cuda:1", "cuda:2", "cuda:3"), tensor_parallel=2)
    assert four.worker_devices == ("cuda:0", "cuda:2") and len(four.rank_devices) == 4 and not four.in_process
    one = HubSettings(model="m", device="cpu", tensor_parallel=2)
    assert one.worker_devices == ("cpu",) and one.rank_devices == ("cpu", "cpu") and not one.in_process
    for wrong, says in (
        ({"devices": ("cuda:0", "cuda:1", "cuda:2")}, "do not make workers"),
        ({"devices": ("cpu", "cuda:0")}, "all cpu or all cuda"),
        ({"compile": "on"}, "--compile on does not combine"),
        ({"tensor_parallel": 0}, "at least 1"),
    ):
        with pytest.raises(ValueError, match=says):
            HubSettings(model="m", **{"tensor_parallel": 2, **wrong})


def test_two_gloo_ranks_hold_half_of_each_layer_and_verify_like_the_target_alone(target_folder, tmp_path):
    alone = plain_target(target_folder)
    expected = [
        alone.decode(context, TOKENS, temperature=SAMPLED.get(i, (0.0, 0))[0], seed=SAMPLED.get(i, (0.0, 0))[1])
        for i, context in enumerate(CONTEXTS)
    ]
    mp.start_processes(
        _rank,
        args=(str(tmp_path / "group-store"), str(target_folder), expected, str(tmp_path)),
        nprocs=WORLD,
        start_method="spawn",
        join=True,
    )
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(WORLD)]
    assert reports[0]["replies"] == expected
    assert reports[0]["tree_paths"] and all(path for path in reports[0]["tree_paths"])  # trees, some nodes moved
    whole = plain_target(target_folder).model
    whole_layers = sum(p.numel() * p.element_size() for p in whole.model.layers.parameters())
    kv_heads = whole.config.num_key_value_heads
    for report in reports:
        # Half of the linear layers (the norms whole; a copied kv head counts on each rank).
        assert 0.45 * whole_layers < report["layer_bytes"] < 0.56 * whole_layers, (report, whole_layers)
        assert report["kv_heads"] == max(kv_heads // WORLD, 1)
        assert report["devices"] == ["cpu", "cpu"]


# --- the ranks' processes ----------------------------------------------------------------------------


def _rank(rank: int, store: str, folder: str, expected: list[list[int]], out: str) -> None:
    """One rank: rank 0 decodes every session, rank 1 follows; each writes what it holds."""
    torch.set_num_threads(1)
    group = ShardGroup.join(Path(store), rank, WORLD, "cpu", "cpu")
    products = "onednn" if onednn_available() else "mkl"
    settings = HubSettings(
        model=folder, device="cpu", threads=1, max_draft_tokens=16, cpu_matmul=products, attention=ATTENTION
    )
    runner = ShardedRunner(settings, group)
    report = {"layer_bytes": runner.layer_bytes, "kv_heads": runner.pool.shape.heads, "devices": list(runner.devices)}
    if rank == 0:
        report.update(_decode(runner, expected))
        runner.finish()
    else:
        runner.follow()
    Path(out, f"rank-{rank}.json").write_text(json.dumps(report))
    group.close()


def _decode(runner: ShardedRunner, expected: list[list[int]]) -> dict:
    """Every session decodes TOKENS tokens in batched rounds: drafts of the target's own tokens of
    varying length with a wrong one now and then; every third round session 0 sends a tree whose
    right branch is not its first. Returns what each emitted and the trees' accepted paths."""
    contexts = [list(context) for context in CONTEXTS]
    slots = [runner.new_kv() for _ in contexts]
    emitted: list[list[int]] = [[] for _ in contexts]
    tree_paths = []
    for round_number in range(4 * TOKENS):
        live = [i for i in range(len(contexts)) if len(emitted[i]) < TOKENS]
        if not live:
            break
        jobs = [_job(i, round_number, slots[i], contexts[i], expected[i][len(emitted[i]) :]) for i in live]
        runner.verify_batch(jobs)
        for i, job in zip(live, jobs):
            contexts[i] += job.emitted
            emitted[i] += job.emitted
            if len(job.parents) > 1 and job.parents[1] == -1:  # a tree
                tree_paths.append(job.path)
    return {"replies": [tokens[:TOKENS] for tokens in emitted], "tree_paths": tree_paths}


def _job(i: int, round_number: int, kv, context: list[int], truth: list[int]) -> VerifyJob:
    temperature, seed = SAMPLED.get(i, (0.0, 0))
    pending = context[kv.length :]
    if i == 0 and round_number % 3 == 2 and len(truth) >= 3:
        # root -> wrong ; root -> truth0 -> wrong ; truth0 -> truth1 -> truth2
        wrong = [(token + 3) % 512 for token in truth]
        tokens, parents = [wrong[0], truth[0], wrong[1], truth[1], truth[2]], [-1, -1, 1, 1, 3]
        return VerifyJob(kv, pending, tokens, parents, temperature, seed, frozenset())
    draft = list(truth[: 1 + (i + round_number) % 4])
    if round_number % 3 == i % 3 and draft:
        draft[-1] = (draft[-1] + 1) % 512
    return VerifyJob(kv, pending, draft, chain_parents(len(draft)), temperature, seed, frozenset())

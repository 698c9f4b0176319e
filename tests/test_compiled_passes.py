"""Compiled fixed-shape passes (`--compile on`) against eager ones and the target alone.

Small buckets only (up to 2 sessions, drafts up to 7 tokens: one width), so the compile at start
stays within a CI budget; the tiny Llama (full attention) and the tiny Gemma 3 with an 8-token
window (sliding layers whose ring the contexts pass) both run, each compiled two ways: through
the attention operator (the suite's backend; on a CPU into AOTInductor packages) and through
FlexAttention (the whole decoder one graph, over each bucket's buffers). Both models compile into
one cache directory: each compiles its own packages, and a second start of either loads them all.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from hub_server.config import HubSettings
from hub_server.engine.pass_packages import PassDecoder, PassPackages, pass_key
from hub_server.engine.rotary import rotary_table, tabled
from hub_server.engine.runner import ModelRunner, VerifyJob, coarse
from hub_server.engine.saved_passes import SAVED_SUFFIX, SavedPasses, prune_other_keys
from hub_server.tree import chain_parents
from tests.conftest import ATTENTION, DEVICE, plain_target
from tests.test_runner import CONTEXTS, gemma_dir  # noqa: F401  (a fixture)

MAX_DRAFT = 7  # rows of 8: one width bucket


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compile-cache")


# Compiled through the operator (the suite's backend: AOTInductor packages on a CPU) and through
# FlexAttention (the whole decoder one graph).
COMPILED_ATTENTIONS = (ATTENTION if DEVICE == "cpu" else "reference", "flex")


@pytest.fixture(
    scope="module", params=[(m, a) for m in ("llama", "gemma-sliding") for a in COMPILED_ATTENTIONS], ids="-".join
)
def runner_settings(request, tiny, gemma_dir, compile_cache):  # noqa: F811
    model, attention = request.param
    folder = str(tiny.hf_dir if model == "llama" else gemma_dir)
    settings = {"model": folder, "device": DEVICE, "max_batch": 2, "max_draft_tokens": MAX_DRAFT, "max_sessions": 8}
    settings["kv_memory_gib"] = 0.1  # one pool size for every start (flex's saved passes are for one)
    return {**settings, "attention": attention, "cache_dir": compile_cache}


@pytest.fixture(scope="module")
def runners(runner_settings):
    eager = ModelRunner(HubSettings(**runner_settings, compile="off"))
    before = graphs_compiled()
    compiled = ModelRunner(HubSettings(**runner_settings, compile="on"))
    GRAPHS_AT_START[id(compiled)] = graphs_compiled()
    if compiled.attention.name == "flex":  # one graph a bucket, torch.compile's, and nothing else
        assert GRAPHS_AT_START[id(compiled)] - before == len(compiled.batch_buckets) * len(compiled.width_buckets)
    return eager, compiled, plain_target(runner_settings["model"], DEVICE)


GRAPHS_AT_START: dict[int, int] = {}  # by compiled runner: the graphs compiled once it started


def graphs_compiled() -> int:
    """The graphs compiled in this process so far (AOTAutograd's count: every graph torch.compile
    lowers passes through it; eager FlexAttention's own tracing does not)."""
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["total"]


def decode(runner: ModelRunner, contexts, drafts_of, rounds: int, temperature: float = 0.0):
    """Decode every context through batched verifies of the drafts `drafts_of(i, round, generated)`
    gives; returns what each session emitted, round by round."""
    slots = [runner.new_kv() for _ in contexts]
    contexts = [list(c) for c in contexts]
    emitted = [[] for _ in contexts]
    try:
        for slot, context in zip(slots, contexts):
            runner.prefill(slot, context)
        for round_number in range(rounds):
            jobs = []
            for i, (slot, context) in enumerate(zip(slots, contexts)):
                draft, parents = drafts_of(i, round_number, emitted[i])
                jobs.append(VerifyJob(slot, context[slot.length :], draft, parents, temperature, 7 + i, frozenset()))
            runner.verify_batch(jobs)
            for i, job in enumerate(jobs):
                contexts[i].extend(job.emitted)
                emitted[i].append(job.emitted)
    finally:
        for slot in slots:
            runner.release(slot)
    return emitted


def test_compiled_and_eager_passes_emit_the_same_tokens(runners):
    """Greedy and seeded, chains and trees, two sessions batched and one alone."""
    eager, compiled, target_alone = runners
    expected = [target_alone.decode(c, 40) for c in CONTEXTS[:2]]

    def drafts(i, round_number, emitted):
        done = sum(len(e) for e in emitted)
        truth = expected[i][done : done + 4]
        if round_number % 3 == 2 and len(truth) >= 2:  # a tree: a wrong first branch, then the truth
            return [(truth[0] + 1) % 512, *truth[:3]], [-1, -1, 1, 2][: 1 + len(truth[:3])]
        draft = list(truth)
        if round_number % 2 and draft:
            draft[-1] = (draft[-1] + 5) % 512  # a rejection now and then
        return draft, chain_parents(len(draft))

    for contexts in (CONTEXTS[:2], CONTEXTS[:1]):
        got_eager = decode(eager, contexts, drafts, rounds=8)
        got_compiled = decode(compiled, contexts, drafts, rounds=8)
        assert got_compiled == got_eager
        for i, rounds in enumerate(got_compiled):
            flat = [token for reply in rounds for token in reply]
            assert flat == expected[i][: len(flat)]
    seeded = decode(compiled, CONTEXTS[:2], lambda i, r, e: ([], []), rounds=6, temperature=1.0)
    assert seeded == decode(eager, CONTEXTS[:2], lambda i, r, e: ([], []), rounds=6, temperature=1.0)
    for i, context in enumerate(CONTEXTS[:2]):
        assert [reply[0] for reply in seeded[i]] == target_alone.decode(context, 6, temperature=1.0, seed=7 + i)
    assert compiled.compiled_hits > 0 and compiled.compiled_misses == 0
    if compiled.attention.name == "kernel":  # the CPU kernel reads the blocks in place, eager or compiled
        assert compiled.past_kv_bytes_copied == 0 and eager.past_kv_bytes_copied == 0


def test_compiled_buckets_are_the_powers_of_two_up_to_the_limits(runners):
    _, compiled, _ = runners
    assert compiled.batch_buckets == [1, 2] and compiled.width_buckets == [MAX_DRAFT + 1]
    assert compiled.compiled_shapes >= {(1, MAX_DRAFT + 1), (2, MAX_DRAFT + 1)}


def test_the_rotary_table_gives_the_models_own_cosines_and_sines(runners):
    """Compiled passes read the rotary embedding from a table (rotary.py): at any positions it
    equals what the model's own module computes, for each layer kind; a type whose frequencies
    move with the context is not tabled."""
    eager, _, _ = runners
    decoder = eager.model.model
    table = rotary_table(decoder, 300, eager.model.dtype)
    assert table is not None
    device = eager.model.device
    positions = torch.tensor([[0, 5, 299, 17], [298, 3, 64, 1]], device=device)
    probe = torch.zeros(1, dtype=eager.model.dtype, device=device)
    kinds = list(table.kinds)
    for kind in kinds:
        args = (probe, positions) if kind is None else (probe, positions, kind)
        with torch.inference_mode():
            own, tabled_ = decoder.rotary_emb(*args), table(*args)
        for a, b in zip(own, tabled_):
            assert a.shape == b.shape and torch.equal(a, b)
    with tabled(decoder, table):
        assert decoder.rotary_emb is table
    assert decoder.rotary_emb is not table
    if kinds == [None]:  # Llama: one rotary type
        own_type = decoder.rotary_emb.rope_type
        decoder.rotary_emb.rope_type = "dynamic"
        try:
            assert rotary_table(decoder, 300, eager.model.dtype) is None
        finally:
            decoder.rotary_emb.rope_type = own_type


def test_a_second_start_loads_every_bucket_from_the_cache(runners, runner_settings, caplog):
    """The first start compiled every bucket (the other model's passes in the same cache were
    not its own); a second start with the same cache loads them all, compiles nothing, says so,
    and its passes emit what the eager ones do."""
    eager, compiled, _ = runners
    assert compiled.passes_from_cache == 0
    before = graphs_compiled()
    with caplog.at_level(logging.INFO, logger="hub_server"):
        again = ModelRunner(HubSettings(**runner_settings, compile="on"))
    assert again.passes_from_cache == len(again.batch_buckets) * len(again.width_buckets) == 2
    assert "compiled passes: 2 buckets loaded from the cache" in caplog.text
    assert graphs_compiled() == before

    def drafts(i, round_number, emitted):
        return [(7 * round_number + i) % 512, 3], chain_parents(2)

    assert decode(again, CONTEXTS[:2], drafts, rounds=4) == decode(eager, CONTEXTS[:2], drafts, rounds=4)
    assert again.compiled_hits > 0 and again.compiled_misses == 0


def test_a_pass_under_another_key_or_unreadable_is_not_served(runners, compile_cache, tmp_path, caplog):
    """A compiled pass (an AOTInductor package, or torch.compile's saved whole) of another key or
    damaged is refused, said in the log, and compiled again instead."""
    _, compiled, _ = runners
    with caplog.at_level(logging.WARNING, logger="hub_server"):
        if compiled.attention.name == "flex" or DEVICE != "cpu":
            found = next((compile_cache / "torch-compile" / "saved-passes").glob(f"*/*{SAVED_SUFFIX}"))
            others = SavedPasses(tmp_path, ModelRunner._decode, {}, facts=["another model"])
            damaged = tmp_path / f"1x8{SAVED_SUFFIX}"
            damaged.write_bytes(others.key.encode() + b"\nnot a pass")
        else:
            found = next((compile_cache / "torch-compile" / "passes").glob("*/*.pt2"))
            decoder = PassDecoder(compiled.model.model, compiled.model.model.get_input_embeddings(), None)
            others = PassPackages(tmp_path, decoder, threads=3, options={})
            damaged = tmp_path / "1x8.pt2"
            damaged.write_bytes(b"not a package")
        refused = [others.load(found), others.load(damaged)]
    assert found.exists() and refused == [None, None]
    assert "compiled under another key" in caplog.text and "does not load" in caplog.text


def test_the_gpus_route_through_the_operator_saves_its_passes_whole_on_the_cpu_too(tiny, tmp_path, monkeypatch):
    """A GPU's passes through the attention operator are torch.compile's saved whole, as
    FlexAttention's are on any device. The same route on the CPU (CUDA graphs aside) emits what
    the target alone does, and a second start loads every bucket instead of compiling."""
    monkeypatch.setattr(ModelRunner, "_packaged_decoder", ModelRunner._saved_decoder)  # the CPU's own route
    settings = {"model": str(tiny.hf_dir), "device": "cpu", "max_batch": 2, "max_draft_tokens": MAX_DRAFT}
    settings |= {
        "max_sessions": 8,
        "attention": "reference",
        "cache_dir": tmp_path,
        "compile": "on",
        "kv_memory_gib": 0.1,
    }
    first = ModelRunner(HubSettings(**settings))
    before = graphs_compiled()
    again = ModelRunner(HubSettings(**settings))
    assert (first.passes_from_cache, again.passes_from_cache, graphs_compiled() - before) == (0, 2, 0)
    assert len(list((tmp_path / "torch-compile").glob(f"*/*/*{SAVED_SUFFIX}"))) == 2
    expected = [plain_target(tiny.hf_dir).decode(context, 30) for context in CONTEXTS[:2]]

    def drafts(i, round_number, emitted):
        done = sum(len(e) for e in emitted)
        draft = list(expected[i][done : done + 3])
        if round_number % 2 and draft:
            draft[-1] = (draft[-1] + 5) % 512  # a rejection now and then
        return draft, chain_parents(len(draft))

    for runner in (first, again):
        for i, rounds in enumerate(decode(runner, CONTEXTS[:2], drafts, rounds=6)):
            flat = [token for reply in rounds for token in reply]
            assert flat == expected[i][: len(flat)]
        assert runner.compiled_hits > 0 and runner.compiled_misses == 0


def test_a_pass_that_cannot_be_saved_still_serves_and_says_a_restart_compiles_it(tmp_path, caplog):
    """A step whose graph reaches a module through a closure (nothing the runner's steps do) does
    not serialise: the pass compiled at start serves all the same, and the log says so."""
    layer = torch.nn.Linear(4, 4)

    def step(x):
        return layer(x).relu()

    with caplog.at_level(logging.WARNING, logger="hub_server"):
        compiled, loaded = SavedPasses(tmp_path, step, {}, facts=["a closure"]).load_or_compile(
            1, 4, (torch.ones(1, 4),)
        )
    x = torch.randn(1, 4)
    assert not loaded and torch.allclose(compiled(x), step(x))
    assert "cannot be saved" in caplog.text and not list(tmp_path.rglob(f"*{SAVED_SUFFIX}"))


def test_a_cache_keeps_the_compiled_passes_of_the_keys_used_most_recently(tmp_path):
    """Every engine upgrade and every model compiles under a key of its own: a start marks its
    key used and deletes all but the four used most recently beside it."""
    root = tmp_path / "saved-passes"
    keys = [root / f"key{i}" for i in range(6)]
    for age, key in enumerate(reversed(keys)):  # key5 the oldest ... key0 the newest
        key.mkdir(parents=True)
        (key / f"1x8{SAVED_SUFFIX}").write_bytes(b"a pass")
        os.utime(key, (1_000_000 + age, 1_000_000 + age))
    removed = prune_other_keys(keys[5])  # the oldest, started again: now the newest
    assert sorted(removed) == [keys[3], keys[4]]
    assert sorted(root.iterdir()) == [keys[0], keys[1], keys[2], keys[5]]
    assert prune_other_keys(tmp_path / "never-saved") == []


def test_an_automatic_kv_budget_is_coarse_so_that_a_restart_finds_its_pool_size_again():
    """The free memory an automatic budget reads moves a little between starts; the budget keeps
    five significant bits, so a restart usually gets the same pool (and FlexAttention's saved
    passes, compiled for one pool size) while giving up at most 1/16 of the memory."""
    gib = 2**30
    for budget in (5 * gib + 12_345_678, 2 * gib - 1, 700 * 2**20, 45 * gib + 3):
        assert budget * 15 / 16 < coarse(budget) <= budget
    assert len({coarse(5 * gib + drift * 2**20) for drift in range(0, 100, 7)}) == 1  # ~100 MiB of drift


def test_the_package_key_names_the_weights_the_options_and_torch(monkeypatch):
    """Another model, other compile options or another torch never load a package compiled
    before: each gives another key."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    options = {"freezing": True, "cpp.threads": 1}
    key = pass_key(module, options)
    assert pass_key(module, dict(options)) == key
    assert pass_key(module, {**options, "cpp.threads": 2}) != key
    with torch.no_grad():
        module[0].weight[1, 2] += 1e-6
    changed = pass_key(module, options)
    assert changed != key
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert pass_key(module, options) != changed


def test_flex_passes_compile_once_per_bucket_as_sessions_come_go_and_grow(runners):
    """200 passes through FlexAttention's compiled buckets (after the other tests' passes):
    sessions opening and closing, their contexts growing across blocks (and past the sliding
    window), chains and trees, one session or two a pass. The decoder was compiled once per
    bucket at start; it never compiles again, and nothing breaks its graph (torch._dynamo's
    counts)."""
    import random

    from torch._dynamo.utils import counters

    _, compiled, _ = runners
    if compiled.attention.name != "flex":
        pytest.skip("the operator's compiled passes are one graph between attention calls, not one graph")
    rng = random.Random(3)
    breaks = sum(counters["graph_break"].values())
    hits, opened = compiled.compiled_hits, []
    contexts: dict[int, list[int]] = {}
    for round_number in range(200):
        if len(opened) < 2 or (rng.random() < 0.1 and len(opened) < 4):
            kv = compiled.new_kv()
            contexts[id(kv)] = [1] + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 40))]
            compiled.prefill(kv, contexts[id(kv)])
            opened.append(kv)
        if rng.random() < 0.05:  # a session closes
            gone = opened.pop(rng.randrange(len(opened)))
            compiled.release(gone)
        jobs = []
        for kv in rng.sample(opened, min(len(opened), rng.choice([1, 2]))):
            size = rng.randrange(0, MAX_DRAFT + 1)
            tree = [rng.randrange(-1, i) for i in range(size)] if round_number % 2 else chain_parents(size)
            draft = [rng.randrange(3, 500) for _ in range(size)]
            context = contexts[id(kv)]
            jobs.append(VerifyJob(kv, context[kv.length :], draft, tree, 0.0, 0, frozenset()))
        compiled.verify_batch(jobs)
        for verified in jobs:
            contexts[id(verified.kv)] += verified.emitted
    for kv in opened:
        compiled.release(kv)
    assert compiled.compiled_hits - hits == 200 and compiled.compiled_misses == 0
    assert max(len(context) for context in contexts.values()) > 2 * 16  # across blocks
    assert graphs_compiled() == GRAPHS_AT_START[id(compiled)]  # no recompile since start, these passes' or earlier
    assert sum(counters["graph_break"].values()) == breaks == 0

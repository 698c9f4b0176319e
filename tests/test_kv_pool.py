"""The KV pool: planning sessions x context against a memory budget, ring positions, slots,
and the tree masks the runner builds from parents; hand-made inputs, no model."""

from __future__ import annotations

import random

import pytest
import torch

from hub_server.config import HubSettings
from hub_server.engine.kv_pool import GIB, KVBudgetError, KVPlan, KVPool, KVShape, column_positions, plan_kv
from hub_server.engine.sampling import ancestor_masks

# Gemma 3 270M: 18 layers, 1 kv head of 256, a 512-token window on 5 layers of 6; fp32.
GEMMA = KVShape(heads=1, dim=256, element_size=4, windows=tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(18)))
# A 32B target in bf16: 64 full layers, 8 kv heads of 128.
BIG = KVShape(heads=8, dim=128, element_size=2, windows=(0,) * 64)


def test_sliding_layers_hold_only_their_window():
    per_token = 2 * 1 * 256 * 4
    assert GEMMA.capacities(4096)[:6] == [511] * 5 + [4096]
    assert GEMMA.slot_bytes(4096) == per_token * (3 * 4096 + 15 * 511)


def test_an_explicit_context_that_does_not_fit_is_refused_with_what_to_change():
    with pytest.raises(KVBudgetError, match="--max-sessions or --max-context, or raise --kv-memory-gib"):
        plan_kv(
            BIG, slots=16, max_context=8192, model_limit=32768, budget_bytes=12 * GIB, budget_source="--kv-memory-gib"
        )
    plan = plan_kv(
        BIG, slots=8, max_context=4096, model_limit=32768, budget_bytes=10 * GIB, budget_source="--kv-memory-gib"
    )
    assert (plan.slots, plan.max_context) == (8, 4096)


def test_without_a_context_the_longest_that_fits_is_chosen():
    plan = plan_kv(GEMMA, slots=64, max_context=0, model_limit=32768, budget_bytes=5 * GIB, budget_source="auto")
    assert 64 * GEMMA.slot_bytes(plan.max_context) <= 5 * GIB < 64 * GEMMA.slot_bytes(plan.max_context + 256)
    roomy = plan_kv(GEMMA, slots=2, max_context=0, model_limit=32768, budget_bytes=5 * GIB, budget_source="auto")
    assert roomy.max_context == 32768
    with pytest.raises(KVBudgetError, match="lower --max-sessions"):
        plan_kv(BIG, slots=64, max_context=0, model_limit=32768, budget_bytes=7 * GIB, budget_source="auto")


def test_ring_columns_hold_the_latest_positions():
    # Capacity 4: a slot of 6 tokens holds positions 4, 5 in columns 0, 1 and 2, 3 in columns 2, 3.
    positions = column_positions(torch.tensor([6, 2, 0]), capacity=4, width=4)
    assert positions.tolist() == [[4, 5, 2, 3], [0, 1, -1, -1], [-1, -1, -1, -1]]


def test_slots_run_out_and_come_back_empty():
    shape = KVShape(heads=2, dim=4, element_size=4, windows=(0, 3))
    pool = KVPool(shape, KVPlan(2, 8, GIB, "test"), torch.float32, torch.device("cpu"))
    assert pool.reserved_bytes == 2 * shape.slot_bytes(8) and pool.used_bytes == 0
    first, second = pool.take(), pool.take()
    assert pool.take() is None and pool.used_bytes == pool.reserved_bytes
    pool.keys[0][first.index].fill_(float("nan"))
    pool.give_back(first)
    again = pool.take()
    assert again.index == first.index and again.length == 0
    assert not pool.keys[0][again.index].isnan().any()
    pool.give_back(second)


def test_ancestor_masks_of_a_tree_and_a_padded_chain():
    # root -> 0 -> 1, root -> 2 ; then a chain of two padded to the same width.
    masks = ancestor_masks([[-1, 0, -1], [-1, 0]], width=3)
    assert masks[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert masks[1].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # the padding sees itself
    wide = ancestor_masks([list(range(-1, 69))], width=70)  # past one byte of bits
    assert torch.equal(wide[0], torch.tril(torch.ones(70, 70, dtype=torch.bool)))


def test_a_runner_that_cannot_hold_its_sessions_refuses_to_start(tiny):
    from hub_server.engine.runner import ModelRunner

    settings = HubSettings(model=str(tiny.hf_dir), max_sessions=64, max_context=1024, kv_memory_gib=0.001)
    with pytest.raises(KVBudgetError, match="64 sessions x 1024 tokens need"):
        ModelRunner(settings)


def test_ancestor_closure_agrees_with_the_bit_set_masks():
    from hub_server.engine.pool_attention import ancestor_closure

    rows = [[-1, 0, -1, 2, 1], [-1, 0, 1, 2, 3]]
    assert torch.equal(ancestor_closure(torch.tensor(rows)), ancestor_masks(rows, width=5))
    rng = random.Random(3)  # deep chains (a depth past every power of two up to 64) and random trees
    for width in (1, 2, 3, 4, 5, 9, 16, 17, 33, 65):
        rows = [list(range(-1, width - 1)), [rng.randrange(-1, i) for i in range(width)], [-1] * width]
        assert torch.equal(ancestor_closure(torch.tensor(rows)), ancestor_masks(rows, width=width))


def test_a_ring_pass_sees_its_window_and_its_new_tokens_not_what_they_overwrote():
    from hub_server.engine.pool_attention import LayerKind, kind_mask

    # Window 4, ring of 3 + 3 spare columns. 7 tokens held: column c holds position 6 - (6 - c) % 6,
    # so columns 0..5 hold 6, 1, 2, 3, 4, 5. Two new tokens (a chain) land in columns 1 and 2.
    kind = LayerKind(capacity=6, window=4)
    positions = torch.tensor([[7, 8]])
    ancestors = torch.tensor([[[True, False], [True, True]]])
    columns, sees = kind_mask(kind, torch.tensor([7]), torch.tensor([2]), positions, ancestors, width=6)
    assert columns.tolist() == [[1, 2]]
    # Position 7 sees 4, 5, 6 and itself; position 8 sees 5, 6, 7 and itself (never 1, 2 or 3).
    assert sees[0, 0].int().tolist() == [[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 1]]


def test_a_full_attention_mask_is_the_ring_mask_of_a_ring_that_never_wraps():
    from hub_server.engine.pool_attention import LayerKind, ancestor_closure, kind_mask

    rng = random.Random(5)
    for span in (1, 3, 9):
        rows = 4
        sizes = torch.tensor([span - rng.randrange(0, span) if b else span for b in range(rows)])
        lengths = torch.tensor([rng.randrange(0, 40) for _ in range(rows)])
        parents = torch.tensor(
            [[rng.randrange(-1, i) if i < sizes[b] else -1 for i in range(span)] for b in range(rows)]
        )
        ancestors = ancestor_closure(parents)
        positions = lengths[:, None] + ancestors.sum(-1) - 1
        width = int((lengths + sizes).max())
        full = kind_mask(LayerKind(capacity=100, window=0), lengths, sizes, positions, ancestors, width)
        ring = kind_mask(LayerKind(capacity=100, window=10**6), lengths, sizes, positions, ancestors, width)
        real = torch.arange(span)[None, :] < sizes[:, None]
        assert torch.equal(full[0][real], ring[0][real])  # padding tokens' columns are never written
        assert torch.equal(full[1], ring[1])

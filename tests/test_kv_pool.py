"""The KV pool: blocks planned from a memory budget, sessions taking and giving back blocks,
views through block tables, and the tree masks the runner builds from parents; hand-made
inputs, no model."""

from __future__ import annotations

import random

import pytest
import torch

from hub_server.config import HubSettings
from hub_server.engine import kv_pool
from hub_server.engine.kv_pool import BLOCK_TOKENS, GIB, NULL_BLOCK, KVBudgetError, KVPlan, KVPool, KVShape, plan_kv
from hub_server.engine.sampling import ancestor_masks

# Gemma 3 270M: 18 layers, 1 kv head of 256; fp32.
GEMMA = KVShape(heads=1, dim=256, element_size=4, layers=18)
# A 32B target in bf16: 64 layers, 8 kv heads of 128.
BIG = KVShape(heads=8, dim=128, element_size=2, layers=64)


def test_a_budget_holds_blocks_and_a_context_limit_reserves_nothing():
    assert GEMMA.block_bytes == BLOCK_TOKENS * 2 * 256 * 4 * 18
    plan = plan_kv(BIG, 4096, 8192, 32768, 12 * GIB, "--kv-memory-gib", widest_row=128)
    assert plan.blocks == 12 * GIB // BIG.block_bytes and plan.max_sessions == 4096 and plan.max_context == 8192
    assert "blocks of 16 tokens" in plan.describe(BIG)
    assert plan_kv(BIG, 64, 0, 32768, 12 * GIB, "auto", 128).max_context == 32768  # 0: the model's limit
    # A limit the blocks cannot hold is cut to what they hold beside a pass's widest row.
    small = plan_kv(GEMMA, 64, 0, 32768, 64 * GEMMA.block_bytes, "auto", 128)
    assert small.max_context == 63 * BLOCK_TOKENS - 128


def test_a_budget_that_cannot_hold_one_session_is_refused_with_what_to_change():
    with pytest.raises(KVBudgetError, match="raise --kv-memory-gib"):
        plan_kv(BIG, 1, 0, 32768, 20 * BIG.block_bytes, "--kv-memory-gib", widest_row=128)


def small_pool(blocks: int = 9, sessions: int = 3) -> KVPool:
    shape = KVShape(heads=2, dim=4, element_size=4, layers=2)
    return KVPool(shape, KVPlan(blocks, sessions, 64, GIB, "test"), torch.float32, torch.device("cpu"))


def test_sessions_take_blocks_as_they_grow_and_give_them_back():
    pool = small_pool()
    assert pool.usable_blocks == 8 and pool.used_bytes == 0 and pool.reserved_bytes == 9 * pool.shape.block_bytes
    first, second = pool.open(), pool.open()
    assert pool.cover(first, 40) and len(first.blocks) == 3  # 40 tokens: three blocks of 16
    assert NULL_BLOCK not in first.blocks and pool.used_blocks == 3
    assert not pool.cover(second, 6 * BLOCK_TOKENS) and second.blocks == []  # five free: nothing taken
    assert pool.cover(second, 5 * BLOCK_TOKENS) and pool.free_blocks == 0
    first.length = 17  # a pass kept 17 tokens of the 40 it wrote: the third block goes back
    pool.trim(first)
    assert len(first.blocks) == 2 and pool.free_blocks == 1
    pool.close(second)
    assert pool.free_blocks == 6 and second.blocks == [] and second.length == 0
    assert pool.open() is not None and pool.open() is not None and pool.open() is None  # the table: 3 rows
    assert not pool.keys[0][NULL_BLOCK].any() and not pool.values[1][NULL_BLOCK].any()


def test_a_cpu_pool_hands_out_fresh_blocks_as_zeros_without_zeroing_them():
    pool = small_pool(blocks=4)
    kv = pool.open()
    assert kv is not None and pool.cover(kv, 3 * BLOCK_TOKENS)
    assert not any(keys[kv.blocks].any() or values[kv.blocks].any() for keys, values in zip(pool.keys, pool.values))


def test_admission_asks_for_free_blocks_and_fresh_blocks_hold_no_nan(monkeypatch):
    monkeypatch.setattr(kv_pool, "_zeroed_when_touched", lambda device: False)  # torch.empty, as on a GPU
    pool = small_pool(blocks=4)
    for keys in pool.keys:
        keys.fill_(float("nan"))  # what torch.empty may hold
    kv = pool.open(least_blocks=3)
    assert kv is not None and pool.cover(kv, 3 * BLOCK_TOKENS)
    assert not any(keys[kv.blocks].isnan().any() for keys in pool.keys)
    assert pool.open(least_blocks=1) is None  # a free row, but no free block
    pool.close(kv)
    assert pool.open(least_blocks=3) is not None


def test_blocks_held_by_several_sessions_are_counted_as_references_come_and_go():
    pool = small_pool(blocks=9, sessions=4)
    context = list(range(100, 100 + 2 * BLOCK_TOKENS + 3))  # two full blocks and a part
    first = pool.open(scope="acct_a")
    assert pool.cover(first, len(context) - 1)
    first.length = len(context) - 1
    pool.stored(first, context[:-1])
    second, third = pool.open(scope="acct_a"), pool.open(scope="acct_a")
    assert pool.share(second, context) == 2 * BLOCK_TOKENS and pool.shared_blocks == 2
    assert pool.share(third, context) == 2 * BLOCK_TOKENS and pool.shared_blocks == 2  # three holders, two blocks
    third.length = 5  # set back: its two blocks are copied into its own, the first two keep theirs
    pool.settle(third)
    assert pool.shared_blocks == 2 and not set(third.blocks) & set(first.blocks)
    pool.close(second)
    assert pool.shared_blocks == 0 and pool.used_blocks == 5
    pool.close(first)
    assert pool.shared_blocks == 0 and pool.cached_blocks == 2  # still named: a later session may take them


def test_ancestor_masks_of_a_tree_and_a_padded_chain():
    # root -> 0 -> 1, root -> 2 ; then a chain of two padded to the same width.
    masks = ancestor_masks([[-1, 0, -1], [-1, 0]], width=3)
    assert masks[0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert masks[1].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # the padding sees itself
    wide = ancestor_masks([list(range(-1, 69))], width=70)  # past one byte of bits
    assert torch.equal(wide[0], torch.tril(torch.ones(70, 70, dtype=torch.bool)))


def test_a_runner_whose_budget_cannot_hold_one_session_refuses_to_start(tiny):
    from hub_server.engine.runner import ModelRunner

    settings = HubSettings(model=str(tiny.hf_dir), max_sessions=4096, kv_memory_gib=0.00001)
    with pytest.raises(KVBudgetError, match="raise --kv-memory-gib"):
        ModelRunner(settings)


def test_ancestor_closure_agrees_with_the_bit_set_masks():
    from hub_server.engine.attention.metadata import ancestor_closure

    rows = [[-1, 0, -1, 2, 1], [-1, 0, 1, 2, 3]]
    assert torch.equal(ancestor_closure(torch.tensor(rows)), ancestor_masks(rows, width=5))
    rng = random.Random(3)  # deep chains (a depth past every power of two up to 64) and random trees
    for width in (1, 2, 3, 4, 5, 9, 16, 17, 33, 65):
        rows = [list(range(-1, width - 1)), [rng.randrange(-1, i) for i in range(width)], [-1] * width]
        assert torch.equal(ancestor_closure(torch.tensor(rows)), ancestor_masks(rows, width=width))


def test_a_sliding_view_sees_its_window_and_its_new_tokens():
    from hub_server.engine.attention.metadata import view_bias

    # Window 4: 7 tokens stored, two new ones (a chain) at positions 7 and 8. The view starts at
    # position 4, the oldest the first new token sees: columns show 4, 5, 6, then the new 7, 8.
    positions = torch.tensor([[7, 8]])
    ancestors = torch.tensor([[[True, False], [True, True]]])
    bias = view_bias(4, torch.tensor([7]), torch.tensor([4]), torch.tensor([2]), positions, ancestors, width=5)
    # Position 7 sees 4, 5, 6 and itself; position 8 sees 5, 6, 7 and itself.
    assert (bias[0] == 0).int().tolist() == [[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert set(bias.unique().tolist()) == {0.0, float("-inf")}


def test_a_full_attention_mask_is_the_sliding_mask_of_a_window_that_never_ends():
    from hub_server.engine.attention.metadata import ancestor_closure, view_bias

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
        full = view_bias(0, lengths, None, sizes, positions, ancestors, width) == 0
        endless = view_bias(10**6, lengths, torch.zeros_like(lengths), sizes, positions, ancestors, width) == 0
        assert torch.equal(full, endless)
        # Each real query sees its whole past, itself, and no column past its row's tokens.
        for b in range(rows):
            for i in range(int(sizes[b])):
                seen = full[b, i]
                assert seen[: lengths[b]].all() and seen[lengths[b] + i] and not seen[lengths[b] + sizes[b] :].any()


def test_a_view_reads_each_position_through_the_block_table():
    from hub_server.engine.attention.metadata import view_places

    tables = torch.tensor([[5, 2, 0], [7, 0, 0]])
    places = view_places(tables, torch.tensor([14, 0]), torch.tensor([35, 3]), width=5)
    # Row 0 shows positions 14..18: 14, 15 in block 5, then 16..18 in block 2; row 1 three then nothing.
    assert places.tolist() == [[94, 95, 32, 33, 34], [112, 113, 114, NULL_BLOCK, NULL_BLOCK]]


def test_a_view_bias_equals_each_query_seen_one_by_one():
    """Random trees, padded rows, full and sliding views: the bias built for the whole pass at
    once is what each query sees by the rule, one column at a time."""
    from hub_server.engine.attention.metadata import ancestor_closure, view_bias

    rng = random.Random(11)
    for window, span in ((0, 9), (5, 9), (3, 4), (20, 17)):
        rows = 5
        sizes = [span - rng.randrange(0, span) if b else span for b in range(rows)]
        lengths = [rng.randrange(0, 40) for _ in range(rows)]
        parents = torch.tensor(
            [[rng.randrange(-1, i) if i < sizes[b] else -1 for i in range(span)] for b in range(rows)]
        )
        ancestors = ancestor_closure(parents)
        positions = torch.tensor(lengths)[:, None] + ancestors.sum(-1) - 1
        starts = [max(0, length - window + 1) if window else 0 for length in lengths]
        width = max(length - start + size for length, start, size in zip(lengths, starts, sizes))
        bias = view_bias(
            window, torch.tensor(lengths), torch.tensor(starts) if window else None,
            torch.tensor(sizes), positions, ancestors, width,
        )  # fmt: skip
        for b in range(rows):
            for i in range(span):
                for c in range(width):
                    stored, query = starts[b] + c, int(positions[b, i])
                    if stored < lengths[b]:
                        sees = not window or query - stored < window
                    else:
                        j = stored - lengths[b]
                        sees = j < sizes[b] and bool(ancestors[b, i, j])
                        sees = sees and (not window or query - int(positions[b, j]) < window)
                    sees = sees or (i >= sizes[b] and c == 0)
                    assert float(bias[b, i, c]) == (0.0 if sees else float("-inf")), (window, b, i, c)

"""The llama.cpp draft engine: chains, trees, and KV reuse across rounds."""

from __future__ import annotations

import copy

import pytest

from hub_server.tree import tree_problem
from specedge_cli.drafting.draft_tree import DraftShape
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.drafting.sampling import Calibration


@pytest.fixture(scope="module")
def engines(tiny):
    return DraftEngine(tiny.gguf_f32, n_ctx=512, n_threads=1), DraftEngine(tiny.gguf_f32, n_ctx=512, n_threads=1)


def test_tree_is_valid_within_budget_and_contains_the_greedy_first_token(engines):
    engine, fresh = engines
    history = engine.vocab.tokenize("the cat sat on", add_bos=True)
    tokens, parents = engine.draft_tree(history, budget=12, width=3, max_depth=5)
    assert 0 < len(tokens) <= 12 and len(parents) == len(tokens)
    assert tree_problem(parents) is None
    assert len(set(parents)) < len(parents)  # some node has several children: a tree, not a chain
    fresh.reset()
    assert fresh.draft(history, 1)[0] in [t for t, p in zip(tokens, parents) if p == -1]


def test_accepted_tree_path_is_reused_and_drafting_continues_exactly(engines):
    engine, fresh = engines
    history = engine.vocab.tokenize("once upon a time", add_bos=True)
    tokens, parents = engine.draft_tree(history, budget=10, width=2, max_depth=4)
    # Accept the first root-to-leaf path the tree offers, then a bonus token of our choosing.
    path, node = [], next(i for i, p in enumerate(parents) if p == -1)
    while True:
        path.append(tokens[node])
        children = [i for i, p in enumerate(parents) if p == node]
        if not children:
            break
        node = children[0]
    continued = history + path + [7]
    fresh.reset()
    assert engine.draft(continued, 6) == fresh.draft(continued, 6)


def test_chain_after_rejection_rolls_back(engines):
    engine, fresh = engines
    history = engine.vocab.tokenize("numbers: one two", add_bos=True)
    drafted = engine.draft(history, 5)
    rejected = history + drafted[:2] + [(drafted[2] + 1) % 512]
    fresh.reset()
    assert engine.draft(rejected, 4) == fresh.draft(rejected, 4)


def _fresh_draft(fresh, history, shape, calibration=None):
    """The draft a fresh engine makes (with the same learned acceptance rates, which shape trees)."""
    fresh.reset()
    if calibration is not None:
        fresh.acceptance.calibration = copy.deepcopy(calibration)
    tree = fresh.plan(history, shape)
    return tree.wire_tokens, tree.wire_parents


@pytest.mark.parametrize("shape", [DraftShape(depth=5, budget=5), DraftShape(depth=4, budget=9, width=3)])
def test_proactive_draft_is_used_when_the_guess_comes_true(engines, shape):
    engine, fresh = engines
    history = engine.vocab.tokenize("the dog ran to", add_bos=True)
    tree = engine.plan(history, shape)
    path, bonus = engine.guess(tree)
    assert path and tree.wire_tokens[:1] == path[:1]
    learned = copy.deepcopy(engine.acceptance.calibration)
    ahead = engine.draft_ahead(tree, shape)
    assert ahead is not None and ahead.finished
    confirmed = history + path + [bonus]
    used = engine.plan(confirmed, shape)
    assert used is ahead and used.from_ahead
    assert (used.wire_tokens, used.wire_parents) == _fresh_draft(fresh, confirmed, shape, learned)
    # ... and drafting goes on from there exactly as a fresh engine would.
    after = confirmed + used.wire_tokens[:1] + [3]
    assert engine.plan(after, shape).wire_tokens == _fresh_draft(fresh, after, shape, engine.acceptance.calibration)[0]


def test_proactive_draft_cut_short_is_finished_when_used(engines):
    engine, fresh = engines
    shape = DraftShape(depth=6, budget=6)
    history = engine.vocab.tokenize("one two three", add_bos=True)
    tree = engine.plan(history, shape)
    path, bonus = engine.guess(tree)
    ahead = engine.draft_ahead(tree, shape, stop=lambda: True)  # the reply came after one level
    assert ahead is not None and not ahead.finished and ahead.levels < shape.depth
    used = engine.plan(history + path + [bonus], shape)
    assert used.from_ahead and used.wire_tokens == _fresh_draft(fresh, history + path + [bonus], shape)[0]


def test_proactive_draft_is_dropped_when_the_guess_is_wrong(engines):
    engine, fresh = engines
    shape = DraftShape(depth=5, budget=8, width=2)
    history = engine.vocab.tokenize("red green blue", add_bos=True)
    tree = engine.plan(history, shape)
    path, bonus = engine.guess(tree)
    engine.draft_ahead(tree, shape)
    actual = history + path[:1] + [(bonus + 1) % 512]  # accepted less than guessed
    used = engine.plan(actual, shape)
    assert not used.from_ahead
    assert (used.wire_tokens, used.wire_parents) == _fresh_draft(fresh, actual, shape, engine.acceptance.calibration)


def test_sampled_drafts_follow_the_position_keyed_uniform(engines):
    engine, fresh = engines
    history = engine.vocab.tokenize("a b c", add_bos=True)
    engine.set_sampling(0.8, seed=11)
    fresh.set_sampling(0.8, seed=11)
    first = engine.draft(history, 6)
    again = _fresh_draft(fresh, history, DraftShape(depth=6, budget=6))[0]
    fresh.set_sampling(0.8, seed=12)
    other = _fresh_draft(fresh, history, DraftShape(depth=6, budget=6))[0]
    engine.set_sampling(0.0, 0)
    fresh.set_sampling(0.0, 0)
    assert first == again  # seeded: the same draft for the same seed and positions
    assert first != other  # ... and another seed draws other tokens (6 draws from a random model)


def test_the_engine_counts_drafts_that_branched_and_branches_the_target_took(engines):
    engine, _ = engines
    engine.reset()
    engine.acceptance.calibration = (
        Calibration()
    )  # the draft's own probabilities: a random model's are flat, so it branches
    history = engine.vocab.tokenize("a tree of words", add_bos=True)
    tree = engine.plan(history, DraftShape(depth=3, budget=9, width=3))
    second = next(n for n in tree.branches() if tree.parents[n] == -1)  # a root child that is not the pick
    before = copy.copy(engine.acceptance.branching)
    after = history + [tree.tokens[second], 5]  # the target took it, then drew 5
    chain = engine.plan(after, DraftShape(depth=3, budget=3))
    assert (
        engine.acceptance.branching.drafts,
        engine.acceptance.branching.branched,
        engine.acceptance.branching.taken,
    ) == (
        before.drafts + 1,
        before.branched + 1,
        before.taken + 1,
    )
    assert chain.branches() == set()  # a chain sends only the draft's own picks
    engine.plan(after + chain.wire_tokens[:1] + [9], DraftShape(depth=3, budget=3))
    assert (engine.acceptance.branching.drafts, engine.acceptance.branching.branched) == (
        before.drafts + 2,
        before.branched + 1,
    )


def test_a_tree_whose_first_choices_are_always_taken_drafts_only_the_chain(engines):
    """When the target has taken the draft's first choice at every probability, second choices
    cannot make the budget: the tree decodes nothing but the chain, the chain's own tokens."""
    engine, fresh = engines
    engine.reset()
    engine.acceptance.calibration = Calibration()
    for b in range(Calibration.BINS):
        for _ in range(50):
            engine.acceptance.calibration.observe([(1, (b + 0.5) / Calibration.BINS), (2, 0.01)], drawn=1)
    history = engine.vocab.tokenize("the sea is", add_bos=True)
    tree = engine.plan(history, DraftShape(depth=5, budget=5, width=3))
    assert tree.wire_parents == [-1, 0, 1, 2, 3] and tree.branches() == set()
    assert sum(tree.decoded(n) for n in range(len(tree.tokens))) == 5  # not one second choice decoded
    fresh.reset()
    assert tree.wire_tokens == fresh.draft(history, 5)

"""The llama.cpp draft engine: chains, trees, and KV reuse across rounds."""

from __future__ import annotations

import pytest

from hub_server.verify import tree_problem
from specedge_cli.drafting.engine import DraftEngine


@pytest.fixture(scope="module")
def engines(tiny):
    return DraftEngine(tiny.gguf_f32, n_ctx=512, n_threads=1), DraftEngine(tiny.gguf_f32, n_ctx=512, n_threads=1)


def test_tree_is_valid_within_budget_and_contains_the_greedy_first_token(engines):
    engine, fresh = engines
    history = engine.tokenize("the cat sat on", add_bos=True)
    tokens, parents = engine.draft_tree(history, budget=12, width=3, max_depth=5)
    assert 0 < len(tokens) <= 12 and len(parents) == len(tokens)
    assert tree_problem(parents) is None
    assert len(set(parents)) < len(parents)  # some node has several children: a tree, not a chain
    fresh.reset()
    assert fresh.draft(history, 1)[0] in [t for t, p in zip(tokens, parents) if p == -1]


def test_accepted_tree_path_is_reused_and_drafting_continues_exactly(engines):
    engine, fresh = engines
    history = engine.tokenize("once upon a time", add_bos=True)
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
    history = engine.tokenize("numbers: one two", add_bos=True)
    drafted = engine.draft(history, 5)
    rejected = history + drafted[:2] + [(drafted[2] + 1) % 512]
    fresh.reset()
    assert engine.draft(rejected, 4) == fresh.draft(rejected, 4)

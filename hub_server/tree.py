"""The token-only verification rule (METHOD.md) and the rules of draft trees, in plain Python.

The hub draws one target token at every draft position (greedy at temperature 0, a seeded
sample otherwise) and accepts the longest draft prefix that equals those draws; the draw after
the last accepted token is the bonus token. Every emitted token is therefore a target sample.

Sampling is keyed by (seed, absolute position), not by a running generator: the token drawn at
position p does not depend on how the tokens before it were split into rounds, so a seeded reply
through the hub equals the target sampling alone with the same seed, token for token.
"""

from __future__ import annotations

import numpy as np


def position_uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) that decides the token at `position` of a seeded session."""
    return float(np.random.default_rng([seed, position]).random())


def accept_chain(draft: list[int], choices: list[int], stop_token_ids: frozenset[int]) -> tuple[int, list[int]]:
    """How many draft tokens are accepted, and the tokens a verify emits: the longest draft
    prefix equal to the target's choices, then the target's own next choice (the bonus token).
    Emission ends at the first stop token. The chain case of `accept_tree`.

    draft: [K]; choices: [K + 1], choices[i] is the target's token where draft[i] stands.
    """
    path, emitted = accept_tree(draft, chain_parents(len(draft)), choices, stop_token_ids)
    return len(path), emitted


# --- trees ----------------------------------------------------------------------------
# A draft tree is tokens [N] plus parents [N]: parents[i] is the index of node i's parent, or -1
# when its parent is the last context token (the root). A chain is parents = [-1, 0, 1, ...].


def chain_parents(n: int) -> list[int]:
    return list(range(-1, n - 1))


def tree_problem(parents: list[int]) -> str | None:
    """Why `parents` is not a valid tree in topological order, or None when it is."""
    for index, parent in enumerate(parents):
        if not -1 <= parent < index:
            return (
                f"parents[{index}] = {parent}: each node's parent must be -1 (the context) "
                f"or an earlier node, so trees have no cycles or forward references"
            )
    return None


def node_depths(parents: list[int]) -> list[int]:
    """Depth of each node below the root: children of the root have depth 1."""
    depths: list[int] = []
    for parent in parents:
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def accept_tree(
    tokens: list[int], parents: list[int], choices: list[int], stop_token_ids: frozenset[int]
) -> tuple[list[int], list[int]]:
    """The accepted path (node indices, root to leaf) and the emitted tokens.

    choices: [N + 1]; choices[0] is the target's token after the root, choices[i + 1] after node i.
    A node is accepted when its parent is and its token equals the target's choice at its parent;
    a stop token ends its path. The deepest accepted node wins (the first one on ties); the bonus
    token is the target's choice after it, unless it is a stop token.
    """
    accepted = [False] * len(tokens)
    depth = [0] * len(tokens)
    best = -1
    for index, (token, parent) in enumerate(zip(tokens, parents)):
        parent_open = parent < 0 or (accepted[parent] and tokens[parent] not in stop_token_ids)
        if parent_open and token == choices[parent + 1]:
            accepted[index] = True
            depth[index] = 1 if parent < 0 else depth[parent] + 1
            if best < 0 or depth[index] > depth[best]:
                best = index
    path: list[int] = []
    node = best
    while node >= 0:
        path.append(node)
        node = parents[node]
    path.reverse()
    emitted = [tokens[i] for i in path]
    if not emitted or emitted[-1] not in stop_token_ids:
        emitted.append(choices[best + 1])
    return path, emitted

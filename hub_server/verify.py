"""The token-only verification rule (METHOD.md), as small functions over tensors.

The hub draws one target token at every draft position (greedy at temperature 0, a seeded
sample otherwise) and accepts the longest draft prefix that equals those draws; the draw after
the last accepted token is the bonus token. Every emitted token is therefore a target sample.

Sampling is keyed by (seed, absolute position), not by a running generator: the token drawn at
position p does not depend on how the tokens before it were split into rounds, so a seeded reply
through the hub equals the target sampling alone with the same seed, token for token.
"""

from __future__ import annotations

import numpy as np
import torch


def position_uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) that decides the token at `position` of a seeded session."""
    return float(np.random.default_rng([seed, position]).random())


def sample_row(logits: torch.Tensor, temperature: float, uniform: float) -> int:
    """Inverse-CDF sample of one token from softmax(logits / temperature).

    logits: [V]
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)  # [V], float64 for a stable CDF
    cdf = torch.cumsum(probs, dim=-1)
    token = int(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)))
    return min(token, logits.shape[-1] - 1)


def target_choices(logits: torch.Tensor, temperature: float, seed: int, positions: list[int]) -> list[int]:
    """The target's token at each row: argmax at temperature 0, else a position-keyed sample.

    logits: [S, V]; row i decides the token at absolute context position positions[i].
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1).tolist()
    return [sample_row(row, temperature, position_uniform(seed, position)) for row, position in zip(logits, positions)]


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


def ancestor_masks(rows: list[list[int]], width: int) -> torch.Tensor:
    """mask[b, i, j] is True when node j of row b is node i or one of its ancestors: [B, S, S]
    bool for S = width. Rows shorter than S are padded with nodes that see only themselves.

    Each node's ancestors are a bit set (its parent's, plus itself), unpacked in one step.
    """
    row_bytes = (width + 7) // 8
    packed = bytearray()
    for parents in rows:
        ancestors: list[int] = []
        for index, parent in enumerate(parents):
            ancestors.append((ancestors[parent] if parent >= 0 else 0) | (1 << index))
        ancestors += [1 << index for index in range(len(parents), width)]
        for bits in ancestors:
            packed += bits.to_bytes(row_bytes, "little")
    bits = np.unpackbits(
        np.frombuffer(bytes(packed), dtype=np.uint8).reshape(len(rows), width, row_bytes),
        axis=-1,
        count=width,
        bitorder="little",
    )
    return torch.from_numpy(bits.astype(bool))


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

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
    token = int(torch.searchsorted(cdf, torch.tensor([uniform * float(cdf[-1])], dtype=cdf.dtype)))
    return min(token, logits.shape[-1] - 1)


def target_choices(logits: torch.Tensor, temperature: float, seed: int, first_position: int) -> list[int]:
    """The target's token at each row: argmax at temperature 0, else a position-keyed sample.

    logits: [S, V]; row i predicts the token at absolute position first_position + i.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1).tolist()
    return [
        sample_row(row, temperature, position_uniform(seed, first_position + i))
        for i, row in enumerate(logits)
    ]


def accept_chain(draft: list[int], choices: list[int], stop_token_ids: frozenset[int]) -> tuple[int, list[int]]:
    """How many draft tokens are accepted, and the tokens a verify emits: the longest draft
    prefix equal to the target's choices, then the target's own next choice (the bonus token).
    Emission ends at the first stop token.

    draft: [K]; choices: [K + 1], choices[i] is the target's token where draft[i] stands.
    """
    emitted: list[int] = []
    for drafted, chosen in zip(draft, choices):
        if drafted != chosen:
            break
        emitted.append(drafted)
        if drafted in stop_token_ids:
            return len(emitted), emitted
    accepted = len(emitted)
    emitted.append(choices[accepted])
    return accepted, emitted

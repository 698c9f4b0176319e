"""How the draft picks its tokens: greedy at temperature 0, a position-keyed sample otherwise.

The hub draws the target's token at context position p by inverse CDF with the uniform number
`numpy.random.default_rng([seed, p]).random()` (docs/protocol.md). The draft draws its own token
at p from its own distribution with the *same* uniform number. When the two distributions are
close their inverse CDFs land on the same token, so a sampled draft is accepted about as often
as a greedy one is at temperature 0 (a coupling of the two samples). Lossless either way: the
hub decides every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def position_uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) that decides the token at `position` of a seeded session."""
    return float(np.random.default_rng([seed, position]).random())


def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    shifted = scaled - scaled.max()
    return shifted - np.log(np.exp(shifted).sum())


@dataclass(frozen=True)
class DraftSampler:
    temperature: float = 0.0
    seed: int = 0

    def pick(self, logits: np.ndarray, position: int) -> int:
        """The draft's token at context `position` given the logits before it."""
        if self.temperature == 0.0:
            return int(logits.argmax())
        cdf = np.cumsum(np.exp(log_softmax(logits, self.temperature)))
        token = int(np.searchsorted(cdf, position_uniform(self.seed, position) * cdf[-1], side="left"))
        return min(token, len(logits) - 1)

    def candidates(self, logits: np.ndarray, position: int, width: int) -> list[tuple[int, float]]:
        """Up to `width` (token, log-probability) children: the pick first, then the likeliest others.

        The pick is scored as the likeliest token even when it was sampled: under the shared
        uniform it is the one the target most likely draws too.
        """
        first = self.pick(logits, position)
        if width == 1:
            return [(first, 0.0)]  # a chain: one child per node, no score needed
        log_probs = log_softmax(logits, self.temperature or 1.0)
        top = np.argpartition(-log_probs, min(width, len(log_probs) - 1))[:width]
        others = sorted((int(t) for t in top if t != first), key=lambda t: -log_probs[t])
        return [(first, float(log_probs.max()))] + [(t, float(log_probs[t])) for t in others[: width - 1]]

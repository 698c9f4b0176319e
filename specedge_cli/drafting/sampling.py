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
    """log softmax(logits / temperature), shifted to a maximum of 0 before dividing, as the hub
    does: a tiny temperature sends the other tokens to -inf instead of the top one to +inf (NaN)."""
    shifted = logits.astype(np.float64) - float(logits.max())
    with np.errstate(over="ignore", divide="ignore"):
        scaled = shifted / temperature
    return scaled - np.log(np.exp(scaled).sum())


@dataclass(frozen=True)
class DraftSampler:
    temperature: float = 0.0
    seed: int = 0

    def pick(self, logits: np.ndarray, position: int) -> int:
        """The draft's token at context `position` given the logits before it."""
        if self.temperature == 0.0:
            return int(logits.argmax())
        cdf = np.cumsum(np.exp(log_softmax(logits, self.temperature)))
        # The first token whose CDF passes the uniform number, as the hub draws it.
        token = int(np.searchsorted(cdf, position_uniform(self.seed, position) * cdf[-1], side="right"))
        return min(token, len(logits) - 1)

    def candidates(self, logits: np.ndarray, position: int, width: int) -> list[tuple[int, float]]:
        """Up to `width` (token, draft probability) children in rank order: the pick, then the
        likeliest others. A chain (width 1) needs no probabilities: it gets 1.0."""
        first = self.pick(logits, position)
        if width == 1:
            return [(first, 1.0)]
        log_probs = log_softmax(logits, self.temperature or 1.0)
        top = np.argpartition(-log_probs, min(width, len(log_probs) - 1))[:width]
        others = sorted((int(t) for t in top if t != first), key=lambda t: -log_probs[t])
        return [(t, float(np.exp(log_probs[t]))) for t in [first] + others[: width - 1]]


class Calibration:
    """How often the target draws the draft's rank-k candidate, by the draft's probability for it.

    Draft probabilities are poor acceptance estimates (a quantized copy of the target is right
    far more often than its probabilities say; a small draft of a big target, less often). Each
    verify reveals the target's token at every accepted node, so the rate is learned online, per
    rank and probability bin, starting from the draft's own probability as the prior.
    """

    BINS = 10
    PRIOR_WEIGHT = 2.0  # pseudo-observations of the prior
    MEMORY = 400.0  # counts are halved past this, so the estimate follows the conversation

    def __init__(self, max_rank: int = 16):
        self._seen = np.zeros((max_rank, self.BINS))
        self._hits = np.zeros((max_rank, self.BINS))

    def acceptance(self, rank: int, probability: float) -> float:
        """Estimated chance that the target draws the rank-`rank` candidate of draft probability p.

        A bin with few observations leans on its rank's rate over all bins, and that one, while
        it is young, on the draft's probability: few verifies are enough to get the shape right.
        """
        rank = min(rank, len(self._seen) - 1)
        pooled = (self._hits[rank].sum() + self.PRIOR_WEIGHT * probability) / (
            self._seen[rank].sum() + self.PRIOR_WEIGHT
        )
        cell = (rank, self._bin(probability))
        return (self._hits[cell] + self.PRIOR_WEIGHT * pooled) / (self._seen[cell] + self.PRIOR_WEIGHT)

    def observe(self, candidates: list[tuple[int, float]], drawn: int) -> None:
        """The target drew `drawn` where the draft proposed `candidates` (rank order)."""
        for rank, (token, probability) in enumerate(candidates[: len(self._seen)]):
            cell = (rank, self._bin(probability))
            self._seen[cell] += 1
            self._hits[cell] += token == drawn
            if self._seen[cell] > self.MEMORY:
                self._seen[cell] /= 2
                self._hits[cell] /= 2

    def _bin(self, probability: float) -> int:
        return min(self.BINS - 1, int(probability * self.BINS))

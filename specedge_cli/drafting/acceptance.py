"""What verifies teach the drafter: how often the target takes each candidate, and how a tree's
nodes are scored by it.

A draft tree grows by the estimated chance that each node is accepted given its parent is
(`Calibration`, learned online from every verify's revealed draws), and stops decoding nodes that
cannot reach the budget's best. The tally of trees that branched, and of branches taken, says
whether trees pay for their width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specedge_cli.drafting.draft_tree import DraftShape, DraftTree
from specedge_cli.drafting.sampling import Calibration


@dataclass
class BranchTally:
    """Verified drafts, those that sent a second choice somewhere, and those where the hub took one."""

    drafts: int = 0
    branched: int = 0
    taken: int = 0


class Acceptance:
    """The calibration a drafter scores its trees with, and the branch tally, fed by each verify."""

    def __init__(self) -> None:
        self.calibration = Calibration()
        self.branching = BranchTally()

    def learn(self, tree: DraftTree | None, history: list[int]) -> None:
        """Feed the calibration what the hub's reply revealed about the target's draws, and
        count whether the tree branched and whether the target took a branch."""
        if tree is not None and history[: len(tree.root)] == tree.root:
            continuation = history[len(tree.root) :]
            for candidates, drawn in tree.revealed(continuation):
                self.calibration.observe(candidates, drawn)
            branches = tree.branches()
            self.branching.drafts += 1
            self.branching.branched += bool(branches)
            self.branching.taken += bool(branches & set(tree.accepted(continuation)))

    def log_acceptance(self, rank: int, probability: float, shape: DraftShape) -> float:
        """A child's score: the log of its estimated chance to be accepted given its parent is."""
        if shape.width == 1:
            return 0.0  # a chain takes every node: no ranking needed
        return float(np.log(max(self.calibration.acceptance(rank, probability), 1e-9)))

    def chain_ahead(self, score: float, levels: int) -> list[float]:
        """The least scores the first choices below a node of `score` will have over `levels`
        levels: every first choice is accepted at least as often as the worst probability bin says."""
        calibration = self.calibration
        worst = min(calibration.acceptance(0, (b + 0.5) / Calibration.BINS) for b in range(Calibration.BINS))
        step = float(np.log(max(worst, 1e-9)))
        return [score + k * step for k in range(1, levels + 1)]

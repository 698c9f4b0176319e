"""Adaptive draft depth: the depth with the lowest predicted inter-token latency, from measurements.

For depth d, with per-token acceptance a, draft time t per step and verify wait W (round trip +
hub verify), a round emits E(d) = (1 - a^(d+1)) / (1 - a) tokens and takes W plus the drafting
the user waits for. With proactive drafting the next draft is written while the verify is in
flight; when the guess comes true (about a^(d+1) of the time) up to W of its drafting is hidden.
So with a good draft the depth settles where drafting takes about as long as the flight (round
trip + hub verify): the next draft is ready the moment the reply arrives and neither side waits;
a perfect draft goes deeper still, a poor one shallower. The depth is also capped where a deeper
token would be accepted less than one time in ten: past that the hub mostly verifies tokens that
are thrown away.

Torch-free and clock-free (timings come in through `observe_*`), so it is unit-tested directly.
"""

from __future__ import annotations

import math

from specedge_cli.drafting.draft_tree import DraftShape

MAX_AUTO_DEPTH = 16  # the deepest draft auto mode sends
FIRST_DEPTH = 4  # before anything has been measured
MIN_DEEPEST_ACCEPTANCE = 0.1  # a draft stops where its last token would be accepted less often than this
SMOOTHING = 0.3  # weight of the newest measurement in the running averages
DECAY = 0.9  # how fast old acceptance counts fade


class DepthPlanner:
    def __init__(
        self,
        fixed_depth: int = 0,
        tree_budget: int = 0,
        tree_width: int = 4,
        max_depth: int = 64,
        proactive: bool = True,
    ):
        self.fixed_depth = fixed_depth  # 0: choose online
        self.tree_budget = tree_budget  # 0: chains
        self.tree_width = tree_width
        self.max_depth = max_depth  # the hub's limit
        self.proactive = proactive
        self.decode_s: float | None = None  # one draft llama_decode (a chain token or a tree level)
        self.wait_s: float | None = None  # send to reply: round trip + hub verify
        self._accepted = 0.0
        self._stops = 0.0

    def observe_draft(self, decodes: int, seconds: float) -> None:
        if decodes > 0 and seconds > 0:
            self.decode_s = _average(self.decode_s, seconds / decodes)

    def observe_verify(self, wait_s: float, depth: int, accepted: int) -> None:
        """One verify: how long it took, how deep the draft went, how much of it was accepted."""
        self.wait_s = _average(self.wait_s, wait_s)
        if depth > 0:
            self._accepted = DECAY * self._accepted + accepted
            self._stops = DECAY * self._stops + (1 if accepted < depth else 0)

    @property
    def acceptance(self) -> float | None:
        """Per-token acceptance, as a geometric run length estimate (None before any verify)."""
        total = self._accepted + self._stops
        return self._accepted / total if total else None

    @property
    def depth(self) -> int:
        if self.fixed_depth:
            return min(self.fixed_depth, self.max_depth)
        deepest = min(MAX_AUTO_DEPTH, self.max_depth)
        if self.decode_s is None or self.wait_s is None:
            return min(FIRST_DEPTH, deepest)
        a = self.acceptance if self.acceptance is not None else 1.0
        if a < 1.0:
            deepest = min(deepest, max(1, int(math.log(MIN_DEEPEST_ACCEPTANCE) / math.log(max(a, 1e-6)))))
        return min(range(1, deepest + 1), key=lambda d: (self.predicted_itl_s(d, a), d))

    def predicted_itl_s(self, depth: int, a: float) -> float:
        """The inter-token latency a draft of `depth` would give, with acceptance `a` (once timed)."""
        assert self.decode_s is not None and self.wait_s is not None, "called once both are measured"
        emitted = depth + 1 if a >= 1.0 else (1 - a ** (depth + 1)) / (1 - a)
        decode_s, wait_s = self.decode_s or 0.0, self.wait_s or 0.0  # measured before it is asked
        drafting = depth * decode_s
        hit = a ** (depth + 1) if self.proactive else 0.0
        exposed = drafting - hit * min(drafting, wait_s)
        return (wait_s + exposed) / emitted

    def shape(self, room: int) -> DraftShape:
        """The next draft's shape, never deeper than `room` tokens."""
        depth = max(0, min(self.depth, room))
        if not self.tree_budget:
            return DraftShape(depth=depth, budget=depth)
        budget = self.tree_budget if self.fixed_depth else min(self.tree_budget, depth * self.tree_width)
        return DraftShape(depth=depth, budget=budget, width=self.tree_width)


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new

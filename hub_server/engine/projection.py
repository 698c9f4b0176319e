"""The acceptance rule's projection walk: which draft nodes the vocabulary projection computes.

The acceptance rule (`tree.accept_tree`) reads a node's target choice only when the node itself
is accepted, so the vocabulary projection (on a 262k-token vocabulary, most of a pass on a CPU)
need not run for the others. The walk goes down the drafts a level at a time from the roots; at
each level it either projects only the nodes it has reached, or every node still below them at
once, whichever the projection's measured cost says is cheaper (`ProjectionWalk._walk_on`).
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hub_server.engine.layout import PassBatch
from hub_server.engine.sampling import allowed_only, target_choices
from hub_server.engine_api import VerifyJob
from hub_server.pass_cost import RowCosts
from hub_server.tree import node_depths

# How fast the estimate of how often a projected draft node leads on to an accepted child follows
# the drafts.
SURVIVAL_FADE = 0.3


@dataclass(frozen=True)
class DraftShape:
    """What the walk reads of a draft tree's shape, by node + 1 (index 0: the root). Its size
    grows with the nodes, not with nodes x depth, so caching a client's long chains costs little."""

    kids: tuple[tuple[int, ...], ...]  # each node's children
    depths: tuple[int, ...]  # each node's depth: the root 0, its children 1
    order: tuple[int, ...]  # the nodes depth first: each node's descendants come right after it
    spans: tuple[tuple[int, int], ...]  # where each node's descendants lie in `order`
    all_under: Counter  # every node, by depth: what lies under the root

    def below(self, node: int) -> tuple[int, ...]:
        """Every node under `node` (-1: the root)."""
        start, end = self.spans[node + 1]
        return self.order[start:end]

    def under(self, node: int) -> Counter:
        """How many nodes lie under `node` at each depth."""
        return self.all_under if node < 0 else Counter(self.depths[d + 1] for d in self.below(node))


@functools.lru_cache(maxsize=1024)
def draft_shape(parents: tuple[int, ...]) -> DraftShape:
    """A draft's shape, worked out once for each shape the drafts take (a chain of each length,
    the few trees a drafter makes) instead of in every pass."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        kids[parent + 1].append(node)
    depths = (0, *node_depths(list(parents)))
    sizes = [1] * (len(parents) + 1)  # each node's subtree, itself included
    for node in range(len(parents) - 1, -1, -1):  # children come after their parents
        sizes[parents[node] + 1] += sizes[node + 1]
    order: list[int] = []
    spans = [(0, len(parents))] * (len(parents) + 1)
    stack = list(reversed(kids[0]))
    while stack:
        node = stack.pop()
        order.append(node)
        spans[node + 1] = (len(order), len(order) + sizes[node + 1] - 1)
        stack.extend(reversed(kids[node + 1]))
    return DraftShape(tuple(map(tuple, kids)), depths, tuple(order), tuple(spans), Counter(depths[1:]))


def _opens(job: VerifyJob, node: int, choice: int) -> bool:
    """Whether draft `node` is accepted (its token is the target's choice at its accepted parent)
    and has a choice of its own to read: a stop token ends its path."""
    token = job.draft[node]
    return token == choice and token not in job.stop_token_ids


class ProjectionWalk:
    """The target's choices at a pass's roots and draft nodes, projecting as few rows as pays.

    `mode`: `auto` decides by the projection's measured cost, `levels` walks level by level,
    `all` computes every node in one go."""

    def __init__(self, logits: Callable[[torch.Tensor, list[int]], torch.Tensor]):
        self._logits = logits  # the target's logits [K, V] at flattened columns of a pass's hidden states
        self.mode = "auto"
        self.costs = RowCosts()  # the projection's time by the rows it computes
        self.survival: list[float] = []  # by depth: how often a projected node led on to an accepted child
        self.projected_rows = 0  # verify rows the projection computed

    def time_rows(self, hidden: torch.Tensor, most_rows: int) -> None:
        """Time the projection at a few row counts up to `most_rows` of `hidden` [R, hidden], so
        that the first passes already know what its rows cost against a call of it."""
        # One row (a vector product), a few (the smallest matrix products) and many: the shape of
        # the cost, in under a second on a CPU for Gemma 3's 262k-token vocabulary.
        for rows in sorted({1, 2, min(8, most_rows), max(2, most_rows)}):
            started = time.perf_counter()
            self._logits(hidden, list(range(rows))).argmax(dim=-1).tolist()
            self.costs.add(rows, time.perf_counter() - started)

    def choices(self, jobs: list[VerifyJob], batch: PassBatch, hidden: torch.Tensor) -> list[list[int]]:
        """The target's choice at each row's root and draft nodes, as `accept_tree` reads them
        (choices[0] after the root, choices[i + 1] after node i); -1 where it reads none. `hidden`:
        the pass's last hidden states [B', S', hidden]."""
        shapes = [draft_shape(tuple(job.parents)) for job in jobs]
        choices = [[-1] * (len(job.draft) + 1) for job in jobs]
        frontier = [(b, -1) for b in range(len(jobs))]  # (row, node): choice needed, not yet computed
        depth = 0  # of every node in the frontier
        while frontier:
            under = Counter[int]()  # nodes still below the frontier, by depth
            for b, node in frontier:
                under.update(shapes[b].under(node))
            if self._walk_on(depth, len(frontier), under):
                wanted = frontier
            else:
                wanted = frontier + [(b, d) for b, node in frontier for d in shapes[b].below(node)]
            for (b, node), choice in zip(wanted, self._choose(jobs, batch, hidden, wanted)):
                choices[b][node + 1] = choice
            # On through the nodes just computed, to the next ones not computed; by depth, how
            # many of those reached had children and how many led on to one (what walking pays).
            walking, frontier = list(frontier), []
            seen, led = Counter[int](), Counter[int]()
            while walking:
                b, node = walking.pop()
                at, kids = shapes[b].depths[node + 1], shapes[b].kids[node + 1]
                opened = [child for child in kids if _opens(jobs[b], child, choices[b][node + 1])]
                seen[at] += bool(kids)
                led[at] += bool(opened)
                for child in opened:
                    (walking if choices[b][child + 1] >= 0 else frontier).append((b, child))
            for at, count in seen.items():
                if count:
                    self._learn_survival(at, led[at] / count)
            depth += 1
        return choices

    def _learn_survival(self, depth: int, share: float) -> None:
        while len(self.survival) <= depth:
            self.survival.append(0.5)
        self.survival[depth] += SURVIVAL_FADE * (share - self.survival[depth])

    def _walk_on(self, depth: int, reached: int, under: Counter) -> bool:
        """Whether to project only the `reached` nodes at `depth` now, leaving the nodes below
        them (`under`: how many at each depth) for later levels, rather than all of them at once.

        A projection's cost by its rows is measured (at start on a CPU, then as passes run). Walking on
        saves the rows under every node that turns out rejected, and costs one projection more
        a level; with how often a node at each depth led on lately, the expected cost of
        projecting everything left at depth k is compared for every k, and the walk goes on
        while a deeper k is cheaper than now."""
        if not under or self.mode == "all":
            return False
        if self.mode == "levels":
            return True
        if not self.costs.known():
            return False
        # Expected nodes reached at each depth: those of this level, then as many as led on lately.
        deepest, reach = max(under), {depth: float(reached)}
        for d in range(depth + 1, deepest + 1):
            survival = self.survival[d - 1] if d - 1 < len(self.survival) else 0.5
            reach[d] = min(float(under.get(d, 0)), reach[d - 1] * survival)

        projection = self.costs.curve()  # expected cost of one call (none if no rows)
        # What walking costs up to each depth (one projection a level), and how many nodes lie
        # deeper than each depth: sums built once, not again for every depth compared.
        walked = [0.0]
        for d in range(depth, deepest + 1):
            walked.append(walked[-1] + projection(reach[d]))
        deeper = {deepest: 0}
        for d in range(deepest, depth, -1):
            deeper[d - 1] = deeper[d] + under.get(d, 0)

        def all_at(k: int) -> float:  # walk to depth k alone, then project all that is left there
            if k > deepest:
                return walked[k - depth]
            share = reach[k] / under[k] if k > depth and under.get(k) else 1.0  # of depth k reached
            return walked[k - depth] + projection(reach[k] + share * deeper[k])

        now = all_at(depth)
        return any(all_at(k) < now for k in range(depth + 1, deepest + 2))

    def _choose(
        self, jobs: list[VerifyJob], batch: PassBatch, hidden: torch.Tensor, wanted: list[tuple[int, int]]
    ) -> list[int]:
        """The target's token after each (row, node) of `wanted` (node -1: the row's root)."""
        columns = [len(jobs[b].pending) + node for b, node in wanted]
        started = time.perf_counter()
        raw = self._logits(hidden, [b * batch.width + c for (b, _), c in zip(wanted, columns)])
        logits = _constrained(raw, jobs, wanted)
        # Greedy rows read one argmax over all of them: one copy from the device, not one a row.
        greedy = logits.argmax(dim=-1).tolist() if any(jobs[b].temperature == 0.0 for b, _ in wanted) else None
        self.costs.add(len(wanted), time.perf_counter() - started)
        self.projected_rows += len(wanted)
        chosen = []
        for k, ((b, _), column) in enumerate(zip(wanted, columns)):
            job = jobs[b]
            if job.temperature == 0.0 and greedy is not None:
                chosen.append(greedy[k])
            else:
                position = int(batch.positions[b, column]) + 1
                chosen += target_choices(logits[k : k + 1], job.temperature, job.seed, [position])
        _note_logprobs(raw, jobs, wanted, chosen)
        return chosen


def _constrained(logits: torch.Tensor, jobs: list[VerifyJob], wanted: list[tuple[int, int]]) -> torch.Tensor:
    """The logits [K, V] with each constrained row's disallowed tokens at -inf: the grammar's masks
    of the (row, node) pairs `wanted`, made one boolean tensor for all of them."""
    rows = [k for k, (b, _) in enumerate(wanted) if jobs[b].masks is not None]
    if not rows:
        return logits
    bits = np.stack([jobs[wanted[k][0]].masks[wanted[k][1] + 1] for k in rows])  # [R, words]
    masked = logits.clone()
    masked[rows] = allowed_only(logits[rows], bits)
    return masked


def _note_logprobs(raw: torch.Tensor, jobs: list[VerifyJob], wanted: list[tuple[int, int]], chosen: list[int]) -> None:
    """For sessions that asked: the target's log-probability of the choice at each (row, node), and
    its likeliest tokens, from the logits before temperature and grammar (OpenAI's logprobs)."""
    rows = [k for k, (b, _) in enumerate(wanted) if jobs[b].top_logprobs is not None]
    if not rows:
        return
    logprobs = torch.log_softmax(raw[rows].float(), dim=-1)  # [R, V]
    most = max(jobs[wanted[k][0]].top_logprobs or 0 for k in rows)
    top = torch.topk(logprobs, most, dim=-1) if most else None
    index = torch.tensor([chosen[k] for k in rows], device=logprobs.device)
    picked = logprobs[torch.arange(len(rows), device=logprobs.device), index].tolist()
    for i, k in enumerate(rows):
        b, node = wanted[k]
        job, count = jobs[b], jobs[b].top_logprobs or 0
        ids = top.indices[i, :count].tolist() if top is not None else []
        values = top.values[i, :count].tolist() if top is not None else []
        job.node_logprobs[node] = (picked[i], ids, values)

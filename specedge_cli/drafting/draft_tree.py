"""A draft tree's bookkeeping, free of llama.cpp: nodes, scores, which ones are sent, the guess.

Nodes are candidates: every token proposed below a decoded node, with its cumulative draft
log-probability as score. Growth is level by level (one llama_decode per level, see engine.py);
at the end the `budget` best-scoring candidates are sent to the hub. A child never scores above
its parent, so the best candidates always form a tree, and with a confident draft they form a
chain: the budget goes to depth where the draft is sure and to branches where it is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

ROOT = -1  # the parent index of the root's children: the last context token


@dataclass(frozen=True)
class DraftShape:
    depth: int  # levels below the root
    budget: int  # nodes sent to the hub
    width: int = 1  # children proposed per node and nodes expanded per level; 1 drafts a chain


@dataclass
class DraftTree:
    root: list[int]  # the context tokens the tree continues
    root_sequence: int  # the llama.cpp sequence holding them
    slot: int  # which of the engine's two sequence pools the nodes use
    shape: DraftShape
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)  # -1 until the node is decoded
    picks: dict[int, int] = field(default_factory=dict)  # node -> the draft's own next token after it
    proposed: dict[int, list[tuple[int, float]]] = field(
        default_factory=dict
    )  # node -> its children's (token, draft prob)
    frontier: list[tuple[int, np.ndarray]] = field(default_factory=list)  # decoded nodes to expand, with logits
    tips: dict[int, int] = field(default_factory=dict)  # sequence -> the deepest node it holds
    levels: int = 0  # levels proposed so far
    selected: list[int] | None = None  # the nodes sent, in wire order, once finished
    draft_s: float = 0.0  # drafting time spent on this tree before it was needed (all of it, unless proactive)
    late_s: float = 0.0  # a proactive tree's drafting left for after the reply came
    decodes: int = 0  # llama_decode calls spent on it
    from_ahead: bool = False  # drafted proactively, while the previous verify was in flight

    # --- growing ---------------------------------------------------------------------
    def add(self, token: int, parent: int, score: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.depths.append(1 if parent == ROOT else self.depths[parent] + 1)
        self.sequences.append(-1)
        return len(self.tokens) - 1

    def score(self, node: int) -> float:
        return 0.0 if node == ROOT else self.scores[node]

    def position(self, node: int) -> int:
        """The node's absolute position in the context (the root's last token: len(root) - 1)."""
        return len(self.root) - 1 + (0 if node == ROOT else self.depths[node])

    def decoded(self, node: int) -> bool:
        return node == ROOT or self.sequences[node] >= 0

    def cutoff(self, budget: int, ahead: Sequence[float] = ()) -> float:
        """The score a node needs to be among the `budget` best so far, counting also the
        scores `ahead` that nodes still to come are sure to reach."""
        scores = self.scores + list(ahead)
        if len(scores) <= budget:
            return -np.inf
        return float(np.partition(np.asarray(scores), len(scores) - budget)[len(scores) - budget])

    @property
    def finished(self) -> bool:
        return self.selected is not None

    # --- what is sent ----------------------------------------------------------------
    def select(self, budget: int) -> list[int]:
        """The `budget` best nodes (ties: shallower first), parents before children."""
        ranked = sorted(range(len(self.tokens)), key=lambda n: (-self.scores[n], self.depths[n], n))[:budget]
        chosen = set()
        for node in sorted(ranked, key=lambda n: (self.depths[n], n)):
            if self.parents[node] == ROOT or self.parents[node] in chosen:
                chosen.add(node)
        return sorted(chosen, key=lambda n: (self.depths[n], n))

    @property
    def wire_tokens(self) -> list[int]:
        return [self.tokens[n] for n in self.selected or []]

    @property
    def wire_parents(self) -> list[int]:
        index = {node: i for i, node in enumerate(self.selected or [])}
        return [ROOT if self.parents[n] == ROOT else index[self.parents[n]] for n in self.selected or []]

    # --- after the verify --------------------------------------------------------------
    def guess_leaf(self) -> int:
        """The end of the likeliest sent path: from the root, always the best-scoring sent child."""
        children: dict[int, list[int]] = {}
        for node in self.selected or []:
            children.setdefault(self.parents[node], []).append(node)
        node = ROOT
        while node in children:
            node = max(children[node], key=lambda n: (self.scores[n], -n))
        return node

    def path_to(self, node: int) -> list[int]:
        path = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def revealed(self, continuation: list[int]) -> list[tuple[list[tuple[int, float]], int]]:
        """Where the hub's tokens `continuation` (accepted path + bonus) show what the target drew
        below a node whose children we proposed: (those children, the drawn token)."""
        reached = [ROOT] + self._walk(continuation, range(len(self.tokens)))
        return [(self.proposed[node], token) for node, token in zip(reached, continuation) if node in self.proposed]

    def branches(self) -> set[int]:
        """The sent nodes that are not the draft's own pick below their parent: what a tree
        spends on second choices, which a chain would have spent deeper."""
        return {n for n in self.selected or [] if self.picks.get(self.parents[n]) != self.tokens[n]}

    def accepted(self, continuation: list[int]) -> list[int]:
        """The sent nodes the hub accepted, given its tokens `continuation` (path + bonus)."""
        return self._walk(continuation, self.selected or [])

    def matching_path(self, continuation: list[int]) -> list[int]:
        """The deepest chain of decoded nodes whose tokens begin `continuation`."""
        return self._walk(continuation, [n for n in range(len(self.tokens)) if self.decoded(n)])

    def _walk(self, continuation: list[int], among: Iterable[int]) -> list[int]:
        """From the root, the deepest chain of nodes in `among` whose tokens begin `continuation`
        (a node's children carry distinct tokens, so the chain is unique)."""
        among = set(among)
        path: list[int] = []
        parent = ROOT
        for token in continuation:
            child = next((n for n in among if self.parents[n] == parent and self.tokens[n] == token), None)
            if child is None:
                break
            path.append(child)
            parent = child
        return path

"""The conversation's tokens held in sequence 0 of the drafting context, kept across rounds.

Before a draft the cache is brought to the history the hub confirmed: the longest cached prefix
stays, an accepted path of the last draft tree is taken over from the tree's sequences (its cells
are tagged, nothing accepted is recomputed), rejected tokens are rolled back, and only what is new
(a user turn, the hub's bonus token) is evaluated.
"""

from __future__ import annotations

import numpy as np

from specedge_cli.drafting.draft_tree import DraftTree
from specedge_cli.drafting.tree_context import TreeContext


class HistoryCache:
    """Sequence 0 of `context` and the tokens it holds."""

    def __init__(self, context: TreeContext):
        self._context = context
        self.tokens: list[int] = []

    def holds_prefix_of(self, history: list[int]) -> bool:
        return self.tokens == history[: len(self.tokens)]

    def clear(self) -> None:
        """Forget every cached token (the next sync evaluates its history from scratch)."""
        self._context.remove(0)
        self.tokens = []

    def sync(self, history: list[int]) -> np.ndarray:
        """Make sequence 0 hold `history` and return the logits after its last token.

        The longest cached prefix is kept; at least the last token is evaluated so its logits are current.
        """
        common = 0
        for cached_token, token in zip(self.tokens, history):
            if cached_token != token:
                break
            common += 1
        common = min(common, len(history) - 1)
        self._context.remove(0, common, -1)
        self.tokens = self.tokens[:common]  # true even if the decode below is interrupted
        new = history[common:]
        self._context.decode(new, list(range(common, len(history))), [0] * len(new), [False] * (len(new) - 1) + [True])
        self.tokens = list(history)
        return self._context.logits(-1)

    def adopt_path(self, tree: DraftTree, history: list[int]) -> None:
        """Take the cells of `tree`'s path that `history` accepted, when the tree grew from what is cached."""
        root = tree.root
        if self.tokens == history[: len(root)] and len(self.tokens) == len(root):
            path = tree.matching_path(history[len(root) :])
            if path:
                self._context.remove(0, len(root), -1)
                self._context.copy(tree.sequences[path[-1]], 0, len(root), len(root) + len(path))
                self.tokens = self.tokens + [tree.tokens[n] for n in path]

    def take_root(self, tree: DraftTree) -> None:
        """A proactive tree's guess came true: its root (what is cached, the guessed path and the
        bonus token) becomes the conversation, its cells tagged into sequence 0."""
        self._context.remove(0, len(self.tokens), -1)
        self._context.copy(tree.root_sequence, 0, len(self.tokens), len(tree.root))
        self.tokens = list(tree.root)

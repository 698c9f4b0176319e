"""The draft engine: a llama.cpp model that drafts tokens ahead of the hub.

It keeps its KV cache across rounds. Before drafting it syncs to the conversation's token
history: the common prefix stays cached (nothing accepted is recomputed), rejected draft tokens
are rolled back, and only the new tokens (a user turn, the hub's bonus token) are evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import numpy as np

from specedge_cli.drafting.tree_context import TreeContext
from specedge_cli.errors import ModelFileError

_SPACE_MARK = "\u2581"


def vocab_fingerprint(pieces: list[str]) -> str:
    """sha256 over token pieces in id order, whitespace marks normalised (as the hub does)."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece.replace(_SPACE_MARK, " ").encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


class DraftEngine:
    def __init__(self, model_path: Path, n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int = -1,
                 max_tree_nodes: int = 64):
        import llama_cpp

        self._lib = llama_cpp
        if not model_path.is_file():
            raise ModelFileError(f"draft model {model_path} does not exist; run `specedge chat --model PATH` with a .gguf file")
        try:
            with _quiet_stderr():
                # The Llama object gives the tokenizer and metadata; drafting runs in a TreeContext.
                self.llm = llama_cpp.Llama(
                    model_path=str(model_path), n_ctx=64, n_threads=n_threads or _default_threads(),
                    n_gpu_layers=n_gpu_layers, logits_all=False, verbose=False,
                )
                self._context = TreeContext(llama_cpp, self.llm.model, n_ctx, n_threads or _default_threads(),
                                            max_sequences=max_tree_nodes + 1)
        except ValueError as exc:
            raise ModelFileError(f"llama.cpp could not load {model_path}: is it a complete .gguf file? ({exc})") from exc
        self.path = model_path
        self.n_threads = n_threads or _default_threads()
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.max_tree_nodes = max_tree_nodes
        self._cached: list[int] = []         # the tokens sequence 0 holds
        self._tree: _Tree | None = None      # the last draft tree, until the next sync

    # --- vocabulary -------------------------------------------------------------------
    def vocab_pieces(self) -> list[str]:
        return [
            self._lib.llama_vocab_get_text(self._vocab, i).decode("utf-8", "replace")
            for i in range(self.vocab_size)
        ]

    def vocab_fingerprint(self) -> str:
        return vocab_fingerprint(self.vocab_pieces())

    def stop_token_ids(self) -> list[int]:
        return [i for i in range(self.vocab_size) if self._lib.llama_vocab_is_eog(self._vocab, i)]

    def metadata(self, key: str) -> str | None:
        return self.llm.metadata.get(key)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return self.llm.detokenize(tokens, special=special)

    @property
    def bos_token_id(self) -> int:
        return self.llm.token_bos()

    @property
    def n_ctx(self) -> int:
        return self._context.n_ctx

    def reset(self) -> None:
        """Forget the cached context (the next draft evaluates its history from scratch)."""
        self._drop_tree()
        self._context.remove(0)
        self._cached = []

    def evaluate(self, tokens: list[int]) -> None:
        """Evaluate `tokens` after what is cached (prompt processing)."""
        self._sync(self._cached + tokens)

    # --- drafting ---------------------------------------------------------------------
    def draft(self, history: list[int], length: int) -> list[int]:
        """Greedily draft a chain of up to `length` tokens that continue `history`."""
        if length <= 0:
            return []
        logits = self._sync(history)
        drafted: list[int] = []
        room = self.n_ctx - len(history) - 1
        while True:
            drafted.append(int(logits.argmax()))
            if len(drafted) >= min(length, room):
                break
            position = len(self._cached)
            self._context.decode([drafted[-1]], [position], [0], [True])
            self._cached.append(drafted[-1])
            logits = self._context.logits(-1)
        return drafted

    def draft_tree(self, history: list[int], budget: int, width: int = 4, max_depth: int = 8) -> tuple[list[int], list[int]]:
        """Draft a tree below `history`: tokens [N] and parents [N] (-1: child of the root).

        Level by level, every frontier node proposes its `width` likeliest tokens; the `width`
        best of those by cumulative log-probability join the tree, until `budget` nodes or
        `max_depth` levels. One llama_decode per level.
        """
        budget = min(budget, self.max_tree_nodes, self.n_ctx - len(history) - 1)
        root_logits = self._sync(history)
        tree = _Tree(len(history))
        frontier = [(-1, 0.0, root_logits)]          # (node, cumulative log-prob, its next-token logits)
        for depth in range(1, max_depth + 1):
            room = budget - len(tree.tokens)
            chosen = _best_children(frontier, width, min(width, room))
            if not chosen:
                break
            nodes = [tree.add(token, parent, score) for score, parent, token in chosen]
            for node in nodes:
                self._context.copy(tree.sequence(tree.parents[node]), tree.sequence(node))
            if depth == max_depth or len(tree.tokens) >= budget:
                break  # the deepest level needs no logits of its own
            self._context.decode([tree.tokens[n] for n in nodes], [tree.position(n) for n in nodes],
                                 [tree.sequence(n) for n in nodes], [True] * len(nodes))
            for node in nodes:
                tree.decoded[node] = True
            frontier = [(n, tree.scores[n], self._context.logits(i).copy()) for i, n in enumerate(nodes)]
        self._decode_leaves(tree)
        self._tree = tree
        return tree.tokens, tree.parents

    def _decode_leaves(self, tree: "_Tree") -> None:
        """Give the nodes not yet decoded their KV, so an accepted leaf is cached too."""
        missing = [n for n in range(len(tree.tokens)) if not tree.decoded[n]]
        for node in missing:
            tree.decoded[node] = True
        if missing:
            self._context.decode([tree.tokens[n] for n in missing], [tree.position(n) for n in missing],
                                 [tree.sequence(n) for n in missing], [False] * (len(missing) - 1) + [True])

    def _sync(self, history: list[int]) -> np.ndarray:
        """Make sequence 0 hold `history` and return the logits after its last token.

        An accepted path of the last tree is adopted into sequence 0 (no recompute); the longest
        cached prefix is kept; at least the last token is evaluated so its logits are current.
        """
        self._adopt_tree_path(history)
        common = 0
        for cached_token, token in zip(self._cached, history):
            if cached_token != token:
                break
            common += 1
        common = min(common, len(history) - 1)
        self._context.remove(0, common, -1)
        new = history[common:]
        self._context.decode(new, list(range(common, len(history))), [0] * len(new), [False] * (len(new) - 1) + [True])
        self._cached = list(history)
        return self._context.logits(-1)

    def _adopt_tree_path(self, history: list[int]) -> None:
        tree = self._tree
        if tree is not None and self._cached == history[: tree.root_length]:
            path = tree.matching_path(history[tree.root_length:])
            if path:
                leaf = tree.sequence(path[-1])
                self._context.copy(leaf, 0, tree.root_length, tree.root_length + len(path))
                self._cached = self._cached + [tree.tokens[n] for n in path]
        self._drop_tree()

    def _drop_tree(self) -> None:
        if self._tree is not None:
            for node in range(len(self._tree.tokens)):
                self._context.remove(self._tree.sequence(node))
            self._tree = None


class _Tree:
    """A draft tree's bookkeeping: node n lives in llama.cpp sequence n + 1."""

    def __init__(self, root_length: int):
        self.root_length = root_length
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.scores: list[float] = []
        self.depths: list[int] = []
        self.decoded: list[bool] = []

    def add(self, token: int, parent: int, score: float) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(score)
        self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
        self.decoded.append(False)
        return len(self.tokens) - 1

    @staticmethod
    def sequence(node: int) -> int:
        return node + 1  # -1 (the root) maps to sequence 0, the conversation

    def position(self, node: int) -> int:
        return self.root_length - 1 + self.depths[node]

    def matching_path(self, continuation: list[int]) -> list[int]:
        """The deepest chain of nodes whose tokens begin `continuation`."""
        path: list[int] = []
        parent = -1
        for token in continuation:
            child = next((n for n in range(len(self.tokens)) if self.parents[n] == parent and self.tokens[n] == token), None)
            if child is None or not self.decoded[child]:
                break
            path.append(child)
            parent = child
        return path


# A candidate joins the tree only if it is at least this likely relative to the level's best one:
# a confident draft then spends its budget on depth (a chain), an unsure one on branches.
_MIN_RELATIVE_LOG_PROB = float(np.log(0.05))


def _best_children(frontier, width: int, take: int) -> list[tuple[float, int, int]]:
    """The `take` best (cumulative log-prob, parent node, token) among each frontier node's top
    `width`, leaving out those far less likely than the best."""
    candidates = []
    for node, score, logits in frontier:
        log_probs = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
        top = np.argpartition(-log_probs, width)[:width]
        candidates += [(score + float(log_probs[t]), node, int(t)) for t in top]
    candidates.sort(key=lambda c: -c[0])
    best = candidates[0][0] if candidates else 0.0
    return [c for c in candidates[:take] if c[0] >= best + _MIN_RELATIVE_LOG_PROB]


def _default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints its load log on fd 2 even with verbose=False; keep the terminal clean."""
    if os.environ.get("SPECEDGE_DEBUG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)

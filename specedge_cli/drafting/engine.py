"""The draft engine: a llama.cpp model that drafts tokens ahead of the hub.

It keeps its KV cache across rounds (`history_cache.py`: nothing accepted is recomputed), grows
draft trees scored by what verifies taught it (`acceptance.py`), and drafts the next tree while
a verify is in flight. Its vocabulary (tokenizing, pieces, stop tokens) is `engine.vocab`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from specedge_cli.drafting.acceptance import Acceptance
from specedge_cli.drafting.draft_tree import ROOT, DraftShape, DraftTree
from specedge_cli.drafting.history_cache import HistoryCache
from specedge_cli.drafting.sampling import Calibration, DraftSampler
from specedge_cli.drafting.sequence_pool import SequencePools
from specedge_cli.drafting.tree_context import TreeContext
from specedge_cli.drafting.vocabulary import Vocabulary, quiet_stderr
from specedge_cli.errors import ModelFileError
from specedge_common.grammar import Constraint, GrammarError, allowed


class DraftEngine:
    """Drafts chains and trees with llama.cpp, one llama_decode per tree level.

    Sequence 0 holds the conversation. Draft trees live in two pools of sequences (slots,
    `sequence_pool.py`): the draft now being verified in one, the proactive draft below its
    likeliest outcome in the other. `plan` syncs sequence 0 to the history the hub confirmed: it takes the proactive
    draft when its guess came true, otherwise it adopts the accepted path's cells from the old
    tree (nothing accepted is recomputed) and drafts afresh.
    """

    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_gpu_layers: int = -1,
        max_tree_nodes: int = 64,
    ):
        self.path = model_path
        self.n_threads = n_threads or _default_threads()
        self.llm, self._context = _load(model_path, n_ctx, self.n_threads, n_gpu_layers, 1 + 2 * max_tree_nodes)
        self.vocab = Vocabulary(self.llm)
        self.max_tree_nodes = max_tree_nodes
        self.sampler = DraftSampler()
        self.acceptance = Acceptance()
        self._cache = HistoryCache(self._context)  # sequence 0: the conversation
        self._current: DraftTree | None = None  # the last draft handed out, until the next plan
        self._ahead: DraftTree | None = None  # the proactive draft below the current one's guess
        self._pools = SequencePools(self._context, max_tree_nodes)
        self._constraint: Constraint | None = None  # the reply's grammar: drafts hold only what it allows

    def constrain(self, constraint: Constraint | None) -> None:
        """Draft only tokens `constraint` allows (None: any). The hub draws every token under the same
        grammar, so a token it does not allow would only be a draft rejected."""
        if constraint is not self._constraint:
            self._constraint = constraint
            self._release(self._ahead)  # drafted under the grammar before
            self._ahead = None

    @property
    def n_ctx(self) -> int:
        return self._context.n_ctx

    def set_sampling(self, temperature: float, seed: int) -> None:
        """Draft with the session's sampling (greedy at 0): drafts then match the hub's draws."""
        sampler = DraftSampler(temperature, seed)
        if sampler != self.sampler:
            self.sampler = sampler
            self.acceptance.calibration = Calibration()
            self._release(self._ahead)
            self._ahead = None

    def reset(self) -> None:
        """Forget the cached context (the next draft evaluates its history from scratch)."""
        for tree in (self._current, self._ahead):
            self._release(tree)
        self._current = self._ahead = None
        self._cache.clear()

    def evaluate(self, tokens: list[int]) -> None:
        """Evaluate `tokens` after what is cached (prompt processing)."""
        self._sync(self._cache.tokens + tokens)

    # --- drafting ---------------------------------------------------------------------
    def draft(self, history: list[int], length: int) -> list[int]:
        """Draft a chain of up to `length` tokens that continue `history`."""
        if length <= 0:
            return []
        return self.plan(history, DraftShape(depth=length, budget=length)).wire_tokens

    def draft_tree(
        self, history: list[int], budget: int, width: int = 4, max_depth: int = 8
    ) -> tuple[list[int], list[int]]:
        """Draft a tree below `history`: tokens [N] and parents [N] (-1: child of the root)."""
        tree = self.plan(history, DraftShape(depth=max_depth, budget=budget, width=width))
        return tree.wire_tokens, tree.wire_parents

    def plan(self, history: list[int], shape: DraftShape) -> DraftTree:
        """The draft to send after `history`: the proactive one when its guess came true."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.root == history and self._cache.holds_prefix_of(history):
            self.acceptance.learn(self._current, history)
            return self._promote(ahead)
        self._release(ahead)
        started = time.perf_counter()
        self._follow(history)
        shape = self._fit(shape, room=self.n_ctx - len(history) - 1)
        root_logits = self._sync(history)
        tree = DraftTree(list(history), root_sequence=0, slot=0, shape=shape)
        tree.frontier = [(ROOT, root_logits.copy())] if shape.depth and shape.budget else []
        self._grow(tree)
        self._finish(tree)
        tree.draft_s = time.perf_counter() - started
        self._current = tree
        return tree

    def _fit(self, shape: DraftShape, room: int) -> DraftShape:
        """`shape` within the node budget and the context's room. A tree of `budget` nodes is at
        most `budget` deep: levels past it would be drafted and never sent."""
        budget = max(0, min(shape.budget, self.max_tree_nodes, room // 2))
        return DraftShape(max(0, min(shape.depth, room, budget)), budget, max(1, shape.width))

    def guess(self, tree: DraftTree) -> tuple[list[int], int] | None:
        """The likeliest outcome of verifying `tree`: the accepted path's tokens and the bonus token."""
        if not tree.finished:
            return None
        leaf = tree.guess_leaf()
        if leaf not in tree.picks:
            return None
        return [tree.tokens[n] for n in tree.path_to(leaf)], tree.picks[leaf]

    def draft_ahead(
        self, tree: DraftTree, shape: DraftShape, stop: Callable[[], bool] | None = None
    ) -> DraftTree | None:
        """Draft the next tree now, below `tree`'s guessed outcome, until `stop()` says the reply is in.

        It is kept for the next `plan`, which uses it only if the hub's reply matches the guess.
        """
        self._release(self._ahead)
        self._ahead = None
        guess = self.guess(tree)
        room = self.n_ctx - len(tree.root) - 4 * self.max_tree_nodes - 2
        if guess is None or tree is not self._current or room <= 0:
            return None
        started = time.perf_counter()
        leaf = tree.guess_leaf()
        path, bonus = guess
        slot = 1 - tree.slot
        root_sequence = self._pools.take(slot)
        if root_sequence is None:
            return None
        end = len(tree.root) + len(path)
        source = tree.root_sequence if leaf == ROOT else tree.sequences[leaf]
        self._context.copy(source, root_sequence, 0, end)
        ahead = DraftTree(
            tree.root + path + [bonus],
            root_sequence=root_sequence,
            slot=slot,
            shape=self._fit(shape, room),
        )
        ahead.tips[root_sequence] = ROOT
        self._ahead = ahead
        self._context.decode([bonus], [end], [root_sequence], [True])
        ahead.decodes += 1
        ahead.frontier = [(ROOT, self._context.logits(0).copy())]
        self._grow(ahead, stop)
        if ahead.levels >= ahead.shape.depth or not ahead.frontier:
            self._finish(ahead)
        ahead.draft_s = time.perf_counter() - started
        return ahead

    def _promote(self, ahead: DraftTree) -> DraftTree:
        """The guess came true: the proactive root joins the conversation, its tree is the draft."""
        self._cache.take_root(ahead)
        self._release(self._current)
        started = time.perf_counter()
        if not ahead.finished:
            self._grow(ahead)
            self._finish(ahead)
        ahead.from_ahead = True
        ahead.late_s = time.perf_counter() - started  # drafting the reply had to wait for
        self._current = ahead
        return ahead

    def _grow(self, tree: DraftTree, stop: Callable[[], bool] | None = None) -> None:
        """Add levels until the shape's depth: propose children of the frontier, expand the best."""
        shape = tree.shape
        while tree.levels < shape.depth and tree.frontier:
            level = []
            for parent, logits in tree.frontier:
                logits = self._allowed(tree, parent, logits)
                candidates = self.sampler.candidates(logits, tree.position(parent) + 1, shape.width)
                candidates = [c for c in candidates if c[1] > 0] or candidates[:1]  # none the grammar forbids
                tree.picks[parent] = candidates[0][0]
                tree.proposed[parent] = candidates
                level += [
                    tree.add(
                        token, parent, tree.score(parent) + self.acceptance.log_acceptance(rank, probability, shape)
                    )
                    for rank, (token, probability) in enumerate(candidates)
                ]
            tree.frontier = []
            tree.levels += 1
            if tree.levels >= shape.depth:
                break
            # A node is decoded only to propose children, and none scores above it: skip nodes that
            # cannot reach the budget's best, counting the chain the best node will at least grow.
            best = max(level, key=lambda n: tree.scores[n])
            cutoff = tree.cutoff(
                shape.budget, self.acceptance.chain_ahead(tree.scores[best], shape.depth - tree.levels)
            )
            beam = [n for n in sorted(level, key=lambda n: -tree.scores[n])[: shape.width] if tree.scores[n] >= cutoff]
            beam = self._decode_nodes(tree, beam, logits_for=set(beam))
            tree.frontier = [(node, self._context.logits(i).copy()) for i, node in enumerate(beam)]
            if stop is not None and stop():
                break

    def _finish(self, tree: DraftTree) -> None:
        """Choose the nodes to send and give the undecoded ones their KV (so an accepted leaf is cached)."""
        chosen = tree.select(tree.shape.budget)
        tree.selected = chosen
        leaf = tree.guess_leaf()
        missing = [n for n in chosen if not tree.decoded(n)]
        decoded = self._decode_nodes(tree, missing, logits_for={leaf})
        if len(decoded) < len(missing):  # out of sequences or cells: leave the rest out
            tree.selected = [n for n in chosen if tree.decoded(n)]
        if leaf in decoded and leaf not in tree.picks:
            logits = self._allowed(tree, leaf, self._context.logits(decoded.index(leaf)))
            tree.picks[leaf] = self.sampler.pick(logits, tree.position(leaf) + 1)

    def _follow(self, history: list[int]) -> None:
        """The grammar takes the history the hub confirmed (each of its tokens drawn under it), so
        masks below it cost only the draft's own path."""
        if self._constraint is None:
            return
        try:
            self._constraint.advance(history)
        except GrammarError:  # a history the grammar does not hold: the hub refuses it, draft freely
            self._constraint = None

    def _allowed(self, tree: DraftTree, node: int, logits: np.ndarray) -> np.ndarray:
        """`logits` after `node`, with the tokens the grammar does not allow there at -inf."""
        if self._constraint is None:
            return logits
        path = [tree.tokens[n] for n in tree.path_to(node)] if node != ROOT else []
        mask = self._constraint.mask_after(tree.root + path)
        if mask is None:
            return logits
        return np.where(allowed(mask, len(logits)), logits, -np.inf).astype(logits.dtype)

    def _decode_nodes(self, tree: DraftTree, nodes: list[int], logits_for: set[int]) -> list[int]:
        """Decode `nodes` in one llama_decode, each in its parent's sequence when it is the first
        child to extend it, else in a fresh sequence sharing the parent's cells. Returns the nodes
        decoded (fewer when the slot runs out of sequences)."""
        placed = []
        for node in nodes:
            parent = tree.parents[node]
            source = tree.root_sequence if parent == ROOT else tree.sequences[parent]
            if source != 0 and tree.tips.get(source) == parent:
                sequence = source
            elif (taken := self._pools.take(tree.slot)) is not None:
                sequence = taken
                self._context.copy(source, sequence, 0, tree.position(node))
            else:
                break
            tree.sequences[node] = sequence
            tree.tips[sequence] = node
            placed.append(node)
        if placed:
            self._context.decode(
                [tree.tokens[n] for n in placed],
                [tree.position(n) for n in placed],
                [tree.sequences[n] for n in placed],
                [n in logits_for for n in placed],
            )
            tree.decodes += 1
        return placed

    def _sync(self, history: list[int]) -> np.ndarray:
        """Make sequence 0 hold `history` (taking the last tree's accepted path, after learning
        from it) and return the logits after its last token."""
        tree, self._current = self._current, None
        self.acceptance.learn(tree, history)
        if tree is not None:
            self._cache.adopt_path(tree, history)
        self._release(tree)
        return self._cache.sync(history)

    def _release(self, tree: DraftTree | None) -> None:
        """Drop a tree's sequences (cells shared with sequence 0 stay)."""
        if tree is not None:
            self._pools.release(tree.slot)


def _load(
    model_path: Path, n_ctx: int, n_threads: int, n_gpu_layers: int, max_sequences: int
) -> tuple[Any, TreeContext]:
    """The llama.cpp model (its tokenizer and metadata) and the context drafting runs in."""
    import llama_cpp

    if not model_path.is_file():
        raise ModelFileError(
            f"draft model {model_path} does not exist; run `specedge chat --model PATH` with a .gguf file"
        )
    try:
        with quiet_stderr():
            llm = llama_cpp.Llama(
                model_path=str(model_path),
                n_ctx=64,
                n_threads=n_threads,
                n_gpu_layers=n_gpu_layers,
                logits_all=False,
                verbose=False,
            )
            return llm, TreeContext(llama_cpp, llm.model, n_ctx, n_threads, max_sequences)
    except ValueError as exc:
        raise ModelFileError(f"llama.cpp could not load {model_path}: is it a complete .gguf file? ({exc})") from exc


def _default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))

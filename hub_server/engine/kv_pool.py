"""KV memory in fixed-size blocks, allocated once when the hub starts; sessions take what they use.

Each layer has one keys tensor and one values tensor [blocks, BLOCK_TOKENS, H, D]. Block b holds
the same BLOCK_TOKENS context positions in every layer. A session holds a block table: its
`length` stored tokens live at positions 0..length-1, position p in block blocks[p // BLOCK_TOKENS]
at offset p % BLOCK_TOKENS. A session takes blocks as its context grows (a fed prompt, a verify's
tentative draft nodes: `cover`), and gives back those past what it keeps after each pass
(`trim`: rejected nodes' blocks) and all of them when it closes. Nothing is reserved for contexts
nobody has written: `--max-sessions` caps the session table only, and `--max-context` is a limit.

Sliding-window layers hold their blocks as full-attention layers do (a block is one range of
positions in every layer); the attention masks what lies outside the window and reads only the
window's blocks. Block 0 is never handed out: it stays zero, and a pass points the columns of a
view that hold no token at it (a masked column still enters attention as 0 x value: it must not
hold NaN).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from hub_server.errors import KVBudgetError

GIB = 1 << 30
BLOCK_TOKENS = 16  # positions a block holds: a verify's rejected tail frees whole blocks of this
NULL_BLOCK = 0  # zeros, never handed out: what a pass's view shows where it holds no token
MIN_SESSION_TOKENS = 512  # the budget must hold at least one session of this many (or the model's limit)


@dataclass
class SessionKV:
    """One session's KV memory. Invariant: `blocks` hold its stored context (every token but the
    last, `length` of them), and may hold a few more blocks a pass is about to write into."""

    index: int  # its row in the pool's session table (what a worker process names it by)
    length: int = 0
    blocks: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class KVShape:
    """What one token costs in every layer: kv heads, head size, element size, layers."""

    heads: int
    dim: int
    element_size: int
    layers: int

    @property
    def token_bytes(self) -> int:
        return 2 * self.heads * self.dim * self.element_size * self.layers

    @property
    def block_bytes(self) -> int:
        return BLOCK_TOKENS * self.token_bytes


@dataclass(frozen=True)
class KVPlan:
    blocks: int  # allocated, the null block included
    max_sessions: int  # rows of the session table
    max_context: int  # a session's limit (reserves nothing)
    budget_bytes: int
    budget_source: str  # how the budget was chosen, for the start-up log line

    @property
    def usable_tokens(self) -> int:
        return (self.blocks - 1) * BLOCK_TOKENS

    def describe(self, shape: KVShape) -> str:
        return (
            f"KV memory: {self.blocks - 1} blocks of {BLOCK_TOKENS} tokens = {self.usable_tokens} tokens, "
            f"{self.blocks * shape.block_bytes / GIB:.2f} GiB (budget {self.budget_bytes / GIB:.2f} GiB, "
            f"{self.budget_source}); up to {self.max_sessions} sessions of up to {self.max_context} tokens each, "
            "memory taken as contexts grow"
        )


def plan_kv(
    shape: KVShape,
    max_sessions: int,
    max_context: int,
    model_limit: int,
    budget_bytes: int,
    budget_source: str,
    widest_row: int = 0,
) -> KVPlan:
    """The blocks `budget_bytes` holds, and each session's context limit: `max_context` (0: the
    model's), at most what the blocks hold beside a pass's widest row. A budget that cannot hold
    one session of MIN_SESSION_TOKENS (or the model's limit) is refused."""
    blocks = budget_bytes // shape.block_bytes
    usable = max(blocks - 1, 0) * BLOCK_TOKENS
    least = min(MIN_SESSION_TOKENS, model_limit, max_context or model_limit)
    if usable < least + widest_row:
        raise KVBudgetError(
            f"the KV memory budget of {budget_bytes / GIB:.3f} GiB ({budget_source}) holds {usable} tokens, "
            f"less than one session of {least} tokens and a pass's {widest_row} new ones; "
            "raise --kv-memory-gib"
        )
    context = min(max_context or model_limit, model_limit, usable - widest_row)
    return KVPlan(blocks, max_sessions, context, budget_bytes, budget_source)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


class KVPool:
    """The blocks of every layer, the free list, and the session table."""

    def __init__(self, shape: KVShape, plan: KVPlan, dtype: torch.dtype, device: torch.device | str):
        self.shape = shape
        self.max_context = plan.max_context
        self.blocks = plan.blocks
        # torch.empty: on a CPU pages are committed as blocks are first used (zeroed then: `_zero_fresh`).
        self.keys = [
            torch.empty(plan.blocks, BLOCK_TOKENS, shape.heads, shape.dim, dtype=dtype, device=device)
            for _ in range(shape.layers)
        ]
        self.values = [torch.empty_like(keys) for keys in self.keys]
        self._free = list(range(plan.blocks - 1, NULL_BLOCK, -1))  # popped from the end: lowest first
        self._fresh_from = NULL_BLOCK  # blocks from here on were never handed out (not zeroed yet)
        self._zero_fresh([NULL_BLOCK])
        self._sessions = list(range(plan.max_sessions - 1, -1, -1))
        self._lock = threading.Lock()

    # --- figures --------------------------------------------------------------------------
    @property
    def usable_blocks(self) -> int:
        return self.blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.usable_blocks - len(self._free)

    @property
    def reserved_bytes(self) -> int:
        return self.blocks * self.shape.block_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.shape.block_bytes

    # --- sessions -------------------------------------------------------------------------
    def open(self, least_blocks: int = 1) -> SessionKV | None:
        """A new session's (empty) KV memory, or None when the session table is full or fewer
        than `least_blocks` blocks are free."""
        with self._lock:
            if not self._sessions or len(self._free) < least_blocks:
                return None
            return SessionKV(self._sessions.pop())

    def close(self, kv: SessionKV) -> None:
        """Give back every block of a closed (or evicted) session, and its row."""
        with self._lock:
            self._free.extend(reversed(kv.blocks))
            kv.blocks, kv.length = [], 0
            self._sessions.append(kv.index)

    def cover(self, kv: SessionKV, tokens: int) -> bool:
        """Make `kv`'s blocks hold positions 0..tokens-1; False (nothing taken) when too few are free."""
        wanted = blocks_for(tokens) - len(kv.blocks)
        if wanted <= 0:
            return True
        with self._lock:
            if len(self._free) < wanted:
                return False
            taken = [self._free.pop() for _ in range(wanted)]
            self._zero_fresh(taken)
        kv.blocks.extend(taken)
        return True

    def trim(self, kv: SessionKV) -> None:
        """Give back the blocks past what `kv` stores (a pass's rejected draft nodes)."""
        kept = blocks_for(kv.length)
        if len(kv.blocks) > kept:
            with self._lock:
                self._free.extend(reversed(kv.blocks[kept:]))
            del kv.blocks[kept:]

    def _zero_fresh(self, taken: list[int]) -> None:
        """Zero the blocks never handed out before among `taken` (torch.empty's memory may hold NaN;
        a block given back holds a session's finite keys, harmless under the mask)."""
        end = max(taken) + 1
        if end <= self._fresh_from:
            return
        for keys, values in zip(self.keys, self.values):
            keys[self._fresh_from : end].zero_()
            values[self._fresh_from : end].zero_()
        self._fresh_from = end

    # --- places -----------------------------------------------------------------------------
    def places(self, kv: SessionKV, positions: list[int]) -> list[int]:
        """Each position's row in a layer's pool seen as [blocks * BLOCK_TOKENS, H, D]."""
        return [kv.blocks[p // BLOCK_TOKENS] * BLOCK_TOKENS + p % BLOCK_TOKENS for p in positions]

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        """A layer's keys or values as one row per position: [blocks * BLOCK_TOKENS, H, D] (a view)."""
        return tensor.view(-1, self.shape.heads, self.shape.dim)

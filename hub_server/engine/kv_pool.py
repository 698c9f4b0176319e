"""KV memory in fixed-size blocks, allocated once when the hub starts; sessions take what they use.

Each layer has one keys tensor and one values tensor [blocks, BLOCK_TOKENS, H, D]. Block b holds
the same BLOCK_TOKENS context positions in every layer. A session holds a block table: its
`length` stored tokens live at positions 0..length-1, position p in block blocks[p // BLOCK_TOKENS]
at offset p % BLOCK_TOKENS. A session takes blocks as its context grows (a fed prompt, a verify's
tentative draft nodes: `cover`), and gives back those past what it keeps after each pass
(`trim`: rejected nodes' blocks) and all of them when it closes. Nothing is reserved for contexts
nobody has written: `--max-sessions` caps the session table only, and `--max-context` is a limit.

Shared prefixes: a full block is named by its tokens and the name of the block before it (a
chain, as vLLM and nano-vllm do, but matched exactly: the name is the key itself, with a serial
number for the block before, so two different prefixes never meet) within a session's sharing scope (its account, or every
account, or none). A session fed a context whose leading full blocks are already in the pool
takes those blocks (a reference each) instead of computing them (`share`); its partly filled last
block is its own, and a pass never writes into a full block, so a shared block never changes.
A block no session references keeps its name and its keys (cached) until memory is needed: free
blocks go first, then cached ones, least recently used first.

Sliding-window layers hold their blocks as full-attention layers do (a block is one range of
positions in every layer); the attention masks what lies outside the window and reads only the
window's blocks. Block 0 is never handed out: it stays zero, and a pass points the columns of a
view that hold no token at it (a masked column still enters attention as 0 x value: it must not
hold NaN).
"""

from __future__ import annotations

import math
import mmap
import threading
from collections import OrderedDict
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
    scope: str | None = None  # whose sessions may share its full blocks (None: nobody's)
    tokens: list[int] = field(default_factory=list)  # the stored tokens, `length` of them
    names: list[int] = field(default_factory=list)  # the serial of each leading full block's name so far


@dataclass
class BlockTally:
    """What the blocks have done since start: prefixes found, and cached blocks reclaimed."""

    prefix_hits: int = 0  # full blocks a session took from the pool instead of computing them
    tokens_reused: int = 0  # their tokens: not computed again
    reclaimed: int = 0  # cached blocks (referenced by no session) taken back for new contents


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


def _zeroed_when_touched(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu" and hasattr(mmap, "MAP_ANONYMOUS")


def _pool_tensor(size: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """One layer's keys or values. On a CPU: anonymous memory, whose pages the system commits as
    blocks are first written and hands out zeroed, so taking blocks never zeroes them (a 3,000-token
    prompt's 110 MB took 0.1-0.3 s on the event loop, stalling every other user's replies).
    Elsewhere: `torch.empty`, each block zeroed the first time it is taken (`_zero_fresh`)."""
    if not _zeroed_when_touched(device):
        return torch.empty(size, dtype=dtype, device=device)
    count = math.prod(size)
    memory = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(memory, dtype=dtype, count=count).view(size)  # the tensor keeps `memory` alive


class KVPool:
    """The blocks of every layer, the free list, and the session table."""

    def __init__(self, shape: KVShape, plan: KVPlan, dtype: torch.dtype, device: torch.device | str):
        self.shape = shape
        self.max_context = plan.max_context
        self.blocks = plan.blocks
        size = (plan.blocks, BLOCK_TOKENS, shape.heads, shape.dim)
        self.keys = [_pool_tensor(size, dtype, device) for _ in range(shape.layers)]
        self.values = [_pool_tensor(size, dtype, device) for _ in range(shape.layers)]
        self._free = list(range(plan.blocks - 1, NULL_BLOCK, -1))  # popped from the end: lowest first
        # Blocks from here on were never handed out (not zeroed yet); memory that comes zeroed has none.
        self._fresh_from = plan.blocks if _zeroed_when_touched(device) else NULL_BLOCK
        self._zero_fresh([NULL_BLOCK])
        self._sessions = list(range(plan.max_sessions - 1, -1, -1))
        self._lock = threading.Lock()
        self._refs = [0] * plan.blocks  # sessions holding each block
        self._shared = 0  # blocks more than one session holds (counted as references change: placement reads it)
        self._named: dict[tuple, int] = {}  # (serial of the block before, scope, tokens) -> block
        self._name_of: dict[int, tuple] = {}  # block -> its name
        self._serial: dict[int, int] = {}  # block -> its name's serial number (never reused)
        self._serials = 0
        self._cached: OrderedDict[int, None] = OrderedDict()  # named blocks no session holds, least recent first
        self.tally = BlockTally()

    # --- figures --------------------------------------------------------------------------
    @property
    def usable_blocks(self) -> int:
        return self.blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks a session can take now: free ones, and cached ones no session holds."""
        return len(self._free) + len(self._cached)

    @property
    def used_blocks(self) -> int:
        """Blocks sessions hold."""
        return self.usable_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def shared_blocks(self) -> int:
        """Blocks more than one session holds."""
        return self._shared

    @property
    def reserved_bytes(self) -> int:
        return self.blocks * self.shape.block_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.shape.block_bytes

    # --- sessions -------------------------------------------------------------------------
    def open(self, least_blocks: int = 1, scope: str | None = None) -> SessionKV | None:
        """A new session's (empty) KV memory, or None when the session table is full or fewer
        than `least_blocks` blocks are free. `scope`: whose sessions may share its full blocks."""
        with self._lock:
            if not self._sessions or len(self._free) + len(self._cached) < least_blocks:
                return None
            return SessionKV(self._sessions.pop(), scope=scope)

    def close(self, kv: SessionKV) -> None:
        """Give back every block of a closed (or evicted) session, and its row."""
        with self._lock:
            self._release(kv.blocks)
            self._sessions.append(kv.index)
        kv.blocks, kv.length, kv.tokens, kv.names = [], 0, [], []

    def cover(self, kv: SessionKV, tokens: int) -> bool:
        """Make `kv`'s blocks hold positions 0..tokens-1; False (nothing taken) when too few are free."""
        self.settle(kv)
        wanted = blocks_for(tokens) - len(kv.blocks)
        if wanted <= 0:
            return True
        with self._lock:
            taken = self._take(wanted)
        if taken is None:
            return False
        kv.blocks.extend(taken)
        return True

    def trim(self, kv: SessionKV) -> None:
        """Give back the blocks past what `kv` stores (a pass's rejected draft nodes)."""
        kept = blocks_for(kv.length)
        if len(kv.blocks) > kept:
            with self._lock:
                self._release(kv.blocks[kept:])
            del kv.blocks[kept:]

    # --- shared prefixes --------------------------------------------------------------------
    def share(self, kv: SessionKV, context: list[int]) -> int:
        """Take the leading full blocks of `context` (past what `kv` stores, up to all but its last
        token) that the pool already holds in `kv`'s scope, instead of computing them; returns the
        tokens taken. Only from a block boundary: a partly filled block is the session's own."""
        self.settle(kv)
        if kv.scope is None or kv.length % BLOCK_TOKENS or kv.length != len(kv.names) * BLOCK_TOKENS:
            return 0
        taken = 0
        with self._lock:
            while kv.length + BLOCK_TOKENS <= len(context) - 1:
                chunk = context[kv.length : kv.length + BLOCK_TOKENS]
                block = self._named.get((kv.names[-1] if kv.names else 0, kv.scope, *chunk))
                if block is None:
                    break
                self._hold(block)
                at = kv.length // BLOCK_TOKENS
                if at < len(kv.blocks):  # a block taken ahead for this position, never written: back
                    self._release([kv.blocks[at]])
                    kv.blocks[at] = block
                else:
                    kv.blocks.append(block)
                kv.names.append(self._serial[block])
                kv.tokens += chunk
                kv.length += BLOCK_TOKENS
                taken += BLOCK_TOKENS
            self.tally.prefix_hits += taken // BLOCK_TOKENS
            self.tally.tokens_reused += taken
        return taken

    def stored(self, kv: SessionKV, tokens: list[int]) -> None:
        """`tokens` were stored after `kv`'s past (its length already counts them): the blocks they
        filled are named, so later sessions of its scope can share them."""
        kv.tokens += tokens
        if kv.scope is None:
            return
        with self._lock:
            while (len(kv.names) + 1) * BLOCK_TOKENS <= kv.length:
                at = len(kv.names)
                chunk = kv.tokens[at * BLOCK_TOKENS : (at + 1) * BLOCK_TOKENS]
                name = (kv.names[-1] if kv.names else 0, kv.scope, *chunk)
                block = self._named.get(name, kv.blocks[at])  # the same contents named already: that name
                if block not in self._name_of:
                    self._serials += 1
                    self._named[name], self._name_of[block], self._serial[block] = block, name, self._serials
                kv.names.append(self._serial[block])

    def settle(self, kv: SessionKV) -> None:
        """Bring `kv`'s names and tokens back to its length, where its length was set back (a
        benchmark resetting a session, never the hub): the blocks past it are about to be written,
        so they lose their names, and one another session holds too is first copied into a block
        of its own."""
        if len(kv.names) * BLOCK_TOKENS <= kv.length:
            del kv.tokens[kv.length :]
            return
        kept = kv.length // BLOCK_TOKENS
        with self._lock:
            for at in range(kept, len(kv.names)):
                block = kv.blocks[at]
                if self._refs[block] > 1:
                    copy = self._take(1)
                    if copy is None:
                        raise RuntimeError("no free block to copy a shared block into")
                    for keys, values in zip(self.keys, self.values):
                        keys[copy[0]], values[copy[0]] = keys[block], values[block]
                    self._release([block])
                    kv.blocks[at] = copy[0]
                elif block in self._name_of:
                    self._unname(block)
        del kv.names[kept:]
        del kv.tokens[kv.length :]

    # --- the free list and the cache (under the lock) ----------------------------------------
    def _take(self, count: int) -> list[int] | None:
        """`count` blocks for new contents: free ones first, then the least recently used cached ones."""
        if len(self._free) + len(self._cached) < count:
            return None
        while len(self._free) < count:
            block, _ = self._cached.popitem(last=False)
            self._unname(block)
            self._free.append(block)
            self.tally.reclaimed += 1
        taken = [self._free.pop() for _ in range(count)]
        self._zero_fresh(taken)
        for block in taken:
            self._refs[block] = 1
        return taken

    def _unname(self, block: int) -> None:
        del self._named[self._name_of.pop(block)]
        del self._serial[block]

    def _hold(self, block: int) -> None:
        self._refs[block] += 1
        self._shared += self._refs[block] == 2
        self._cached.pop(block, None)

    def _release(self, blocks: list[int]) -> None:
        """One reference fewer on each block: a named block no session holds is cached, another freed."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            self._shared -= self._refs[block] == 1
            if self._refs[block]:
                continue
            if block in self._name_of:
                self._cached[block] = None
            else:
                self._free.append(block)

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

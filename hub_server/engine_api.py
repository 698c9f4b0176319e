"""What the service asks of the engine, and what the engine tells it, without torch.

The engine (`hub_server/engine/`, the only part of the hub that imports torch) owns the target
model, the KV memory and the forward passes. The service, the scheduler and the HTTP layer see
it only through `Engine`; its device figures arrive as one `EngineStats` snapshot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from hub_server.vocabulary import Vocabulary


class KVHandle(Protocol):
    """A session's KV memory: its row in the engine's session table, and how many context tokens
    it holds (in blocks the engine takes as the context grows)."""

    index: int
    length: int


@dataclass
class VerifyJob:
    """One session's share of a batched verify."""

    kv: KVHandle
    pending: list[int]  # context tokens not yet in the KV; at least one
    draft: list[int]  # tree nodes [N]
    parents: list[int]  # [N], -1 for children of the last pending token
    temperature: float
    seed: int
    stop_token_ids: frozenset[int]
    # The tokens a grammar allows after the root and after each node's path: llguidance bitmasks,
    # numpy int32 [N + 1, words] (`specedge_common.grammar`); None: unconstrained.
    masks: Any = None
    top_logprobs: int | None = None  # report the emitted tokens' logprobs, with this many alternatives
    path: list[int] = field(default_factory=list)  # filled in: accepted node indices
    emitted: list[int] = field(default_factory=list)  # filled in: accepted tokens + bonus
    # filled in when asked: per emitted token (its logprob, the top tokens, their logprobs), from
    # those of the choices the pass computed, by node (-1: the root)
    logprobs: list[tuple[float, list[int], list[float]]] | None = None
    node_logprobs: dict[int, tuple[float, list[int], list[float]]] = field(default_factory=dict)

    def note_emitted_logprobs(self) -> None:
        """Once `path` and `emitted` are in: the logprobs of the emitted tokens, each the choice at
        its parent on the path (the root's, then each accepted node's)."""
        if self.top_logprobs is not None:
            rows = [-1, *self.path][: len(self.emitted)]
            self.logprobs = [self.node_logprobs[row] for row in rows]


@dataclass
class PassTally:
    """Passes of one kind and the device seconds they took."""

    passes: int = 0
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.passes += 1
        self.seconds += seconds


@dataclass(frozen=True)
class EngineStats:
    """What the device has done since start (warm-up excluded), as /metrics shows it."""

    kv_bytes_used: int  # held by open sessions' blocks
    kv_bytes_reserved: int  # allocated at start for all blocks
    device_busy_seconds: float  # holding the device for forward passes
    feeds: PassTally  # context fed in passes of its own (prompts, resumes)
    context_in_verify: int  # tokens verify passes computed for the context they carried
    verify_passes: dict[int, PassTally]  # by sessions in the pass
    pass_fixed_seconds: float | None  # fitted device time of a pass beyond its tokens
    pass_token_seconds: float | None  # fitted device time per token of a pass
    past_kv_bytes_copied: int = 0  # sessions' past keys and values passes read through a copy (0: in place)
    kept_kv_bytes_moved: int = 0  # keys and values of accepted tree nodes moved within their slots
    compiled_hits: int = 0  # verify passes run by a bucket compiled at start (--compile on)
    compiled_misses: int = 0  # verify passes no compiled bucket fitted, run eagerly
    compiled_buckets: int = 0  # pass shapes compiled at start
    kv_blocks: int = 0  # KV blocks allocated at start (16 tokens each)
    kv_blocks_used: int = 0  # held by open sessions
    kv_blocks_cached: int = 0  # held by no session, kept for their prefix until memory is needed
    kv_blocks_shared: int = 0  # held by more than one session
    prefix_hits: int = 0  # full blocks sessions took from the pool instead of computing them
    prefix_tokens_reused: int = 0  # their tokens: not computed again
    kv_blocks_reclaimed: int = 0  # cached blocks taken back for new contents
    devices: tuple[str, ...] = ()  # the devices its passes run on (a tensor-parallel worker's ranks, in rank order)


class Engine(Protocol):
    """The target model on one device, with the KV memory of its sessions."""

    name: str  # the target model's name, as /health and /v1/info report it
    vocab: Vocabulary
    vocab_size: int  # ids the hub accepts: known to the tokenizer and the embedding table
    max_context: int
    # The widest row its verify passes are built for (a compiled pass's widest shape): the
    # scheduler feeds a wider row's context apart first (`scheduler.Composition`).
    widest_verify_row: int
    device_lock: threading.Lock  # one thing at a time on the device (a pass, or the hub's draft)

    def new_kv(self, scope: str | None = None) -> KVHandle | None:
        """KV memory for a new session, or None when the session table is full or too few blocks are
        free. `scope`: sessions of the same scope share the KV of a common prefix (None: no sharing)."""

    def release(self, kv: KVHandle) -> None:
        """Give a closed session's KV memory back."""

    def reserve(self, kv: KVHandle, tokens: int) -> bool:
        """Take the memory for `kv` to hold `tokens` context tokens (a feed's, or a verify's
        context and draft nodes) before a pass writes them; False, taking nothing, when too little
        is free. Memory a pass does not keep (rejected draft nodes) goes back after it."""

    def prefill(self, kv: KVHandle, context: list[int]) -> None:
        """Bring `kv` up to all of `context` but its last token."""

    def feed(self, kv: KVHandle, pending: list[int]) -> None:
        """Bring `kv` up to all of `pending` (the context after what it holds) but its last token,
        in passes of its session alone: a verify's context the scheduler took out of its pass."""

    def verify_batch(self, jobs: list[VerifyJob]) -> float:
        """Verify every job's draft in one forward pass, as composed (whatever context each job
        brings); fills in `path` and `emitted`. Returns the pass's device seconds (what the hub's
        histogram of pass times observes)."""

    def pass_fixed_s(self) -> float | None:
        """A verify pass's fitted device time beyond its tokens (None until it can be fitted)."""

    def stats(self) -> EngineStats:
        """A snapshot of the device's figures."""

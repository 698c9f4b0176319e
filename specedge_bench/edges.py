"""Each simulated user's edge device: real drafts, delivered as fast as that device would draft them."""

from __future__ import annotations

import threading
import time

from hub_server.engine.drafter import HubDrafter


class EmulatedEdges:
    """Real drafts from the draft model, delivered as fast as each user's own device would draft them.

    Each user has an edge device of their own, so N users draft at once, never N times slower.
    One machine cannot run N draft models side by side, so: greedy drafting is a function of the
    context, so each context's next draft token is computed once (on first need) and kept;
    `prepare` computes them along every prompt's reply before the timed runs, and measures the
    draft speed on the way. During a run a user takes its draft from that store and waits as long
    as its own device would take to draft it.
    """

    def __init__(self, drafter: HubDrafter, tokens_per_second: float = 0.0):
        self._drafter = drafter
        self._next: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()  # one llama.cpp context: one draft step at a time
        self.tokens_per_second = tokens_per_second
        self.steps = 0
        self.step_seconds = 0.0

    def prepare(self, contexts: list[list[int]], draft_len: int) -> None:
        """Draft below every context up front; set the edge speed from these steps if not given."""
        for context in contexts:
            self._draft(context, draft_len)
        if not self.tokens_per_second:
            self.tokens_per_second = self.steps / self.step_seconds if self.step_seconds else 1000.0

    def draft(self, context: list[int], length: int, since: float | None = None) -> list[int]:
        """`length` real draft tokens after `context`, returned when the user's device would be
        done drafting them had it started at `since` (a perf_counter time; default now)."""
        started = time.perf_counter() if since is None else since
        tokens = self._draft(context, length)
        time.sleep(max(0.0, self.draft_seconds(length) - (time.perf_counter() - started)))
        return tokens

    def draft_seconds(self, length: int) -> float:
        """How long a user's device drafts `length` tokens: what the edge is busy for."""
        return length / self.tokens_per_second

    def next_token(self, context: list[int]) -> int:
        """The draft model's own next token after `context` (no wait: a by-product of drafting)."""
        return self._next_token(list(context))

    def _draft(self, context: list[int], length: int) -> list[int]:
        extended = list(context)
        for _ in range(length):
            extended.append(self._next_token(extended))
        return extended[len(context) :]

    def _next_token(self, context: list[int]) -> int:
        key = tuple(context)
        token = self._next.get(key)
        if token is None:
            with self._lock:
                started = time.perf_counter()
                token = self._drafter.draft("edge", context, 1)[0]
                self.step_seconds += time.perf_counter() - started
                self.steps += 1
            self._next[key] = token
        return token

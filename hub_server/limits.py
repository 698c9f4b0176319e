"""Per-user limits on tokens per minute, and a global cap on requests in flight. Plain Python, no torch.

Each user has a bucket that holds up to a minute's worth of tokens and refills continuously.
A request is admitted while the bucket is not empty, and the tokens of the work it was accepted for
are then taken, even into debt: a long prompt passes once and its user then waits, rather than
never passing at all. A refused request (malformed, too long, a busy session) takes nothing.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator

from hub_server.errors import HubFull, RateLimited
from hub_server.sessions import Owner


class TokenBudgets:
    def __init__(self, tokens_per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.tokens_per_minute = tokens_per_minute  # 0: unlimited
        self._rate = tokens_per_minute / 60.0  # tokens refilled per second
        self._clock = clock
        self._levels: dict[Owner, tuple[float, float]] = {}  # account -> (level, when)
        self._lock = threading.Lock()

    def check(self, user: Owner) -> None:
        """Raise RateLimited, with when to retry, while `user`'s bucket is empty (or in debt)."""
        if not self.tokens_per_minute:
            return
        with self._lock:
            level = self._level(user)
        if level <= 0:
            wait_s = max(1, math.ceil((1e-6 - level) / self._rate))
            raise RateLimited(
                f"user {user.name!r} has used this hub's {self.tokens_per_minute} tokens per minute; "
                f"retry in {wait_s} s",
                retry_after_s=wait_s,
            )

    def charge(self, user: Owner, tokens: int) -> None:
        """Take `tokens` the hub has taken on for `user`, even into debt; a request is charged
        only once it is accepted, so a refused one costs nothing."""
        if not self.tokens_per_minute or not tokens:
            return
        with self._lock:
            self._levels[user] = (self._level(user) - tokens, self._clock())

    def remaining(self, user: Owner) -> int | None:
        """Tokens `user` may still send now; None when unlimited."""
        if not self.tokens_per_minute:
            return None
        with self._lock:
            return max(0, math.floor(self._level(user)))

    def _level(self, user: Owner) -> float:
        level, when = self._levels.get(user, (float(self.tokens_per_minute), self._clock()))
        return min(float(self.tokens_per_minute), level + (self._clock() - when) * self._rate)


class AdmissionGate:
    """At most `limit` requests in flight at once (0: no cap); one more is answered HubFull at
    once rather than left to wait in a queue the client cannot see."""

    def __init__(self, limit: int):
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        with self._lock:
            if self.limit and self._in_flight >= self.limit:
                raise HubFull(f"the hub has {self.limit} requests in flight, its limit; retry in a moment")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

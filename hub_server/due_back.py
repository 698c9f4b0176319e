"""When client sessions are due back: the scheduler's record of each session's rhythm.

A client session's verify comes back a while after its pass ends (the reply's way to the edge,
drafting, the next request's way to the hub). The scheduler holds a batch for a session due back
within a pass's fixed cost (`Scheduler._returning_deadline`), so it asks "is anyone due between
these two times?" before every pass. A GPU hub keeps hundreds of sessions, so the answer comes
from indexes, not from a look at every session:
- due times of sessions with returns of their own (the median of their last few), sorted;
- the ends of passes of sessions with none yet, sorted (each due the usual return later: all
  sessions' recent median, which moves, so it is added at the question);
- the sessions away, in the order their last passes ended, to forget those away too long.

Plain Python, no torch; not thread-safe (the scheduler's lock guards it).
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

RETURNS_KEPT = 4  # a session's return time is the median of its last this many
USUAL_RETURNS_KEPT = 64  # ... or, before it has any, the median of all sessions' last this many
FORGET_AFTER_S = 600  # a session not seen this long is no longer expected


@dataclass
class _Rhythm:
    returns: list[float] = field(default_factory=list)  # its last few: pass end to next arrival
    entry: tuple[float, int, Any] | None = None  # its place in an index while it is away
    index: list[tuple[float, int, Any]] | None = None  # that index: `_own` or `_new`


class DueBack:
    """Client sessions (any hashable key) on their way back, and when each is due."""

    def __init__(self) -> None:
        self._rhythms: dict[Any, _Rhythm] = {}
        self._recent: deque[float] = deque(maxlen=USUAL_RETURNS_KEPT)  # all sessions' returns
        self._usual: float | None = None  # the median of `_recent`, kept as it changes
        self._own: list[tuple[float, int, Any]] = []  # (due time, order, key): sessions with returns
        self._new: list[tuple[float, int, Any]] = []  # (pass end, order, key): sessions with none yet
        # The sessions away: key -> when its last pass ended, in that order (one whose next job is
        # here is not in it).
        self._away: OrderedDict[Any, float] = OrderedDict()
        self._order = itertools.count()  # ties broken by arrival, never by comparing keys

    def __len__(self) -> int:
        return len(self._rhythms)

    @property
    def usual_return_s(self) -> float | None:
        """How long sessions usually take to come back after their pass (median of recent returns)."""
        return self._usual

    def arrived(self, key: Any, now: float) -> None:
        """`key`'s next job is here: its return is counted, and it is no longer on its way."""
        rhythm = self._rhythms.setdefault(key, _Rhythm())
        self._unindex(rhythm)
        done_at = self._away.pop(key, None)
        if done_at is not None:
            took = now - done_at
            rhythm.returns = (rhythm.returns + [took])[-RETURNS_KEPT:]
            self._recent.append(took)
            self._usual = statistics.median(self._recent)

    def done(self, key: Any, now: float) -> None:
        """`key`'s pass ended at `now` (a key that never arrived is not expected back)."""
        rhythm = self._rhythms.get(key)
        if rhythm is None:
            return
        self._unindex(rhythm)
        if rhythm.returns:
            rhythm.entry, rhythm.index = (now + statistics.median(rhythm.returns), next(self._order), key), self._own
        else:
            rhythm.entry, rhythm.index = (now, next(self._order), key), self._new
        bisect.insort(rhythm.index, rhythm.entry)
        self._away[key] = now  # the clock never goes back: the newest end goes last
        self._away.move_to_end(key)

    def forget(self, key: Any) -> None:
        """`key` has closed: it is not expected back."""
        rhythm = self._rhythms.pop(key, None)
        self._away.pop(key, None)
        if rhythm is not None:
            self._unindex(rhythm)

    def forget_away_since(self, now: float) -> None:
        """Forget the sessions away for longer than FORGET_AFTER_S."""
        while self._away:
            key, ended = next(iter(self._away.items()))
            if now - ended <= FORGET_AFTER_S:
                return
            self.forget(key)

    def anyone_due(self, earliest: float, latest: float) -> bool:
        """Whether a session on its way is due back between `earliest` and `latest`."""
        if _any_between(self._own, 0.0, earliest, latest):
            return True
        return self._usual is not None and _any_between(self._new, self._usual, earliest, latest)

    def _unindex(self, rhythm: _Rhythm) -> None:
        entry, index = rhythm.entry, rhythm.index
        rhythm.entry = rhythm.index = None
        if entry is None or index is None:
            return
        at = bisect.bisect_left(index, entry)
        if at < len(index) and index[at] == entry:
            del index[at]


def _any_between(entries: list[tuple[float, int, Any]], later: float, earliest: float, latest: float) -> bool:
    """Whether an entry's time, `later` seconds on, falls between `earliest` and `latest`."""
    at = bisect.bisect_left(entries, earliest, key=lambda entry: entry[0] + later)
    return at < len(entries) and entries[at][0] + later <= latest

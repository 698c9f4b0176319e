"""The record of when client sessions are due back: its indexes answer as a look at every session does."""

from __future__ import annotations

import random
import statistics

from hub_server.due_back import FORGET_AFTER_S, RETURNS_KEPT, USUAL_RETURNS_KEPT, DueBack


class EverySession:
    """The same record kept plainly: every question a look at every session."""

    def __init__(self) -> None:
        self.done_at: dict[int, float | None] = {}
        self.returns: dict[int, list[float]] = {}
        self.recent: list[float] = []

    def arrived(self, key: int, now: float) -> None:
        done_at = self.done_at.get(key)
        self.returns.setdefault(key, [])
        if done_at is not None:
            self.returns[key] = (self.returns[key] + [now - done_at])[-RETURNS_KEPT:]
            self.recent = (self.recent + [now - done_at])[-USUAL_RETURNS_KEPT:]
        self.done_at[key] = None

    def done(self, key: int, now: float) -> None:
        if key in self.done_at:
            self.done_at[key] = now
        for other in [k for k, at in self.done_at.items() if at is not None and now - at > FORGET_AFTER_S]:
            self.forget(other)

    def forget(self, key: int) -> None:
        self.done_at.pop(key, None)
        self.returns.pop(key, None)

    def anyone_due(self, earliest: float, latest: float) -> bool:
        usual = statistics.median(self.recent) if self.recent else None
        for key, done_at in self.done_at.items():
            if done_at is None:
                continue
            if self.returns[key]:
                due = done_at + statistics.median(self.returns[key])
            elif usual is None:
                continue
            else:
                due = done_at + usual
            if earliest <= due <= latest:
                return True
        return False


def test_the_indexes_answer_as_a_look_at_every_session_does():
    """Random walks of eight sessions arriving, ending passes, closing and being asked about."""
    answers = {True: 0, False: 0}
    for seed in range(400):
        rng, indexed, plain, now = random.Random(seed), DueBack(), EverySession(), 0.0
        for _ in range(80):
            operation, key = rng.choice(["arrived", "done", "forget", "ask"]), rng.randrange(8)
            now += rng.uniform(0.0, 100.0)  # sessions away 600 s are forgotten
            if operation == "arrived":
                indexed.arrived(key, now)
                plain.arrived(key, now)
            elif operation == "done":
                indexed.done(key, now)
                indexed.forget_away_since(now)
                plain.done(key, now)
            elif operation == "forget":
                indexed.forget(key)
                plain.forget(key)
            else:
                earliest = now + rng.uniform(-200.0, 200.0)
                latest = earliest + rng.uniform(0.0, 200.0)
                expected = plain.anyone_due(earliest, latest)
                assert indexed.anyone_due(earliest, latest) == expected, (seed, earliest, latest)
                answers[expected] += 1
            assert len(indexed) == len(plain.done_at)
    assert min(answers.values()) > 100, answers  # both answers asked for often

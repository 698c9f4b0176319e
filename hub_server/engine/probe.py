"""What one batched pass of the hub's runner costs, measured directly on scratch KV slots.

`hub_server bench` uses it for its bound (a one-token pass and a verify pass, each over all N
sessions, on the same device, dtype and cores as the hub it started), and
`benchmarks/verify_cost.py` prints it by sessions. Contexts are reset after each pass, so every
pass sees the same lengths; draft tokens are random (what a pass costs does not depend on what
it accepts).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from hub_server.config import HubSettings
from hub_server.engine.runner import ModelRunner
from hub_server.engine_api import VerifyJob
from hub_server.tree import chain_parents


class PassProbe:
    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        sessions: int = 64,
        context: int = 128,
        draft_tokens: int = 8,
        spread: int = 0,
    ):
        """Sessions' contexts average `context` tokens, spread evenly over `spread` tokens around
        it (a served batch mixes users at every point of their replies, and a pass is as wide as
        its longest past); any first k sessions are spread alike."""
        self.runner = ModelRunner(
            HubSettings(
                model=model,
                device=device,
                dtype=dtype,
                max_sessions=sessions,
                max_context=context + spread + draft_tokens + 8,
            )
        )
        self.draft_tokens = draft_tokens
        self._rng = np.random.default_rng(0)
        longest = [1] + self._random_tokens(context + spread // 2)
        golden = (5**0.5 - 1) / 2
        lengths = [max(2, round(context - spread / 2 + spread * ((i * golden) % 1))) for i in range(sessions)]
        self.contexts = [longest[:n] for n in lengths]
        self.slots = [self.runner.new_kv() for _ in range(sessions)]
        for slot, tokens in zip(self.slots, self.contexts):
            self.runner.prefill(slot, tokens)

    def pass_ms(self, sessions: int, draft_tokens: int, repeats: int = 5) -> float:
        """Median ms of a pass over `sessions` sessions, each with its last context token and
        `draft_tokens` draft tokens (0: the one-token step of autoregressive decoding)."""
        self._timed_pass(sessions, draft_tokens)  # a warm-up
        return statistics.median(self._timed_pass(sessions, draft_tokens) for _ in range(repeats))

    def pass_pair_ms(self, sessions: int, draft_tokens: int, repeats: int = 9) -> tuple[float, float]:
        """Median ms of a one-token pass and of a verify pass over `sessions` sessions, timed in
        turns: a machine that speeds up or slows down meanwhile moves both alike, so their ratio
        (the bench's bound) holds."""
        self._timed_pass(sessions, 0), self._timed_pass(sessions, draft_tokens)  # warm-ups
        pairs = [(self._timed_pass(sessions, 0), self._timed_pass(sessions, draft_tokens)) for _ in range(repeats)]
        return statistics.median(one for one, _ in pairs), statistics.median(verify for _, verify in pairs)

    def _timed_pass(self, sessions: int, draft_tokens: int) -> float:
        jobs = []
        for slot, context in zip(self.slots[:sessions], self.contexts):
            slot.length = len(context) - 1
            draft = self._random_tokens(draft_tokens)
            jobs.append(VerifyJob(slot, [context[-1]], draft, chain_parents(len(draft)), 0.0, 0, frozenset()))
        started = time.perf_counter()
        self.runner.verify_batch(jobs)  # waits for the device (the runner's device time does)
        return (time.perf_counter() - started) * 1000

    def _random_tokens(self, count: int) -> list[int]:
        return self._rng.integers(10, self.runner.vocab_size, count).tolist()

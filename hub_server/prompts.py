"""How many prompt tokens a worker's step may carry beside its verifies. Plain Python, no torch.

A step runs its verify batch, then chunks of the queued prompts (`scheduler.py`). Its verifies'
users wait for those chunks too, so the chunks of a step cost about `PROMPT_SHARE` of a verify
pass: measured as the worker runs (a verify pass's time, fading; a chunk's time by its tokens,
per token as chunks of the sizes run cost it), or fixed by the operator (`--max-pass-tokens`). The
measured budget grows at most twofold from the largest chunk timed, so a poor estimate can never
give one step a prompt's whole length.
"""

from __future__ import annotations

import threading

from hub_server.engine_api import VerifyJob

PROMPT_SHARE = 1.0  # a step's prompt chunks cost about this many verify passes
FIRST_PROMPT_TOKENS = 128  # before the worker has timed both kinds of work
MAX_PROMPT_TOKENS = 8192  # the most a step carries however cheap tokens seem
INLINE_PROMPT_TOKENS = 64  # a verify's or generation's new context up to this rides in its pass
MIN_AUTO_TOKENS = 32  # the least a measured budget gives a step's prompts
FADE = 0.9  # the measured times follow the device this fast


class PromptBudget:
    def __init__(self, max_pass_tokens: int = 0):
        self.max_pass_tokens = max_pass_tokens  # 0: measured
        self._verify_s: float | None = None  # a verify pass's time, fading
        self._chunk_s_per_token: float | None = None  # a chunk's time per token, fading (its fixed part included)
        self._largest_chunk = 0
        self._lock = threading.Lock()

    def record_verify(self, seconds: float) -> None:
        with self._lock:
            self._verify_s = _faded(self._verify_s, seconds)

    def record_chunk(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._chunk_s_per_token = _faded(self._chunk_s_per_token, seconds / max(1, tokens))
            self._largest_chunk = max(self._largest_chunk, tokens)

    def __call__(self, jobs: list[VerifyJob]) -> int:
        """Prompt tokens for a step whose verify batch is `jobs` (none: a verify may come any moment)."""
        if self.max_pass_tokens:
            return self.max_pass_tokens - sum(len(job.pending) + len(job.draft) for job in jobs)
        with self._lock:
            verify_s, per_token, largest = self._verify_s, self._chunk_s_per_token, self._largest_chunk
        if verify_s is None or not per_token:
            return FIRST_PROMPT_TOKENS
        # Per token as chunks of about this size cost it (their fixed part spread over them), so
        # the estimate holds near the sizes measured: it may at most double the largest one yet.
        tokens = PROMPT_SHARE * verify_s / per_token
        return int(min(MAX_PROMPT_TOKENS, 2 * largest, max(MIN_AUTO_TOKENS, tokens)))


def _faded(average: float | None, value: float) -> float:
    return value if average is None else FADE * average + (1 - FADE) * value

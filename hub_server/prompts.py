"""How many prompt tokens a worker's step may carry beside its verifies. Plain Python, no torch.

A step runs its verify batch, then chunks of the queued prompts (`scheduler.py`). Its verifies'
users wait for those chunks too, so the chunks of a step cost about `PROMPT_SHARE` of a verify
pass: measured as the worker runs (a verify pass's time, fading; a chunk's time by its tokens,
fitted as a fixed part plus a part per token), or fixed by the operator (`--max-pass-tokens`).
A chunk is never so small that its fixed cost outweighs its tokens, so a prompt beside busy
verifies still goes in at half its speed alone or better.
"""

from __future__ import annotations

import threading

from hub_server.engine_api import VerifyJob
from hub_server.pass_cost import PassCostFit

PROMPT_SHARE = 1.0  # a step's prompt chunks cost about this many verify passes
FIRST_PROMPT_TOKENS = 128  # before the worker has timed both kinds of work
MAX_PROMPT_TOKENS = 8192  # the most a step carries however cheap tokens seem
INLINE_PROMPT_TOKENS = 64  # a verify's or generation's new context up to this rides in its pass
FADE = 0.9  # the verify pass's time follows the device this fast


class PromptBudget:
    def __init__(self, max_pass_tokens: int = 0):
        self.max_pass_tokens = max_pass_tokens  # 0: measured
        self.chunks = PassCostFit()
        self._verify_s: float | None = None
        self._lock = threading.Lock()

    def record_verify(self, seconds: float) -> None:
        with self._lock:
            self._verify_s = seconds if self._verify_s is None else FADE * self._verify_s + (1 - FADE) * seconds

    def record_chunk(self, tokens: int, seconds: float) -> None:
        self.chunks.add(tokens, seconds)

    def __call__(self, jobs: list[VerifyJob]) -> int:
        """Prompt tokens for a step whose verify batch is `jobs` (none: a verify may come any moment)."""
        if self.max_pass_tokens:
            return self.max_pass_tokens - sum(len(job.pending) + len(job.draft) for job in jobs)
        per_token, fixed = self.chunks.per_token_s(), self.chunks.fixed_s()
        with self._lock:
            verify_s = self._verify_s
        if not per_token or verify_s is None or fixed is None:
            return FIRST_PROMPT_TOKENS
        # At least as many tokens as the chunk's fixed cost is worth: a prompt then goes in at half
        # its best speed or better, however costly a chunk's fixed part (on a CPU, the weights read).
        work_s = max(PROMPT_SHARE * verify_s - fixed, fixed)
        return int(min(MAX_PROMPT_TOKENS, work_s / per_token))

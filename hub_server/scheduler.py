"""Pipeline-aware batching of verify requests. Plain Python, no torch.

Requests from many sessions queue up; one worker thread takes whatever is ready, up to
`max_batch`, and hands it to the runner as one forward pass. While a batch runs, other users'
drafts (drafting on their own machines, or in flight) arrive and form the next batch, so the
device is never idle while work is queued. If fewer than `max_batch` are ready, the worker waits
at most `max_wait_s` after the oldest request arrived, so a lone user is never held back long.
The queue is first-in first-out: no session starves.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class SchedulerStats:
    batches: int = 0
    jobs: int = 0
    last_batch_size: int = 0


class Scheduler:
    def __init__(self, run_batch: Callable[[list[Any]], None], max_batch: int = 16,
                 max_wait_s: float = 0.002, clock: Callable[[], float] = time.monotonic):
        self._run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._clock = clock
        self._queue: deque[tuple[Any, Future, float]] = deque()
        self._ready = threading.Condition()
        self._stopped = False
        self.stats = SchedulerStats()
        self._worker = threading.Thread(target=self._loop, name="verify-scheduler", daemon=True)
        self._worker.start()

    def submit(self, job: Any) -> Future:
        """Queue `job`; the future resolves once its batch has run (to the job, or its error)."""
        future: Future = Future()
        with self._ready:
            if self._stopped:
                raise RuntimeError("the scheduler has stopped")
            self._queue.append((job, future, self._clock()))
            self._ready.notify()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify()
        self._worker.join(timeout=30)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)

    def _next_batch(self) -> list[tuple[Any, Future, float]] | None:
        with self._ready:
            while not self._queue and not self._stopped:
                self._ready.wait()
            if self._stopped and not self._queue:
                return None
            # Wait for a fuller batch, but never past max_wait_s after the oldest request came.
            deadline = self._queue[0][2] + self.max_wait_s
            while len(self._queue) < self.max_batch and not self._stopped:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            size = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(size)]

    def _run(self, batch: list[tuple[Any, Future, float]]) -> None:
        jobs = [job for job, _, _ in batch]
        try:
            self._run_batch(jobs)
        except Exception as exc:  # the batch's callers each receive the error; the worker goes on
            for _, future, _ in batch:
                future.set_exception(exc)
        else:
            for job, future, _ in batch:
                future.set_result(job)
        finally:
            self._record(len(batch))

    def _record(self, size: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.jobs += size
        stats.last_batch_size = size

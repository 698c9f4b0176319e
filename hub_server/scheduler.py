"""Pipeline-aware batching of verify requests. Plain Python, no torch.

Requests from many sessions queue up; one worker thread takes whatever is ready, up to
`max_batch`, and hands it to the runner as one forward pass. While a batch runs, other users'
drafts (drafting on their own machines, or in flight) arrive and form the next batch, so the
device is never idle while work is queued. The queue is first-in first-out: no session starves.

A batch waits for more only while more is known to be on its way: a caller announces a job it
is about to submit (`announce()`), and the worker waits for announced jobs at most `max_wait_s`
after the oldest queued request arrived (or, for requests that queued during a pass, after that
pass ended). A hub-side generation announces itself once for its whole life and passes its
announcement to `submit`: it counts as on its way whenever it has no job queued or running, so
the many generations that come back together after one pass (their reply streamed, their next
draft made) go to the device together again. It never waits for clients still drafting on their
own machines: nothing says when they will come, and what comes while a pass runs forms the next
batch anyway. So a lone request, or a queue that already holds every request the hub has
received, goes to the device at once.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator


@dataclass
class Announcement:
    """A caller that will submit (again) soon; see `Scheduler.announce`."""

    queued: bool = False   # its job is queued or on the device: not on its way
    closed: bool = False


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
        self._queue: deque[tuple[Any, Future, float, Announcement | None]] = deque()
        self._announced = 0     # jobs callers are preparing and will submit shortly
        self._free_since = clock()   # when the last pass ended
        self._ready = threading.Condition()
        self._stopped = False
        self.stats = SchedulerStats()
        self._worker = threading.Thread(target=self._loop, name="verify-scheduler", daemon=True)
        self._worker.start()

    @contextlib.contextmanager
    def announce(self) -> Iterator[Announcement]:
        """Around preparing jobs that will be submitted soon: a batch may wait for them. Pass the
        announcement to `submit` to stay announced between passes (a generation's loop)."""
        announcement = Announcement()
        with self._ready:
            self._announced += 1
        try:
            yield announcement
        finally:
            with self._ready:
                announcement.closed = True
                if not announcement.queued:
                    self._announced -= 1
                if not self._announced:   # a batch waiting for announced jobs can go now
                    self._ready.notify()

    def submit(self, job: Any, announcement: Announcement | None = None) -> Future:
        """Queue `job`; the future resolves once its batch has run (to the job, or its error)."""
        future: Future = Future()
        with self._ready:
            if self._stopped:
                raise RuntimeError("the scheduler has stopped")
            if announcement is not None and not announcement.closed and not announcement.queued:
                announcement.queued = True    # here now: no longer on its way
                self._announced -= 1
            else:
                announcement = None
            self._queue.append((job, future, self._clock(), announcement))
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

    def _next_batch(self) -> list[tuple[Any, Future, float, Announcement | None]] | None:
        with self._ready:
            while not self._queue and not self._stopped:
                self._ready.wait()
            if self._stopped and not self._queue:
                return None
            # Wait for announced jobs, but never past max_wait_s after the oldest request came or,
            # for requests that queued during a pass, after that pass ended: the callers it
            # served get as long to come back as a lone request would wait.
            deadline = max(self._queue[0][2], self._free_since) + self.max_wait_s
            while len(self._queue) < self.max_batch and self._announced and not self._stopped:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._ready.wait(remaining)
            size = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(size)]

    def _run(self, batch: list[tuple[Any, Future, float, Announcement | None]]) -> None:
        jobs = [job for job, _, _, _ in batch]
        try:
            self._run_batch(jobs)
        except Exception as exc:  # the batch's callers each receive the error; the worker goes on
            self._reannounce(batch)
            for _, future, _, _ in batch:
                future.set_exception(exc)
        else:
            self._reannounce(batch)
            for job, future, _, _ in batch:
                future.set_result(job)
        finally:
            self._free_since = self._clock()
            self._record(len(batch))

    def _reannounce(self, batch: list[tuple[Any, Future, float, Announcement | None]]) -> None:
        """Callers still announced are on their way again the moment their pass is done."""
        with self._ready:
            for _, _, _, announcement in batch:
                if announcement is not None:
                    announcement.queued = False
                    if not announcement.closed:
                        self._announced += 1

    def _record(self, size: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.jobs += size
        stats.last_batch_size = size

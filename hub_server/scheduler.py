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
own machines unless one is due back soon (below); what comes while a pass runs forms the next
batch anyway. So a lone request, or a queue that already holds every request the hub has
received, goes to the device at once.

Returning users. A client session submits with its `key` (the session id). The scheduler learns
how long each one takes to come back after its pass ends (drafting plus the round trip: the
median of its last few returns; for a new session, the median of all users' recent returns) and
so when it is next due. A pass costs a fixed part whatever it carries (on a GPU nearly all of it:
kernel launches; on a CPU reading the weights) plus a part per token and one per position its
tokens attend; the runner fits them to the passes it has run (`pass_cost.PassCostFit`) and the
scheduler reads the fixed part. When
the device comes free and a user is due back within `merge_share` of that fixed part (the
window), the batch waits for them: their verify then shares this pass instead of paying a pass of
its own moments later, so the wait costs the device no more than it saves (`--merge-wait-share 1`
by default). Users who come back together reach the engine one by one, each through a front end,
so while they keep coming the window runs from the latest, up to twice its length in all: a group
shares one pass, not two. Users who think longer than that, or whose return time is not yet
known, are never waited for.

Prompts. A session's prompt (a feed, the context a verify or a generation brings, a session
rebuilt after eviction) is scheduled work too, never a call that holds the device for its whole
length: `submit_prompt` queues it, and each step of the worker runs the verify batch first, then
chunks of the queued prompts up to a token budget (`prompt_budget`, asked with the step's verify
jobs), shared between the prompts in turn. A step of chunks alone starts only while no verify is
queued (not while a batch waits for company). So a verify waits for at most the step's chunks
on the device when it came, and no prompt waits for another's whole prefill.

Composition. A pass pads every row to its widest, so a verify that brings new context (a turn's
text, up to `INLINE_PROMPT_TOKENS`) would make every other row of its pass as costly. The
scheduler decides who shares the pass (`Composition`): such a row's context, all but its last
token, goes first in passes of its own (`run_feed`) when the padding saved outweighs what the
extra passes cost, and always when the row is wider than the device's passes are built for. The
engine runs exactly the passes it is given. A step is what the worker runs next, in order: those
feeds, the verify pass, the prompt chunks (`Step`).

Drivers. Who runs the steps is the scheduler's one choice of three, the decisions the same:
- an event loop (`loop=`): the engine process's, for a worker whose passes run in that process.
  Steps run on the loop itself, between its turns, so the requests' handling and the passes
  never wait on each other for a thread's wake-up or the GIL, and everything that arrived during
  a pass is read in the next turn, before the next step is decided. After a step, the loop turns
  `ANSWER_TURNS` more times (its callers answer) before it decides the next;
- a thread of its own (the default): a worker whose passes are calls to another process (a Ray
  actor), which the loop must not wait on;
- a driver in virtual time (`worker=False`: the fleet simulation) takes the very same steps from
  `poll`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hub_server.due_back import DueBack


@dataclass
class Announcement:
    """A caller that will submit (again) soon; see `Scheduler.announce`."""

    queued: bool = False  # its job is queued or on the device: not on its way
    closed: bool = False


@dataclass
class SchedulerStats:
    batches: int = 0
    jobs: int = 0
    last_batch_size: int = 0
    merge_waits: int = 0  # batches that waited for a user due back
    merge_wait_seconds: float = 0.0


MIN_PROMPT_CHUNK = 16  # the least a queued prompt advances in a step it takes part in
# Turns of the event loop let go by after a step; the next is decided in the turn after them. A
# verify's answer leaves in the second turn after its pass (its task's wake-up, then the frame's
# flush: `finished` wakes the task from the pass's own turn), and so before the next pass.
ANSWER_TURNS = 2
MIN_TIMER_S = 0.001  # an event loop's timers count milliseconds (uvloop): a shorter one would spin


@dataclass
class _Queued:
    """A submitted job waiting for its pass."""

    job: Any
    future: Future
    arrived: float  # the clock when it was submitted
    announcement: Announcement | None  # a caller staying announced between passes
    key: Any  # the client session it belongs to, or None


@dataclass(eq=False)
class Prompt:
    """A prompt brought into a session's KV in chunks; `future` resolves (to None) once all of it
    is in or it was cancelled, or to the error of the chunk that failed."""

    job: Any  # what `run_prompt` feeds (the hub's: the session)
    tokens: int  # still to feed
    arrived: float
    future: Future = field(default_factory=Future)
    cancelled: bool = False
    started: bool = False  # it has had a chunk


async def finished(future: Future) -> Any:
    """Wait on the event loop for a scheduler's future: its result, or its error. A cancelled wait
    leaves the future as it is (its pass goes on, its callbacks run). A future resolved on this
    loop's own thread (a scheduler the loop drives) wakes the waiter in the same turn; one resolved
    on another thread (a scheduler's own) wakes it through the loop, as `asyncio.wrap_future`
    does, which always takes that way, and with `asyncio.shield` two turns more."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    loop_thread = threading.get_ident()

    def done(resolved: Future) -> None:
        if threading.get_ident() == loop_thread:
            _pass_on(resolved, waiter)
        elif not loop.is_closed():  # closed: the hub has stopped, nobody waits
            loop.call_soon_threadsafe(_pass_on, resolved, waiter)

    future.add_done_callback(done)
    return await waiter


def _pass_on(resolved: Future, waiter: asyncio.Future) -> None:
    if waiter.done():  # its wait was cancelled
        return
    if resolved.cancelled():
        waiter.cancel()
    elif (error := resolved.exception()) is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(resolved.result())


async def settled(prompt: Prompt) -> None:
    """Wait on the event loop for a queued prompt to be all in (its error, if a chunk failed).
    A cancelled wait leaves the prompt queued: its caller cancels it (`Scheduler.cancel_prompt`)."""
    await finished(prompt.future)


# A batch pads every row to its widest, so one session's new context would make every other
# session's draft as costly as that context. Its context goes in passes of its own first when the
# padding saved outweighs what the extra passes cost beyond their tokens, counted in tokens. On a
# CPU a pass costs its tokens plus about two (the logits of its last token); on a GPU a small pass
# costs mostly its launches (~35 ms for Gemma 3 270M on an H100, flat from 1 to 16 sessions),
# worth thousands of padded tokens.
PASS_OVERHEAD_TOKENS = {"cuda": 4096, "cpu": 2}


def feed_apart(rows: list[tuple[int, int]], pass_overhead: int) -> list[int]:
    """Which rows' pending tokens (all but the last) to feed in passes of their own before a
    batched pass, so that the batch is not padded to long prompts.

    rows: (pending, draft) token counts per row. Taking out the k widest rows narrows the
    padded batch; it pays when the tokens saved exceed those rows' prefixes plus k extra
    passes' overhead (`pass_overhead` tokens each). Returns the rows of the k that saves most.
    """
    widths = [pending + draft for pending, draft in rows]
    order = sorted(range(len(rows)), key=lambda b: -widths[b])
    best, best_saving, fed = 0, 0, 0
    for k, b in enumerate(order, start=1):
        pending = rows[b][0]
        if pending <= 1:  # nothing to take out: no narrower batch beyond this row
            break
        fed += pending - 1 + pass_overhead
        rest = max([widths[c] for c in order[k:]] + [1 + rows[c][1] for c in order[:k]])
        saving = len(rows) * (widths[order[0]] - rest) - fed
        if saving > best_saving:
            best, best_saving = k, saving
    return order[:best]


@dataclass(frozen=True)
class Composition:
    """What a worker's scheduler knows of its device's passes, to compose them."""

    overhead_tokens: int  # what a pass costs beyond its tokens, counted in tokens
    widest_row: int  # the widest row a verify pass is built for (a compiled pass's widest shape)

    @classmethod
    def of(cls, device: str, widest_row: int) -> Composition:
        """For a worker on `device`: cuda or cuda:N pays a GPU's launches, anything else a CPU's pass."""
        return cls(PASS_OVERHEAD_TOKENS["cuda" if device.startswith("cuda") else "cpu"], widest_row)

    def apart(self, rows: list[tuple[int, int]]) -> list[int]:
        """The rows, (pending, draft) token counts, whose pending context but its last token goes
        in passes of its own first: where that saves padding, and wherever a row is wider than a
        pass is built for."""
        wide = {b for b, (pending, draft) in enumerate(rows) if pending > 1 and pending + draft > self.widest_row}
        return sorted(wide.union(feed_apart(rows, self.overhead_tokens)))


@dataclass
class Step:
    """What a worker runs next, in this order: for each job of `apart`, its pending context but
    the last token, fed in passes of its own (the job keeps that last token); one verify pass of
    `batch` (none when it is empty); then `chunks` of queued prompts, (prompt, tokens) each."""

    queued: list[_Queued]
    apart: list[Any]
    chunks: list[tuple[Prompt, int]]

    @property
    def batch(self) -> list[Any]:
        return [queued.job for queued in self.queued]


class Scheduler:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], None],
        max_batch: int = 16,
        max_wait_s: float = 0.002,
        merge_share: float = 1.0,
        pass_fixed_s: Callable[[], float | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        on_pass: Callable[[list[float]], None] = lambda waits: None,
        worker: bool = True,
        run_prompt: Callable[[Any, int], None] | None = None,
        prompt_budget: Callable[[list[Any]], int] = lambda jobs: 512,
        on_prompt_step: Callable[[int, list[float]], None] = lambda tokens, waits: None,
        composition: Composition | None = None,
        run_feed: Callable[[Any], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        if composition is not None and worker and run_feed is None:
            raise ValueError("a scheduler that takes rows out of a pass needs run_feed to feed them")
        self._run_batch = run_batch
        # Who shares a verify pass (None: every job of a batch in one pass, as it came); the jobs
        # are then `engine_api.VerifyJob`s, and `run_feed(job)` feeds one's pending context but
        # its last token in passes of its own.
        self.composition = composition
        self._run_feed = run_feed
        self._run_prompt = run_prompt  # feeds `tokens` more of a prompt's job; none: no prompts here
        self.prompt_budget = prompt_budget  # prompt tokens a step may carry beside these verify jobs
        self._on_prompt_step = on_prompt_step  # told each step's prompt tokens, and first chunks' waits
        self._prompts: deque[Prompt] = deque()
        self._on_pass = on_pass  # told, as each pass starts, how long each of its jobs queued
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.merge_share = merge_share
        self._clock = clock
        self._queue: deque[_Queued] = deque()
        self._due_back = DueBack()  # client sessions on their way back, and when each is due
        self.pass_fixed_s = pass_fixed_s  # the device's fixed cost per pass (the runner's fit)
        self._announced = 0  # jobs callers are preparing and will submit shortly
        self._free_since = clock()  # when the last pass ended
        self._ready = threading.Condition()
        self._stopped = False
        self._merge_wait_from: float | None = None  # when the next batch began waiting for a user due back
        self._running: list[_Queued] = []  # the batch `poll` handed out, until `finish`
        self.stats = SchedulerStats()
        # loop: steps run on that event loop (see the module doc), no thread. worker=False: no
        # thread either; a driver in virtual time (the fleet simulation) calls `poll` and `finish`
        # itself, with `clock` its own, so the very same batching decisions run.
        self._event_loop = loop
        self._loop_thread: int | None = None  # the loop's thread, once it has run a step
        self._driving = False  # a look at the queue is due on the loop (or a step is running there)
        self._timer: asyncio.TimerHandle | None = None  # a look when a waiting batch's time is up
        if loop is not None:
            worker = False
        self._worker = threading.Thread(target=self._loop, name="verify-scheduler", daemon=True) if worker else None
        if self._worker is not None:
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
                if not self._announced:  # a batch waiting for announced jobs can go now
                    self._notify()

    def submit(self, job: Any, announcement: Announcement | None = None, key: Any = None) -> Future:
        """Queue `job`; the future resolves once its batch has run (to the job, or its error).
        `key` names a client session that comes back after each reply (see the module doc)."""
        future: Future = Future()
        with self._ready:
            if self._stopped:
                raise RuntimeError("the scheduler has stopped")
            now = self._clock()
            if announcement is not None and not announcement.closed and not announcement.queued:
                announcement.queued = True  # here now: no longer on its way
                self._announced -= 1
            else:
                announcement = None
            if key is not None:
                self._due_back.arrived(key, now)
            self._queue.append(_Queued(job, future, now, announcement, key))
            self._notify()
        return future

    def usual_return_s(self) -> float | None:
        """How long users usually take to come back after their pass (median of recent returns)."""
        with self._ready:
            return self._due_back.usual_return_s

    def forget(self, key: Any) -> None:
        """The session `key` has closed: stop expecting it."""
        with self._ready:
            self._due_back.forget(key)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def prompts_queued(self) -> int:
        return len(self._prompts)

    def stop(self) -> None:
        with self._ready:
            self._stopped = True
            self._notify()
        if self._worker is not None:
            self._worker.join(timeout=30)

    def poll(self) -> Step | float | None:
        """Without blocking, for a driver of a scheduler made with `worker=False`: the step to run
        now (once its feeds and verify pass have run, call `finish`; once each chunk has run,
        `chunk_done`), or the clock time to look again (a batch is waiting for someone), or None
        (nothing queued: look again after a `submit`)."""
        with self._ready:
            step = self._step_now()
            if not isinstance(step, Step):
                return step
            self._running = step.queued
        if step.queued:
            self._on_pass([self._clock() - queued.arrived for queued in step.queued])
        self._begin_prompts(step.chunks)
        return step

    def finish(self, error: BaseException | None = None) -> None:
        """The verify pass `poll` handed out has run (or failed with `error`): resolve its futures."""
        batch, self._running = self._running, []
        self._finish(batch, error)

    def chunk_done(self, prompt: Prompt, tokens: int, error: BaseException | None = None) -> None:
        """A chunk of `tokens` of `prompt` has run (or failed with `error`): the prompt is all in,
        or queued again behind the others."""
        if error is not None:
            prompt.future.set_exception(error)
        else:
            with self._ready:
                prompt.tokens -= tokens
                if prompt.tokens <= 0 or prompt.cancelled:
                    prompt.future.set_result(None)
                else:
                    self._prompts.append(prompt)
        self._free_since = self._clock()

    def submit_prompt(self, job: Any, tokens: int) -> Prompt:
        """Queue a prompt of `tokens` tokens for `job`; steps feed it in chunks beside verifies."""
        if self._run_prompt is None and self._worker is not None:
            raise RuntimeError("this scheduler runs no prompts")
        with self._ready:
            if self._stopped:
                raise RuntimeError("the scheduler has stopped")
            prompt = Prompt(job, tokens, self._clock())
            self._prompts.append(prompt)
            self._notify()
        return prompt

    def cancel_prompt(self, prompt: Prompt) -> None:
        """Take no more chunks of `prompt` (its caller went away); a chunk on the device now ends first."""
        with self._ready:
            prompt.cancelled = True
            if prompt in self._prompts:  # not in the step running now: done at once
                self._prompts.remove(prompt)
                prompt.future.set_result(None)

    def _notify(self) -> None:
        """Work came, or a wait ended (under the lock, on any thread): the driver looks again."""
        self._ready.notify()
        if self._event_loop is None or self._driving:
            return
        self._driving = True
        if threading.get_ident() == self._loop_thread:
            self._event_loop.call_soon(self._drive)
        else:
            self._event_loop.call_soon_threadsafe(self._drive)

    def _loop(self) -> None:
        while (step := self._next_step()) is not None:
            self._run_step(step)

    def _run_step(self, step: Step) -> None:
        if step.queued:
            self._run(step)
        if step.chunks:
            self._run_prompts(step.chunks)

    # --- driven by an event loop ------------------------------------------------------------
    def _drive(self, turns: int = 0) -> None:
        """On the loop: run the step due now, then look again once its answers have left; or
        look again when a waiting batch's time is up; or rest until `_notify`."""
        assert self._event_loop is not None
        if turns:
            self._event_loop.call_soon(self._drive, turns - 1)
            return
        self._loop_thread = threading.get_ident()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A step that raises past its own handling (a bug) is the loop's to log, and the driver
        # goes on (the next look is due after it, or at the next `_notify`): a worker's passes
        # never stop for good.
        with self._ready:
            try:
                step = self._step_now()  # None once nothing is queued, stopped or not
            except BaseException:
                self._driving = False
                raise
            if not isinstance(step, Step):
                self._driving = False
                if step is not None:
                    delay = max(MIN_TIMER_S, step - self._clock())
                    self._timer = self._event_loop.call_later(delay, self._time_up)
                return
        try:
            self._run_step(step)
        finally:
            self._event_loop.call_soon(self._drive, ANSWER_TURNS)

    def _time_up(self) -> None:
        self._timer = None
        with self._ready:
            if self._driving:  # a look is already due
                return
            self._driving = True
        self._drive()

    def _next_step(self) -> Step | None:
        """The next step (waiting until there is one); None once stopped with nothing queued."""
        with self._ready:
            while True:
                if self._stopped and not self._queue and not self._prompts:
                    return None
                step = self._step_now()
                if isinstance(step, Step):
                    return step
                self._ready.wait(None if step is None else max(0.0, step - self._clock()))

    def _step_now(self) -> Step | float | None:
        """The step to run now (under the lock), or when to look again, or None: nothing queued."""
        plan = self._plan(self._clock())
        if isinstance(plan, list):
            jobs = [queued.job for queued in plan]
            return Step(plan, self._apart(jobs), self._carve(jobs))
        if self._prompts and not self._queue:  # the device would idle: a chunk goes now
            return Step([], [], self._carve([]))
        # A batch waiting for company waits: a chunk now would hold its queued verifies back a
        # whole chunk (about a verify pass) for a wait of at most max_wait_s or the merge wait.
        return plan

    def _apart(self, jobs: list[Any]) -> list[Any]:
        """The verify jobs whose pending context goes in passes of their own before the batch's."""
        if self.composition is None:
            return []
        rows = [(len(job.pending), len(job.draft)) for job in jobs]
        return [jobs[b] for b in self.composition.apart(rows)]

    def _carve(self, jobs: list[Any]) -> list[tuple[Prompt, int]]:
        """Chunks of the queued prompts for one step (under the lock): the budget goes to the
        prompts in turn, the next step starting with the next prompt, so several prompts take
        steps in turn (each chunk a forward of its own: one prompt a step pays its fixed cost once)."""
        if not self._prompts:
            return []
        budget = max(MIN_PROMPT_CHUNK, self.prompt_budget(jobs))
        chunks: list[tuple[Prompt, int]] = []
        for prompt in list(self._prompts):
            if budget <= 0:
                break
            size = min(prompt.tokens, budget)
            chunks.append((prompt, size))
            budget -= size
        for prompt, _ in chunks:
            self._prompts.remove(prompt)  # back at the end once its chunk is in, unless it is done
        return chunks

    def _run_prompts(self, chunks: list[tuple[Prompt, int]]) -> None:
        self._begin_prompts(chunks)
        assert self._run_prompt is not None
        for prompt, size in chunks:
            try:
                self._run_prompt(prompt.job, size)
            except Exception as exc:  # this prompt's caller receives the error; the others go on
                self.chunk_done(prompt, size, exc)
            else:
                self.chunk_done(prompt, size)

    def _begin_prompts(self, chunks: list[tuple[Prompt, int]]) -> None:
        """A step's prompt chunks start: their tokens, and how long the prompts starting now waited."""
        if not chunks:
            return
        now = self._clock()
        waits = [now - prompt.arrived for prompt, _ in chunks if not prompt.started]
        for prompt, _ in chunks:
            prompt.started = True
        self._on_prompt_step(sum(size for _, size in chunks), waits)

    def _plan(self, now: float) -> list[_Queued] | float | None:
        """The batching decision at `now` (under the lock): the batch to run now, taken off the
        queue; or when to decide again (a float); or None while nothing is queued."""
        if not self._queue:
            return None
        # Wait for announced jobs, but never past max_wait_s after the oldest request came or,
        # for requests that queued during a pass, after that pass ended: the callers it served
        # get as long to come back as a lone request would wait.
        start = max(self._queue[0].arrived, self._free_since)
        if len(self._queue) >= self.max_batch or self._stopped:
            return self._take(now)
        if self._announced and now < start + self.max_wait_s:
            return start + self.max_wait_s
        held_until = self._returning_deadline(start, now)
        if held_until is not None:
            if self._merge_wait_from is None:
                self._merge_wait_from = now
            return held_until
        return self._take(now)

    def _take(self, now: float) -> list[_Queued]:
        if self._merge_wait_from is not None:
            self.stats.merge_waits += 1
            self.stats.merge_wait_seconds += now - self._merge_wait_from
            self._merge_wait_from = None
        size = min(self.max_batch, len(self._queue))
        return [self._queue.popleft() for _ in range(size)]

    def _returning_deadline(self, start: float, now: float) -> float | None:
        """Until when to hold the batch for client sessions due back within `merge_share` of a
        pass's fixed cost (after `start`: when the device came free or the oldest request came);
        None when no one is due that soon."""
        fixed = self.pass_fixed_s()
        if not fixed or self.merge_share <= 0:
            return None
        window = self.merge_share * fixed
        # Users who come back together reach the engine one by one (each through a front end):
        # while they keep coming the window runs from the latest, up to twice its length in all.
        deadline = min(max(start, self._queue[-1].arrived) + window, start + 2 * window)
        if now >= deadline:
            return None
        return deadline if self._due_back.anyone_due(start - window, deadline) else None

    def _run(self, step: Step) -> None:
        """The step's feeds apart and its verify pass; a failure of either fails the whole batch."""
        now = self._clock()
        try:
            self._on_pass([now - queued.arrived for queued in step.queued])
            for job in step.apart:
                assert self._run_feed is not None
                self._run_feed(job)
                job.pending = job.pending[-1:]
            self._run_batch(step.batch)
        except Exception as exc:  # the batch's callers each receive the error; the worker goes on
            self._finish(step.queued, exc)
        else:
            self._finish(step.queued, None)

    def _finish(self, batch: list[_Queued], error: BaseException | None) -> None:
        self._done(batch)
        for queued in batch:
            if error is None:
                queued.future.set_result(queued.job)
            else:
                queued.future.set_exception(error)
        self._free_since = self._clock()
        self._record(len(batch))

    def _done(self, batch: list[_Queued]) -> None:
        """Callers still announced are on their way again the moment their pass is done; client
        sessions start their way back."""
        with self._ready:
            now = self._clock()
            for queued in batch:
                announcement, key = queued.announcement, queued.key
                if announcement is not None:
                    announcement.queued = False
                    if not announcement.closed:
                        self._announced += 1
                if key is not None:
                    self._due_back.done(key, now)
            self._due_back.forget_away_since(now)

    def _record(self, size: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.jobs += size
        stats.last_batch_size = size

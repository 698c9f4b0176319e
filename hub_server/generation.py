"""A server-only generation (`POST /generate`): its chunks as an async iterator that holds its
session's turn from the first check to `aclose`, however the stream ends. Plain Python, no torch.

Each step is one verify pass through the worker's scheduler, awaited on the event loop (no thread
waits for the device). A pass's result is applied to the session by the pass's own callback, so
the session's context and KV stay in step even when the client goes away mid-pass; the turn is
released once that pass is applied, so a dropped stream never leaves its session locked.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from concurrent.futures import Future
from typing import TYPE_CHECKING

import anyio

from hub_server import protocol as wire
from hub_server.engine_api import VerifyJob
from hub_server.errors import WorkerLost
from hub_server.prompts import INLINE_PROMPT_TOKENS
from hub_server.scheduler import Announcement, Prompt, finished, settled
from hub_server.sessions import Owner, Session
from hub_server.tree import chain_parents

if TYPE_CHECKING:
    from hub_server.placement import Worker
    from hub_server.service import Hub


class Generation:
    """The chunks of one generation; the caller must `aclose` it (the app's stream does, always)."""

    def __init__(self, hub: Hub, session: Session, request: wire.GenerateRequest, owner: Owner, arrived: float):
        self._hub = hub
        self._session = session
        self._request = request
        self._owner = owner
        self._arrived = arrived
        self._prompt: Prompt | None = None  # the prompt it sent, fed in chunks
        self._in_flight: Future | None = None  # the last work it queued (a prompt or a pass)
        self._closed = False
        self._chunks = self._produce()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> wire.GenerateChunk:
        return await self._chunks.__anext__()

    async def aclose(self) -> None:
        """End the generation and give up the session's turn (once work in flight is applied)."""
        if self._closed:
            return
        self._closed = True
        await self._chunks.aclose()
        # Released after the last pass's own callback, so once that pass is applied.
        self._hub.workers.let_go(self._session, self._prompt, last_work=self._in_flight)

    async def _produce(self) -> AsyncGenerator[wire.GenerateChunk, None]:
        session, request = self._session, self._request
        await self._bring_up()  # the request's tokens are in the context (`Hub.generate`)
        produced = verifies = rehomed = 0
        stopped = False
        while produced < request.max_tokens and not stopped:
            worker = self._hub.workers.of(session)
            try:
                # Announced for its whole life on a worker: between passes (streaming a chunk,
                # drafting) the next batch may wait briefly for this session, so concurrent
                # generations share passes.
                with worker.scheduler.announce() as announcement:
                    while produced < request.max_tokens and not stopped:
                        job = await self._next_job(request.max_tokens - produced - 1)
                        await self._run(worker, job, announcement)
                        produced += len(job.emitted)
                        verifies += 1
                        if verifies == 1:
                            elapsed = time.perf_counter() - self._arrived
                            self._hub.metrics.time_to_first_token.labels(request.mode).observe(elapsed)
                        yield wire.GenerateChunk(tokens=job.emitted)
                        stopped = job.emitted[-1] in session.stop_token_ids
            except WorkerLost:
                # The hub holds the whole context, so it does what a client's recovery would:
                # a slot on a live worker, the context fed there, the stream goes on.
                rehomed += 1
                if rehomed > len(self._hub.workers):
                    raise
                await anyio.to_thread.run_sync(self._hub.rehome, session, worker, limiter=self._hub.engine_calls)
                await self._bring_up()  # its whole context, on the worker it moved to
        yield wire.GenerateChunk(tokens=[], done=True, verifies=verifies, context_len=len(session.context))

    async def _bring_up(self) -> None:
        """The context not yet in the session's KV goes in as a prompt, in chunks beside other
        sessions' verifies (a short one rides in the next pass)."""
        self._prompt = self._hub.workers.submit_prompt(self._session, inline=INLINE_PROMPT_TOKENS)
        if self._prompt is not None:
            self._in_flight = self._prompt.future
            await settled(self._prompt)

    async def _next_job(self, room: int) -> VerifyJob:
        """The next verify (`room`: tokens it may emit beyond its bonus one), drafted by the
        hub's own draft model in the speculative mode (on a thread of the engine pool)."""
        session, request, drafter = self._session, self._request, self._hub.drafter
        draft: list[int] = []
        if request.mode == "speculative" and room > 0 and drafter is not None:
            length = min(request.draft_len, room)
            context = list(session.context)
            draft = await anyio.to_thread.run_sync(
                drafter.draft, session.session_id, context, length, limiter=self._hub.engine_calls
            )
        return await self._hub.verify_job(session, draft, chain_parents(len(draft)))

    async def _run(self, worker: Worker, job: VerifyJob, announcement: Announcement) -> None:
        """One pass for `job`; its result applied by the pass's callback, even if this is cancelled."""
        started = time.perf_counter()
        future = worker.scheduler.submit(job, announcement)
        self._in_flight = future
        future.add_done_callback(lambda done: self._apply(job, done, started))
        self._hub.budgets.charge(self._owner, len(job.draft) + 1)
        # Callbacks run in the order they were added: the result is applied before this wakes.
        await finished(future)

    def _apply(self, job: VerifyJob, done: Future, started: float) -> None:
        """The pass is over (where its scheduler runs passes): the session takes its tokens."""
        if done.exception() is None:
            self._hub.apply_pass(self._session, job, self._request.mode, time.perf_counter() - started)

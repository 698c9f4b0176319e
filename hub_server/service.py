"""What the hub does for each request, checked; independent of HTTP and of torch (the engine is
reached only through `engine_api.Engine`).

The hub's front end serves one or more workers (`supervision.py`): each a device with its engine
and its own batch scheduler. Accounts, per-user limits and the session table are the front end's,
one set for all workers; a session's feeds, verifies and generations go to the worker it was
placed on. Server-only generations are `generation.py`'s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from hub_server import protocol as wire
from hub_server.accounts import TokenCheck
from hub_server.checks import check_draft, check_ids, check_open, check_opening, check_room
from hub_server.config import HubSettings
from hub_server.engine_api import Engine, VerifyJob
from hub_server.errors import (
    BadRequest,
    RateLimited,
    SessionNotFound,
)
from hub_server.generation import Generation
from hub_server.limits import AdmissionGate, TokenBudgets
from hub_server.metrics import HubCollector, HubFigures, HubMetrics
from hub_server.placement import Worker
from hub_server.prompts import INLINE_PROMPT_TOKENS
from hub_server.retirement import Retirement
from hub_server.scheduler import finished, settled
from hub_server.sessions import LOCAL_OWNER, Owner, Session, SessionStore
from hub_server.supervision import Workers
from hub_server.tree import node_depths
from hub_server.vocabulary import Vocabulary
from specedge_common.grammar import Constraint, GrammarError, grammar_tokenizer, prepare_grammar_tokenizer

if TYPE_CHECKING:
    from hub_server.engine.drafter import HubDrafter

log = logging.getLogger("hub_server")

# Threads for engine calls that block (the hub's own drafting, a lost worker's session placed again,
# KV given back to a remote worker): a pool of their own, so they never take the threads that quick
# routes (tokens, info, opening a session) run on. Waiting for a session's turn or a pass takes none.
ENGINE_CALL_THREADS = 16


class Hub:
    def __init__(
        self,
        settings: HubSettings,
        engines: Sequence[Engine],
        metrics: HubMetrics | None = None,
        accounts: TokenCheck | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        """`loop`: the event loop the hub's requests run on, where the passes of workers in this
        process then run too (`scheduler.py`, Drivers); None: on their schedulers' threads."""
        if not engines:
            raise ValueError("a hub needs at least one engine")
        self.settings = settings
        # Every worker loads the same target: the first one states its name, vocabulary and context.
        self.engine = engines[0]
        self.sessions = SessionStore()
        self.metrics = metrics or HubMetrics()
        self.drafter = make_drafter(settings, self.engine.device_lock)
        self.retirement = Retirement(settings, self.sessions, self.metrics, accounts, self.drafter)
        self.workers = Workers(settings, engines, self.sessions, self.metrics, self.retirement.forget, loop)
        self.retirement.start(self.workers)
        self.metrics.registry.register(HubCollector(self._figures, self.workers.engine_stats))
        self.budgets = TokenBudgets(settings.tokens_per_minute)
        self.gate = AdmissionGate(settings.max_queue_depth)
        self.engine_calls = anyio.CapacityLimiter(ENGINE_CALL_THREADS)
        self._admission = threading.Lock()  # the session caps are checked and taken as one step

    def info(self) -> wire.HubInfo:
        return wire.HubInfo(
            protocol_version=wire.PROTOCOL_VERSION,
            model=self.engine.name,
            vocab_size=self.engine.vocab.size,
            vocab_fingerprint=self.engine.vocab.fingerprint,
            max_draft_tokens=self.settings.max_draft_tokens,
            max_context=self.engine.max_context,
            modes=["specedge", "autoregressive"] + (["speculative"] if self.drafter else []),
            workers=self.workers.ready_count(),
            draft_hint=wire.DraftHint(**vars(self.settings.draft_hint)) if self.settings.draft_hint else None,
        )

    def metrics_page(self) -> bytes:
        """The Prometheus text page of this hub's registry."""
        return self.metrics.page()

    def health(self) -> tuple[dict, bool]:
        """/health's body, and whether the hub serves (a hub whose every worker is lost does not)."""
        workers = self.workers.ready_count()
        body = {"status": "ok", "model": self.engine.name, "workers": workers.model_dump()}
        return (body, True) if workers.ready else ({**body, "status": "degraded"}, False)

    def listing(self) -> wire.WorkerList:
        return self.workers.listing()

    def drain(self, worker_id: str) -> wire.WorkerInfo:
        return self.workers.drain(worker_id)

    def undrain(self, worker_id: str) -> wire.WorkerInfo:
        return self.workers.undrain(worker_id)

    def _figures(self) -> HubFigures:
        """The hub-wide figures: every worker's scheduler together."""
        schedulers = [worker.scheduler for worker in self.workers]
        stats = [scheduler.stats for scheduler in schedulers]
        returns = [r for r in (scheduler.usual_return_s() for scheduler in schedulers) if r is not None]
        return HubFigures(
            active_sessions=len(self.sessions),
            queue_depth=sum(scheduler.queue_depth for scheduler in schedulers),
            last_batch_size=max(s.last_batch_size for s in stats),
            batches=sum(s.batches for s in stats),
            batched_jobs=sum(s.jobs for s in stats),
            merge_waits=sum(s.merge_waits for s in stats),
            merge_wait_seconds=sum(s.merge_wait_seconds for s in stats),
            user_return_seconds=min(returns, default=0.0),
            hub_draft_seconds=self.drafter.busy_seconds if self.drafter else 0.0,
            tokens_per_verify=self.metrics.mean_tokens_per_verify(),
            workers_ready=self.workers.ready_count().ready,
            workers_total=len(self.workers),
        )

    def whoami(self, owner: Owner = LOCAL_OWNER) -> wire.WhoAmIResponse:
        limits = wire.UserLimits(
            max_sessions_per_user=self.settings.max_sessions_per_user, tokens_per_minute=self.settings.tokens_per_minute
        )
        return wire.WhoAmIResponse(
            user=owner.name,
            limits=limits,
            sessions=self.sessions.count(owner),
            tokens_left=self.budgets.remaining(owner),
        )

    def open_session(self, request: wire.OpenSessionRequest, owner: Owner = LOCAL_OWNER) -> wire.OpenSessionResponse:
        vocab = self.engine.vocab
        check_opening(request, self.engine.name, vocab.size, vocab.fingerprint)
        check_ids(request.stop_token_ids, "stop_token_ids", self.engine.vocab_size)
        constraint = session_constraint(request, vocab)  # before a slot is taken: it may take a second
        if constraint is None:  # the grammars' view of the vocabulary with these stop tokens, for a later session
            prepare_grammar_tokenizer(vocab.fingerprint, vocab.pieces, request.stop_token_ids)
        with self._admission:
            self._check_user_sessions(owner)
            placed = self.workers.place(scope=self._sharing(owner))
            if placed is None:
                self.retirement.make_room()  # the longest-idle session, if it idled long enough, gives up its slot
                placed = self.workers.place(scope=self._sharing(owner))
            if placed is None:
                raise self.workers.no_room()
            worker, kv = placed
            session = self.sessions.add(
                request.sampling.temperature,
                request.sampling.seed,
                frozenset(request.stop_token_ids),
                kv,
                owner,
                worker.worker_id,
                constraint,
                request.top_logprobs,
            )
        return wire.OpenSessionResponse(
            session_id=session.session_id,
            model=self.engine.name,
            max_draft_tokens=self.settings.max_draft_tokens,
            max_context=self.engine.max_context,
        )

    def _hold(self, session: Session, tokens: int) -> None:
        """Take the KV memory the session's next pass writes (its context up to `tokens`): while its
        worker has too few free blocks, that worker's longest-idle session gives its memory up (if
        it idled long enough); when none can, 503 before anything is written, the session as it was."""
        worker = self.workers.of(session)
        while not worker.engine.reserve(session.kv, tokens):
            if not self.retirement.make_memory(worker):
                raise self.retirement.memory_full(worker)

    def _sharing(self, owner: Owner) -> str | None:
        """The scope whose sessions share the KV of a common prefix with this owner's (--share-prefixes)."""
        return {"account": owner.account_id, "across-accounts": ""}.get(self.settings.share_prefixes)

    def _check_user_sessions(self, owner: Owner) -> None:
        limit = self.settings.max_sessions_per_user
        if limit and self.sessions.count(owner) >= limit:
            raise RateLimited(
                f"user {owner.name!r} already has {limit} open sessions, this hub's limit per user; "
                "close one (end another chat) or retry later",
                retry_after_s=10,
            )

    async def feed(self, session_id: str, request: wire.FeedRequest, owner: Owner = LOCAL_OWNER) -> wire.FeedResponse:
        """Append a prompt to a session's context and compute its KV, in chunks its worker's
        scheduler fits beside other sessions' verifies; answered once all of it is in."""
        arrived = time.perf_counter()
        session = self.sessions.get(session_id, owner)
        self.budgets.check(owner)
        check_ids(request.tokens, "tokens", self.engine.vocab_size)
        with self.gate.admit():
            await session.turn.take()
            prompt = None
            try:
                check_open(session)
                check_room(len(session.context) + len(request.tokens), self.engine.max_context)
                self._hold(session, len(session.context) + len(request.tokens))
                session.extend(request.tokens)
                self.budgets.charge(owner, len(request.tokens))
                prompt = self.workers.submit_prompt(session)
                if prompt is not None:
                    await settled(prompt)
            finally:
                self.workers.let_go(session, prompt)
        self.metrics.feed_seconds.observe(time.perf_counter() - arrived)
        return wire.FeedResponse(context_len=len(session.context))

    async def verify(
        self, session_id: str, request: wire.VerifyRequest, owner: Owner = LOCAL_OWNER
    ) -> wire.VerifyResponse:
        """Verify one draft. Runs on the event loop; its pass runs there too in the engine process
        (a scheduler driven by the loop), or on its scheduler's thread (a Ray worker's)."""
        arrived = time.perf_counter()
        # Use counts from the pass applied: a session whose verifies the memory refuses ages
        # toward giving its blocks up, so two sessions waiting on each other cannot wait forever.
        session = self.sessions.get(session_id, owner, touch=False)
        self.budgets.check(owner)
        with self.gate.admit():
            await session.turn.take()
            started = time.perf_counter()
            prompt = None
            try:
                parents = self._admit_verify(session, request)
                # A long new context (the prompt sent with the draft) goes in chunks first.
                prompt = self.workers.submit_prompt(session, inline=INLINE_PROMPT_TOKENS)
                if prompt is not None:
                    await settled(prompt)
                job = await self.verify_job(session, request.draft, parents)
                future = self.workers.of(session).scheduler.submit(job, key=session.session_id)
            except BaseException:
                self.workers.let_go(session, prompt)
                raise
            # The target computes every sent token and every draft node, plus the bonus token.
            self.budgets.charge(owner, len(request.tokens) + len(request.draft) + 1)
            # The result is applied, and the session released, when the pass ends, even if this
            # request is cancelled meanwhile: the session's KV and context must stay in step.
            future.add_done_callback(lambda done: self._finish(session, job, "specedge", arrived, done))
            await finished(future)
        return wire.VerifyResponse(
            accepted=len(job.path),
            tokens=job.emitted,
            context_len=len(session.context),
            verify_ms=(time.perf_counter() - started) * 1000,
            logprobs=_logprobs(job),
        )

    async def verify_job(self, session: Session, draft: list[int], parents: list[int]) -> VerifyJob:
        """The session's next pass; a grammar's masks (~0.3-0.5 ms a node on a 152k vocabulary, the
        GIL released) are computed on a thread, not on the loop every session's requests share."""
        if session.constraint is None:
            return session.verify_job(draft, parents)
        return await anyio.to_thread.run_sync(session.verify_job, draft, parents, limiter=self.engine_calls)

    def _admit_verify(self, session: Session, request: wire.VerifyRequest) -> list[int]:
        """Check a verify request; the session's context takes its tokens. Returns the draft's parents."""
        check_open(session)
        parents = check_draft(request, self.settings.max_draft_tokens, self.engine.vocab_size)
        if not session.context and not request.tokens:
            raise BadRequest("the session has no context yet: send the prompt in `tokens` or feed it first")
        # +1 for the bonus token the verify adds.
        check_room(
            len(session.context) + len(request.tokens) + max(node_depths(parents), default=0) + 1,
            self.engine.max_context,
        )
        session.check_reach(request.tokens)
        self._hold(session, len(session.context) + len(request.tokens) + len(request.draft))
        session.extend(request.tokens)
        return parents

    def _finish(self, session: Session, job: VerifyJob, mode: str, arrived: float, done: Future) -> None:
        try:
            if done.exception() is None:
                self.apply_pass(session, job, mode, time.perf_counter() - arrived)
        finally:
            session.turn.release()

    async def generate(self, session_id: str, request: wire.GenerateRequest, owner: Owner = LOCAL_OWNER) -> Generation:
        """Server-only decoding, streamed: autoregressive (one target token per pass) or
        speculative with the hub's own draft model. Checks run, and the session's turn is
        taken, before the first chunk; the generation holds the turn until it is closed."""
        arrived = time.perf_counter()
        session = self.sessions.get(session_id, owner)
        self.budgets.check(owner)
        check_ids(request.tokens, "tokens", self.engine.vocab_size)
        if request.mode == "speculative" and self.drafter is None:
            raise BadRequest(
                "this hub has no draft model for the speculative mode; start it with --draft, or use autoregressive"
            )
        if not session.context and not request.tokens:
            raise BadRequest("the session has no context yet: send the prompt in `tokens` or feed it first")
        check_room(len(session.context) + len(request.tokens) + request.max_tokens, self.engine.max_context)
        await session.turn.take()
        try:
            check_open(session)
            session.check_reach(request.tokens)
            session.extend(request.tokens)
        except (SessionNotFound, BadRequest):
            session.turn.release()
            raise
        self.budgets.charge(owner, len(request.tokens))
        return Generation(self, session, request, owner, arrived)

    def rehome(self, session: Session, lost: Worker) -> None:
        """Give a session whose worker was lost a slot on a live one (holding its turn: a
        generation in flight); its context is fed there by its next pass."""
        with self._admission:
            placed = self.workers.place(excluded=lost, scope=self._sharing(session.owner))
        if placed is None:
            refusal = self.workers.no_room(excluded=lost)
            log.warning("generation of session %s cut off: %s (its worker was lost)", session.session_id, refusal)
            raise refusal
        worker, kv = placed
        self.retirement.forget(lost, session)
        self.sessions.rehome(session, worker.worker_id, kv)
        log.warning("session moved from lost worker %s to worker %s", lost.worker_id, worker.worker_id)

    def apply_pass(self, session: Session, job: VerifyJob, mode: str, seconds: float) -> None:
        session.take_emitted(job.emitted)
        session.last_used = time.monotonic()
        self.metrics.record_verify(mode, seconds, len(job.draft), len(job.path), len(job.emitted))

    async def close(self, session_id: str, owner: Owner = LOCAL_OWNER) -> None:
        """Close a session; its KV goes back once a request still running on it is done
        (waited for on the event loop, like any request's turn)."""
        session = self.sessions.remove(session_id, owner)
        await session.turn.take(bounded=False)  # out of the table now: its memory must come back
        try:
            await anyio.to_thread.run_sync(self.retirement.give_back, session, limiter=self.engine_calls)
        finally:
            session.turn.release()


def session_constraint(request: wire.OpenSessionRequest, vocab: Vocabulary) -> Constraint | None:
    """The grammar a session's replies follow (None: none), compiled for the target's vocabulary
    with the session's stop tokens as its end; BadRequest saying why one cannot be."""
    if request.constraint is None:
        return None
    try:
        tokenizer = grammar_tokenizer(vocab.fingerprint, vocab.pieces, request.stop_token_ids)
        return Constraint(tokenizer, request.constraint.grammar, request.constraint.start)
    except GrammarError as exc:
        raise BadRequest(f"constraint: {exc}") from exc


def _logprobs(job: VerifyJob) -> list[wire.TokenLogprobs] | None:
    if job.logprobs is None:
        return None
    return [wire.TokenLogprobs(logprob=lp, top_tokens=ids, top_logprobs=lps) for lp, ids, lps in job.logprobs]


def make_drafter(settings: HubSettings, device_lock: threading.Lock | None = None) -> HubDrafter | None:
    """The hub's own draft model for the speculative mode, when one is configured."""
    if not settings.draft:
        return None
    from hub_server.engine.drafter import HubDrafter

    return HubDrafter(Path(settings.draft).expanduser(), device_lock=device_lock)

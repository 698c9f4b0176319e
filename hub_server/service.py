"""What the hub does for each request, checked; independent of HTTP and of torch (the engine is
reached only through `engine_api.Engine`).

The hub's front end serves one or more workers (`placement.py`): each a device with its engine
and its own batch scheduler. Accounts, per-user limits and the session table are the front end's,
one set for all workers; a session's feeds, verifies and generations go to the worker it was
placed on. A worker in another process (Ray, `workers.py`) is probed; when it is lost its
sessions are dropped, so clients reopen them on a live worker, and it rejoins once restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from hub_server.config import HubSettings
from hub_server.engine_api import Engine, EngineStats, KVHandle, VerifyJob
from hub_server.errors import (
    AccountsUnavailable,
    BadRequest,
    ContextTooLong,
    HubFull,
    KVMemoryFull,
    NotReady,
    RateLimited,
    RequestRefused,
    SessionNotFound,
    UnknownWorker,
    VocabMismatch,
    WorkerLost,
)
from hub_server.generation import Generation
from hub_server.limits import AdmissionGate, TokenBudgets
from hub_server.metrics import HubCollector, HubFigures, HubMetrics
from hub_server.placement import LOST, READY, Supervised, Worker, local_identity, placement_order
from hub_server.prompts import INLINE_PROMPT_TOKENS, PromptBudget
from hub_server.scheduler import Prompt, Scheduler, settled
from hub_server.sessions import LOCAL_OWNER, Owner, Session, SessionStore
from hub_server.tree import chain_parents, node_depths, tree_problem

if TYPE_CHECKING:
    from hub_server.engine.drafter import HubDrafter

log = logging.getLogger("hub_server")

# A full hub gives a new session the slot of its longest-idle session, but only of one idle at
# least this long (or --session-idle-s, if that is shorter): a user reading a reply keeps theirs.
FULL_HUB_IDLE_FLOOR_S = 30.0
# Threads for engine calls that block for a pass or more (a prompt's prefill, the hub's own drafting,
# KV slots given back to a remote worker): a pool of their own, so they never take the threads that
# quick routes (tokens, info, opening a session) run on. Waiting for a session's turn takes none.
ENGINE_CALL_THREADS = 16
SWEEP_EVERY_S = 2.0  # how often idle sessions and those of removed accounts are looked for
PROBE_PERIOD_S = 0.5  # how often a worker in another process is asked whether it lives


class Hub:
    def __init__(
        self,
        settings: HubSettings,
        engines: Sequence[Engine],
        metrics: HubMetrics | None = None,
        accounts: TokenCheck | None = None,
    ):
        if not engines:
            raise ValueError("a hub needs at least one engine")
        self.settings = settings
        # Every worker loads the same target: the first one states its name, vocabulary and context.
        self.engine = engines[0]
        self.accounts = accounts  # where removed accounts are found out; None: no accounts
        self.sessions = SessionStore()
        self.metrics = metrics or HubMetrics()
        self.workers = [self._worker(str(index), engine) for index, engine in enumerate(engines)]
        self.metrics.registry.register(HubCollector(self._figures, self._engine_stats))
        self.budgets = TokenBudgets(settings.tokens_per_minute)
        self.gate = AdmissionGate(settings.max_queue_depth)
        self.engine_calls = anyio.CapacityLimiter(ENGINE_CALL_THREADS)
        self._admission = threading.Lock()  # the session caps are checked and taken as one step
        self.drafter = make_drafter(settings, self.engine.device_lock)
        self._evictor = threading.Thread(target=self._evict_idle_forever, name="evictor", daemon=True)
        self._evictor.start()
        for worker in self.workers:
            if worker.supervised:
                name = f"probe-worker-{worker.worker_id}"
                threading.Thread(target=self._probe_forever, args=(worker,), name=name, daemon=True).start()

    def _worker(self, worker_id: str, engine: Engine) -> Worker:
        budget = PromptBudget(self.settings.max_pass_tokens)
        scheduler = Scheduler(
            lambda jobs: self._verify_pass(engine, budget, jobs),
            max_batch=self.settings.max_batch,
            max_wait_s=self.settings.batch_wait_ms / 1000,
            merge_share=self.settings.merge_wait_share,
            pass_fixed_s=engine.pass_fixed_s,
            on_pass=self.metrics.record_pass,
            run_prompt=lambda session, tokens: self._feed_chunk(engine, budget, session, tokens),
            prompt_budget=budget,
            on_prompt_step=self.metrics.record_prompt_step,
        )
        identity = engine.probe() if isinstance(engine, Supervised) else local_identity(engine, self.settings.device)
        return Worker(worker_id, engine, scheduler, identity)

    def workers_ready(self) -> wire.WorkerCount:
        return wire.WorkerCount(ready=sum(w.state != LOST for w in self.workers), total=len(self.workers))

    def info(self) -> wire.HubInfo:
        return wire.HubInfo(
            protocol_version=wire.PROTOCOL_VERSION,
            model=self.engine.name,
            vocab_size=self.engine.vocab.size,
            vocab_fingerprint=self.engine.vocab.fingerprint,
            max_draft_tokens=self.settings.max_draft_tokens,
            max_context=self.engine.max_context,
            modes=["specedge", "autoregressive"] + (["speculative"] if self.drafter else []),
            workers=self.workers_ready(),
            draft_hint=wire.DraftHint(**vars(self.settings.draft_hint)) if self.settings.draft_hint else None,
        )

    def metrics_page(self) -> bytes:
        """The Prometheus text page of this hub's registry."""
        return self.metrics.page()

    def worker_list(self) -> wire.WorkerList:
        """Each worker as operators see it (`GET /v1/workers`, `hub_server workers`)."""
        return wire.WorkerList(workers=[self._describe(worker) for worker in self.workers])

    def _describe(self, worker: Worker) -> wire.WorkerInfo:
        device = worker.engine.stats()
        return wire.WorkerInfo(
            worker_id=worker.worker_id,
            node=worker.identity.node,
            pid=worker.identity.pid,
            device=worker.identity.device,
            state=worker.state,
            sessions=self.sessions.count_on(worker.worker_id),
            kv_slots=self.settings.max_sessions,
            kv_bytes_used=device.kv_bytes_used,
            kv_bytes_reserved=device.kv_bytes_reserved,
            kv_blocks=device.kv_blocks,
            kv_blocks_used=device.kv_blocks_used,
            kv_blocks_cached=device.kv_blocks_cached,
            queue_depth=worker.scheduler.queue_depth,
            passes=worker.scheduler.stats.batches,
            restarts=worker.restarts,
        )

    def drain(self, worker_id: str) -> wire.WorkerInfo:
        """Stop placing new sessions on a worker; its open sessions finish there."""
        worker = self._find_worker(worker_id)
        worker.drain()
        log.info("worker %s draining: %d sessions left", worker_id, self.sessions.count_on(worker_id))
        return self._describe(worker)

    def undrain(self, worker_id: str) -> wire.WorkerInfo:
        """Place new sessions on a drained worker again (a lost one takes them once it is back)."""
        worker = self._find_worker(worker_id)
        worker.undrain()
        log.info("worker %s takes new sessions again (%s)", worker_id, worker.state)
        return self._describe(worker)

    def _find_worker(self, worker_id: str) -> Worker:
        for worker in self.workers:
            if worker.worker_id == worker_id:
                return worker
        known = ", ".join(w.worker_id for w in self.workers)
        raise UnknownWorker(f"no worker {worker_id!r} on this hub (workers: {known}); see `hub_server workers`")

    def worker_of(self, session: Session) -> Worker:
        return self.workers[int(session.worker_id)]

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
            workers_ready=self.workers_ready().ready,
            workers_total=len(self.workers),
        )

    def _engine_stats(self) -> dict[str | None, EngineStats]:
        """Each worker's device figures; labelled by worker only where there are several."""
        labelled = len(self.workers) > 1  # one worker: the series as they always were, unlabelled
        return {(worker.worker_id if labelled else None): worker.engine.stats() for worker in self.workers}

    def _verify_pass(self, engine: Engine, budget: PromptBudget, jobs: list[VerifyJob]) -> None:
        """One batched pass on a worker's engine (its scheduler's thread), its device time observed."""
        seconds = engine.verify_batch(jobs)
        self.metrics.pass_device_seconds.observe(seconds)
        budget.record_verify(seconds)

    def _feed_chunk(self, engine: Engine, budget: PromptBudget, session: Session, tokens: int) -> None:
        """`tokens` more of a session's context into its KV (its scheduler's thread, between passes)."""
        kv = session.kv
        if kv is None:  # closed, or its worker lost, while the prompt queued
            return
        upto = min(kv.length + tokens, len(session.context) - 1)
        started = time.perf_counter()
        engine.prefill(kv, session.context[: upto + 1])
        budget.record_chunk(tokens, time.perf_counter() - started)

    def submit_prompt(self, session: Session, inline: int = 0) -> Prompt | None:
        """Queue the session's context not yet in its KV (all but the last token) as a prompt fed
        in chunks beside other sessions' verifies; None when at most `inline` tokens are missing
        (they ride in the session's next pass)."""
        missing = len(session.context) - 1 - session.kv.length
        if missing <= inline:
            return None
        return self.worker_of(session).scheduler.submit_prompt(session, missing)

    def let_go(self, session: Session, prompt: Prompt | None) -> None:
        """End a request's turn on a session: a prompt it queued takes no more chunks, and the
        turn passes on once the chunk on the device now is in."""
        if prompt is not None and not prompt.future.done():
            self.worker_of(session).scheduler.cancel_prompt(prompt)
        session.turn.release_after(prompt.future if prompt is not None else None)

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
        if request.protocol_version != wire.PROTOCOL_VERSION:
            raise BadRequest(
                f"this hub speaks protocol version {wire.PROTOCOL_VERSION}, the client "
                f"{request.protocol_version}; upgrade the older of the two"
            )
        vocab = self.engine.vocab
        if request.vocab_size != vocab.size or request.vocab_fingerprint != vocab.fingerprint:
            raise VocabMismatch(
                f"the draft model {request.draft_model or '(unnamed)'} has a vocabulary of "
                f"{request.vocab_size} tokens that differs from the target {self.engine.name} "
                f"({vocab.size} tokens); use a draft model of the target's family"
            )
        self._check_ids(request.stop_token_ids, "stop_token_ids")
        with self._admission:
            self._check_user_sessions(owner)
            placed = self._place(scope=self._sharing(owner))
            if placed is None:
                self._make_room()  # the longest-idle session, if it idled long enough, gives up its slot
                placed = self._place(scope=self._sharing(owner))
            if placed is None:
                raise self._no_room()
            worker, kv = placed
            session = self.sessions.add(
                request.sampling.temperature,
                request.sampling.seed,
                frozenset(request.stop_token_ids),
                kv,
                owner,
                worker.worker_id,
            )
        return wire.OpenSessionResponse(
            session_id=session.session_id,
            model=self.engine.name,
            max_draft_tokens=self.settings.max_draft_tokens,
            max_context=self.engine.max_context,
        )

    def _make_room(self) -> bool:
        """A full hub: the longest-idle session gives up its slot, if it has idled long enough.
        Only one: a new session needs one slot, and every user evicted pays a prefill to resume."""
        floor = min(FULL_HUB_IDLE_FLOOR_S, self.settings.session_idle_s)
        session = self.sessions.take_longest_idle(floor)
        if session is not None:
            self.metrics.evicted_sessions.inc()
            self._retire(session)
        return session is not None

    def _hold(self, session: Session, tokens: int) -> None:
        """Take the KV memory the session's next pass writes (its context up to `tokens`): while its
        worker has too few free blocks, the longest-idle session gives its memory up (if it idled
        long enough); when none can, 503 before anything is written, the session as it was."""
        engine = self.worker_of(session).engine
        while not engine.reserve(session.kv, tokens):
            if self._make_room():
                self.metrics.evicted_for_memory.inc()
            else:
                raise KVMemoryFull(
                    "the hub's KV memory is full and no session has idled long enough to give its memory up; "
                    "retry in a few seconds"
                )

    def _sharing(self, owner: Owner) -> str | None:
        """The scope whose sessions share the KV of a common prefix with this owner's (--share-prefixes)."""
        return {"account": owner.account_id, "across-accounts": ""}.get(self.settings.share_prefixes)

    def _place(self, excluded: Worker | None = None, scope: str | None = None) -> tuple[Worker, KVHandle] | None:
        """A worker for a new session and a KV slot on it, best worker first; None when all are full."""
        loads = [w.load(self.sessions.count_on(w.worker_id), self.settings.max_sessions) for w in self.workers]
        for worker_id in placement_order(loads):
            worker = self.workers[int(worker_id)]
            if worker is excluded:
                continue
            try:
                kv = worker.engine.new_kv(scope)
            except WorkerLost:  # probed now, so that a hub whose every worker died says so (`_no_room`)
                if worker.supervised:
                    self._probe(worker)
                continue
            if kv is not None:
                return worker, kv
        return None

    def _no_room(self, excluded: Worker | None = None) -> RequestRefused:
        """Why no worker took a session: every worker lost is an outage, waited out as a loading
        hub is (503, Ray restarts them); workers full or drained are a busy hub (429)."""
        if all(worker.state == LOST or worker is excluded for worker in self.workers):
            return NotReady("no engine worker of this hub is up now (lost, restarting); retry in a few seconds")
        return HubFull(self._full_message())

    def _full_message(self) -> str:
        limit = self.settings.max_sessions
        if not any(worker.state == READY for worker in self.workers):
            states = ", ".join(f"worker {w.worker_id} {w.state}" for w in self.workers)
            return f"no worker of this hub takes new sessions now ({states}); retry in a while"
        if len(self.workers) == 1:
            return f"the hub serves its maximum of {limit} sessions; retry in a few seconds"
        up = self.workers_ready()
        return (
            f"the hub's {up.ready} ready workers (of {up.total}) serve their maximum of {limit} sessions each; "
            "retry in a few seconds"
        )

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
        self._check_ids(request.tokens, "tokens")
        with self.gate.admit():
            await session.turn.take()
            prompt = None
            try:
                _check_open(session)
                self._check_room(len(session.context) + len(request.tokens))
                self._hold(session, len(session.context) + len(request.tokens))
                self.budgets.charge(owner, len(request.tokens))
                session.context.extend(request.tokens)
                prompt = self.submit_prompt(session)
                if prompt is not None:
                    await settled(prompt)
            finally:
                self.let_go(session, prompt)
        self.metrics.feed_seconds.observe(time.perf_counter() - arrived)
        return wire.FeedResponse(context_len=len(session.context))

    async def verify(
        self, session_id: str, request: wire.VerifyRequest, owner: Owner = LOCAL_OWNER
    ) -> wire.VerifyResponse:
        """Verify one draft. Runs on the event loop: the only thread hops are to the scheduler's
        worker and back."""
        arrived = time.perf_counter()
        session = self.sessions.get(session_id, owner)
        self.budgets.check(owner)
        with self.gate.admit():
            await session.turn.take()
            started = time.perf_counter()
            prompt = None
            try:
                parents = self._admit_verify(session, request)
                # A long new context (the prompt sent with the draft) goes in chunks first.
                prompt = self.submit_prompt(session, inline=INLINE_PROMPT_TOKENS)
                if prompt is not None:
                    await settled(prompt)
                job = self._verify_job(session, request.draft, parents)
                future = self.worker_of(session).scheduler.submit(job, key=session.session_id)
            except BaseException:
                self.let_go(session, prompt)
                raise
            # The target computes every sent token and every draft node, plus the bonus token.
            self.budgets.charge(owner, len(request.tokens) + len(request.draft) + 1)
            # The result is applied, and the session released, when the pass ends, even if this
            # request is cancelled meanwhile: the session's KV and context must stay in step.
            future.add_done_callback(lambda done: self._finish(session, job, "specedge", arrived, done))
            await asyncio.shield(asyncio.wrap_future(future))
        return wire.VerifyResponse(
            accepted=len(job.path),
            tokens=job.emitted,
            context_len=len(session.context),
            verify_ms=(time.perf_counter() - started) * 1000,
        )

    def _admit_verify(self, session: Session, request: wire.VerifyRequest) -> list[int]:
        """Check a verify request; the session's context takes its tokens. Returns the draft's parents."""
        _check_open(session)
        parents = self._check_draft(request)
        if not session.context and not request.tokens:
            raise BadRequest("the session has no context yet: send the prompt in `tokens` or feed it first")
        # +1 for the bonus token the verify adds.
        self._check_room(len(session.context) + len(request.tokens) + max(node_depths(parents), default=0) + 1)
        self._hold(session, len(session.context) + len(request.tokens) + len(request.draft))
        session.context.extend(request.tokens)
        return parents

    def _verify_job(self, session: Session, draft: list[int], parents: list[int]) -> VerifyJob:
        """The admitted request as a job for the runner."""
        return VerifyJob(
            session.kv,
            session.context[session.kv.length :],
            draft,
            parents,
            session.temperature,
            session.seed,
            session.stop_token_ids,
        )

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
        self._check_ids(request.tokens, "tokens")
        if request.mode == "speculative" and self.drafter is None:
            raise BadRequest(
                "this hub has no draft model for the speculative mode; start it with --draft, or use autoregressive"
            )
        if not session.context and not request.tokens:
            raise BadRequest("the session has no context yet: send the prompt in `tokens` or feed it first")
        self._check_room(len(session.context) + len(request.tokens) + request.max_tokens)
        await session.turn.take()
        try:
            _check_open(session)
        except SessionNotFound:
            session.turn.release()
            raise
        self.budgets.charge(owner, len(request.tokens))
        return Generation(self, session, request, owner, arrived)

    def rehome(self, session: Session, lost: Worker) -> None:
        """Give a session whose worker was lost a slot on a live one (holding its turn: a
        generation in flight); its context is fed there by its next pass."""
        with self._admission:
            placed = self._place(excluded=lost, scope=self._sharing(session.owner))
        if placed is None:
            refusal = self._no_room(excluded=lost)
            log.warning("generation of session %s cut off: %s (its worker was lost)", session.session_id, refusal)
            raise refusal
        worker, kv = placed
        self._forget(lost, session)
        self.sessions.rehome(session, worker.worker_id, kv)
        log.warning("session moved from lost worker %s to worker %s", lost.worker_id, worker.worker_id)

    def apply_pass(self, session: Session, job: VerifyJob, mode: str, seconds: float) -> None:
        session.context.extend(job.emitted)
        session.last_used = time.monotonic()
        self.metrics.record_verify(mode, seconds, len(job.draft), len(job.path), len(job.emitted))

    def _check_draft(self, request: wire.VerifyRequest) -> list[int]:
        """The draft's parents (a chain when none are given), once the draft is known to be sound."""
        self._check_ids(request.tokens, "tokens")
        self._check_ids(request.draft, "draft")
        if len(request.draft) > self.settings.max_draft_tokens:
            raise BadRequest(
                f"draft of {len(request.draft)} tokens is longer than this hub's limit of "
                f"{self.settings.max_draft_tokens}; send shorter drafts"
            )
        if request.parents is None:
            return chain_parents(len(request.draft))
        if len(request.parents) != len(request.draft):
            raise BadRequest(
                f"parents has {len(request.parents)} entries for {len(request.draft)} draft tokens; send one per token"
            )
        problem = tree_problem(request.parents)
        if problem:
            raise BadRequest(problem)
        return request.parents

    async def close(self, session_id: str, owner: Owner = LOCAL_OWNER) -> None:
        """Close a session; its KV goes back once a request still running on it is done
        (waited for on the event loop, like any request's turn)."""
        session = self.sessions.remove(session_id, owner)
        await session.turn.take()
        try:
            await anyio.to_thread.run_sync(self._give_back, session, limiter=self.engine_calls)
        finally:
            session.turn.release()

    def _evict(self, max_idle_s: float) -> None:
        for session in self.sessions.evict_idle(max_idle_s):
            self.metrics.evicted_sessions.inc()
            self._retire(session)

    def close_sessions_of_removed_accounts(self) -> None:
        """Close every session whose account is gone (`hub_server users remove` writes the
        database, not this process), so that its KV slot is free again."""
        if self.accounts is None:
            return
        owners = {session.owner for session in self.sessions.all()}
        try:
            gone = self.accounts.gone(owners)
        except AccountsUnavailable as exc:  # the requests say so to users; here, keep serving
            log.warning("cannot check for removed accounts: %s", exc.message)
            return
        for session in self.sessions.remove_owned_by(gone):
            self.metrics.closed_for_removed_accounts.inc()
            self._retire(session)

    def _retire(self, session: Session) -> None:
        """Give a removed session's KV memory back: now if no request runs on it, else on a
        thread of its own once that request is done. Never waits: it is called on the event
        loop (a full hub making room), where the request it would wait for needs to run."""
        if session.turn.try_take():
            try:
                self._give_back(session)
            finally:
                session.turn.release()
            return
        threading.Thread(target=self._retire_when_free, args=(session,), name="retire", daemon=True).start()

    def _retire_when_free(self, session: Session) -> None:
        with session.turn.held():
            self._give_back(session)

    def _give_back(self, session: Session) -> None:
        """A removed session's KV slot back to its worker (holding the session's turn)."""
        worker = self.worker_of(session)  # under the turn: a generation may have moved it
        if session.kv is not None:
            with contextlib.suppress(WorkerLost):  # a lost worker took the slot with it
                worker.engine.release(session.kv)
            session.kv = None
        self._forget(worker, session)

    def _forget(self, worker: Worker, session: Session) -> None:
        worker.scheduler.forget(session.session_id)
        if self.drafter:
            self.drafter.forget(session.session_id)

    def _probe_forever(self, worker: Worker) -> None:
        while True:
            time.sleep(PROBE_PERIOD_S)
            self._probe(worker)

    def _probe(self, worker: Worker) -> None:
        """Notice a lost worker (its sessions dropped at once), and one that came back (a new
        process: an empty KV pool) so that placement uses it again."""
        try:
            identity = worker.engine.probe()  # type: ignore[attr-defined]
        except WorkerLost as exc:
            if worker.state != LOST:
                self._lose(worker, str(exc))
            return
        if identity.incarnation == worker.identity.incarnation:
            return
        if worker.state != LOST:  # it died and came back between two probes
            self._lose(worker, "its process restarted")
        worker.rejoin(identity)
        log.info("worker %s rejoined: pid %d on %s (%s)", worker.worker_id, identity.pid, identity.node, worker.state)

    def _lose(self, worker: Worker, reason: str) -> None:
        worker.lose()
        lost = self.sessions.drop_worker(worker.worker_id)
        for session in lost:
            # Its KV slot died with the worker; a request still running on it fails by itself.
            self._forget(worker, session)
        self.metrics.lost_sessions.inc(len(lost))
        log.warning(
            "worker %s lost (%s): %d sessions dropped, clients reopen them", worker.worker_id, reason, len(lost)
        )

    def _evict_idle_forever(self) -> None:
        while True:
            time.sleep(min(SWEEP_EVERY_S, self.settings.session_idle_s / 4))
            self._evict(self.settings.session_idle_s)
            self.close_sessions_of_removed_accounts()

    def _check_ids(self, tokens: list[int], name: str) -> None:
        bad = [t for t in tokens if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise BadRequest(
                f"{name} holds token id {bad[0]} outside this model's vocabulary "
                f"[0, {self.engine.vocab_size}); is the draft model of the target's family?"
            )

    def _check_room(self, needed: int) -> None:
        if needed > self.engine.max_context:
            raise ContextTooLong(
                f"the conversation would need {needed} tokens, more than this model's context "
                f"of {self.engine.max_context}; start a new conversation"
            )


def _check_open(session: Session) -> None:
    """A request that waited for a session closed or evicted meanwhile finds it gone."""
    if session.kv is None:
        raise SessionNotFound(f"no session {session.session_id!r} on this hub; open a new session")


def make_drafter(settings: HubSettings, device_lock: threading.Lock | None = None) -> HubDrafter | None:
    """The hub's own draft model for the speculative mode, when one is configured."""
    if not settings.draft:
        return None
    from hub_server.engine.drafter import HubDrafter

    return HubDrafter(Path(settings.draft).expanduser(), device_lock=device_lock)

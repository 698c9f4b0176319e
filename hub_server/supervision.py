"""The hub's engine workers as its front end keeps them: each worker's scheduler and what its
passes and prompt chunks run, where a new session goes, and the supervision of workers in other
processes (probes, loss, rejoin, drain). Plain Python, no torch.

A worker in another process (Ray, `workers.py`) is probed; when it is lost its sessions are
dropped, so clients reopen them on a live worker, and it rejoins once restarted. The session
rules themselves are `service.Hub`'s; this module only says which worker holds what.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

from hub_server import protocol as wire
from hub_server.config import HubSettings
from hub_server.engine_api import Engine, EngineStats, KVHandle, VerifyJob
from hub_server.errors import HubFull, NotReady, RequestRefused, UnknownWorker, WorkerLost
from hub_server.metrics import HubMetrics
from hub_server.placement import LOST, READY, Supervised, Worker, local_identity, placement_order
from hub_server.prompts import PromptBudget
from hub_server.scheduler import Composition, Prompt, Scheduler
from hub_server.sessions import Session, SessionStore

log = logging.getLogger("hub_server")

PROBE_PERIOD_S = 0.5  # how often a worker in another process is asked whether it lives


class Workers:
    """The hub's workers, in the order of their ids ("0", "1", ...)."""

    def __init__(
        self,
        settings: HubSettings,
        engines: Sequence[Engine],
        sessions: SessionStore,
        metrics: HubMetrics,
        forget: Callable[[Worker, Session], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self.settings = settings
        self._loop = loop  # where the passes of a worker in this process run (None: its scheduler's thread)
        self.sessions = sessions
        self.metrics = metrics
        self._forget = forget  # a session dropped with its lost worker: the hub forgets it too
        self._workers = [self._worker(str(index), engine) for index, engine in enumerate(engines)]
        for worker in self._workers:
            if worker.supervised:
                name = f"probe-worker-{worker.worker_id}"
                threading.Thread(target=self._probe_forever, args=(worker,), name=name, daemon=True).start()

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[Worker]:
        return iter(self._workers)

    def __getitem__(self, index: int) -> Worker:
        return self._workers[index]

    def of(self, session: Session) -> Worker:
        """The worker holding a session's KV."""
        return self._workers[int(session.worker_id)]

    # --- passes -------------------------------------------------------------------------
    def _worker(self, worker_id: str, engine: Engine) -> Worker:
        budget = PromptBudget(self.settings.max_pass_tokens)
        identity = engine.probe() if isinstance(engine, Supervised) else local_identity(engine, self.settings.device)
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
            composition=Composition.of(identity.device, engine.widest_verify_row),
            run_feed=lambda job: engine.feed(job.kv, job.pending),
            # A worker in another process is waited on for its whole pass: not on the loop.
            loop=None if isinstance(engine, Supervised) else self._loop,
        )
        return Worker(worker_id, engine, scheduler, identity)

    def _verify_pass(self, engine: Engine, budget: PromptBudget, jobs: list[VerifyJob]) -> None:
        """One batched pass on a worker's engine (where its scheduler runs passes), its device time observed."""
        seconds = engine.verify_batch(jobs)
        self.metrics.pass_device_seconds.observe(seconds)
        budget.record_verify(seconds)

    def _feed_chunk(self, engine: Engine, budget: PromptBudget, session: Session, tokens: int) -> None:
        """`tokens` more of a session's context into its KV (where its scheduler runs passes, between them)."""
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
        return self.of(session).scheduler.submit_prompt(session, missing)

    def let_go(self, session: Session, prompt: Prompt | None, last_work: Future | None = None) -> None:
        """End a request's turn on a session: a prompt it queued takes no more chunks, and the
        turn passes on once its last work (by default that prompt: the chunk on the device now)
        is in."""
        if prompt is not None and not prompt.future.done():
            self.of(session).scheduler.cancel_prompt(prompt)
        if last_work is None and prompt is not None:
            last_work = prompt.future
        session.turn.release_after(last_work)

    # --- placement ----------------------------------------------------------------------
    def place(self, excluded: Worker | None = None, scope: str | None = None) -> tuple[Worker, KVHandle] | None:
        """A worker for a new session and a KV slot on it, best worker first (the most KV blocks
        to take per session it would hold, `placement_order`); None when every worker's session
        table or memory is full."""
        max_sessions = self.settings.max_sessions
        loads = [w.load(self.sessions.count_on(w.worker_id), max_sessions) for w in self._workers]
        for worker_id in placement_order(loads):
            worker = self._workers[int(worker_id)]
            if worker is excluded:
                continue
            try:
                kv = worker.engine.new_kv(scope)
            except WorkerLost:  # probed now, so that a hub whose every worker died says so (`no_room`)
                if worker.supervised:
                    self.probe(worker)
                continue
            if kv is not None:
                return worker, kv
        return None

    def no_room(self, excluded: Worker | None = None) -> RequestRefused:
        """Why no worker took a session: every worker lost is an outage, waited out as a loading
        hub is (503, Ray restarts them); workers full or drained are a busy hub (429)."""
        if all(worker.state == LOST or worker is excluded for worker in self._workers):
            return NotReady("no engine worker of this hub is up now (lost, restarting); retry in a few seconds")
        return HubFull(self.full_message())

    def full_message(self) -> str:
        limit = self.settings.max_sessions
        if not any(worker.state == READY for worker in self._workers):
            states = ", ".join(f"worker {w.worker_id} {w.state}" for w in self._workers)
            return f"no worker of this hub takes new sessions now ({states}); retry in a while"
        if any(w.state == READY and self.sessions.count_on(w.worker_id) < limit for w in self._workers):
            return (
                "the hub's KV memory is full: its sessions hold every block and none has idled long enough "
                "to give its memory up; retry in a few seconds"
            )
        if len(self._workers) == 1:
            return f"the hub serves its maximum of {limit} sessions; retry in a few seconds"
        up = self.ready_count()
        return (
            f"the hub's {up.ready} ready workers (of {up.total}) serve their maximum of {limit} sessions each; "
            "retry in a few seconds"
        )

    # --- what operators see and do ------------------------------------------------------
    def ready_count(self) -> wire.WorkerCount:
        return wire.WorkerCount(ready=sum(w.state != LOST for w in self._workers), total=len(self._workers))

    def listing(self) -> wire.WorkerList:
        """Each worker as operators see it (`GET /v1/workers`, `hub_server workers`)."""
        return wire.WorkerList(workers=[self._describe(worker) for worker in self._workers])

    def engine_stats(self) -> dict[str | None, EngineStats]:
        """Each worker's device figures; labelled by worker only where there are several."""
        labelled = len(self._workers) > 1  # one worker: the series as they always were, unlabelled
        return {(worker.worker_id if labelled else None): worker.engine.stats() for worker in self._workers}

    def _describe(self, worker: Worker) -> wire.WorkerInfo:
        device = worker.engine.stats()
        return wire.WorkerInfo(
            worker_id=worker.worker_id,
            node=worker.identity.node,
            pid=worker.identity.pid,
            device=worker.identity.device,
            devices=list(worker.identity.devices or (worker.identity.device,)),
            pids=list(worker.identity.pids or (worker.identity.pid,)),
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
        worker = self._find(worker_id)
        worker.drain()
        log.info("worker %s draining: %d sessions left", worker_id, self.sessions.count_on(worker_id))
        return self._describe(worker)

    def undrain(self, worker_id: str) -> wire.WorkerInfo:
        """Place new sessions on a drained worker again (a lost one takes them once it is back)."""
        worker = self._find(worker_id)
        worker.undrain()
        log.info("worker %s takes new sessions again (%s)", worker_id, worker.state)
        return self._describe(worker)

    def _find(self, worker_id: str) -> Worker:
        for worker in self._workers:
            if worker.worker_id == worker_id:
                return worker
        known = ", ".join(w.worker_id for w in self._workers)
        raise UnknownWorker(f"no worker {worker_id!r} on this hub (workers: {known}); see `hub_server workers`")

    # --- supervision --------------------------------------------------------------------
    def _probe_forever(self, worker: Worker) -> None:
        while True:
            worker.engine.rest(PROBE_PERIOD_S)  # type: ignore[attr-defined]
            self.probe(worker)

    def probe(self, worker: Worker) -> None:
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

"""Sessions leaving the hub and their KV memory going back: eviction of idle sessions, room made
on a full hub, memory made on a full worker, sessions of removed accounts, and the hand-back
itself, which waits for a request still running on the session. Plain Python, no torch.

An evicted session's client finds it gone (404 `session_not_found`) at its next request and
rebuilds it from its own history, so eviction costs a prefill, never a token."""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import TYPE_CHECKING

from hub_server.accounts import TokenCheck
from hub_server.config import HubSettings
from hub_server.errors import AccountsUnavailable, KVMemoryFull, WorkerLost
from hub_server.metrics import HubMetrics
from hub_server.placement import Worker
from hub_server.sessions import Session, SessionStore

if TYPE_CHECKING:
    from hub_server.engine.drafter import HubDrafter
    from hub_server.supervision import Workers

log = logging.getLogger("hub_server")

# A full hub gives a new session the slot of its longest-idle session, but only of one idle at
# least this long (or --session-idle-s, if that is shorter): a user reading a reply keeps theirs.
FULL_HUB_IDLE_FLOOR_S = 30.0
# A session whose next pass finds no free KV block on its worker takes the memory of that worker's
# longest-idle session, but only of one idle at least this long (or --session-idle-s, if that is
# shorter): longer than a decoding client's gap between two requests of one reply (its draft and
# the round trip), so a session in mid-reply is never taken and two growing sessions do not evict
# each other in turn. Shorter than the full hub's floor: the one who waits otherwise is a user in
# mid-reply, answered 503, where the one evicted is reading a reply and pays a prefill on return.
MEMORY_IDLE_FLOOR_S = 5.0
SWEEP_EVERY_S = 2.0  # how often idle sessions and those of removed accounts are looked for


class Retirement:
    def __init__(
        self,
        settings: HubSettings,
        sessions: SessionStore,
        metrics: HubMetrics,
        accounts: TokenCheck | None,
        drafter: HubDrafter | None,
    ):
        self.settings = settings
        self.sessions = sessions
        self.metrics = metrics
        self.accounts = accounts  # where removed accounts are found out; None: no accounts
        self.drafter = drafter
        self.workers: Workers | None = None  # set by the hub once its workers are up

    def start(self, workers: Workers) -> None:
        """Look for idle sessions and removed accounts' sessions from now on."""
        self.workers = workers
        threading.Thread(target=self._sweep_forever, name="evictor", daemon=True).start()

    def make_room(self) -> bool:
        """A full hub: the longest-idle session gives up its memory, if it has idled long enough.
        Only one: a new session needs room for one, and every user evicted pays a prefill to resume."""
        floor = min(FULL_HUB_IDLE_FLOOR_S, self.settings.session_idle_s)
        session = self.sessions.take_longest_idle(floor)
        if session is not None:
            self.metrics.evicted_sessions.inc()
            self.retire(session)
        return session is not None

    def make_memory(self, worker: Worker) -> bool:
        """A pass on `worker` needs KV blocks and none is free (nor cached): that worker's
        longest-idle session gives its memory up, if it has idled long enough. Only that worker's:
        another worker's blocks are no use to a session whose KV lives here."""
        session = self.sessions.take_longest_idle(self._memory_floor(), worker.worker_id)
        if session is None:
            return False
        self.metrics.evicted_sessions.inc()
        self.metrics.evicted_for_memory.inc()
        self.retire(session)
        return True

    def memory_full(self, worker: Worker) -> KVMemoryFull:
        """The refusal when no session on `worker` can give memory up yet; its Retry-After is when
        the longest-idle one will have idled long enough, where one is idling."""
        refusal = KVMemoryFull(
            "the hub's KV memory is full and no session has idled long enough to give its memory up; "
            "retry in a few seconds"
        )
        idle_since = [s.last_used for s in self.sessions.all() if s.worker_id == worker.worker_id and not s.turn.busy]
        if idle_since:
            wait = min(idle_since) + self._memory_floor() - time.monotonic()
            refusal.retry_after_s = max(1, math.ceil(wait))
        return refusal

    def _memory_floor(self) -> float:
        return min(MEMORY_IDLE_FLOOR_S, self.settings.session_idle_s)

    def evict(self, max_idle_s: float) -> None:
        for session in self.sessions.evict_idle(max_idle_s):
            self.metrics.evicted_sessions.inc()
            self.retire(session)

    def close_sessions_of_removed_accounts(self) -> None:
        """Close every session whose account is gone (`hub_server users remove` writes the
        database, not this process), so that its KV memory is free again."""
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
            self.retire(session)

    def retire(self, session: Session) -> None:
        """Give a removed session's KV memory back: now if no request runs on it, else on a
        thread of its own once that request is done. Never waits: it is called on the event
        loop (a full hub making room), where the request it would wait for needs to run."""
        if session.turn.try_take():
            try:
                self.give_back(session)
            finally:
                session.turn.release()
            return
        threading.Thread(target=self._retire_when_free, args=(session,), name="retire", daemon=True).start()

    def _retire_when_free(self, session: Session) -> None:
        with session.turn.held():
            self.give_back(session)

    def give_back(self, session: Session) -> None:
        """A removed session's KV memory back to its worker (holding the session's turn)."""
        assert self.workers is not None
        worker = self.workers.of(session)  # under the turn: a generation may have moved it
        if session.kv is not None:
            with contextlib.suppress(WorkerLost):  # a lost worker took the memory with it
                worker.engine.release(session.kv)
            session.kv = None
        self.forget(worker, session)

    def forget(self, worker: Worker, session: Session) -> None:
        """A session gone from a worker: its scheduler and the hub's drafter stop expecting it."""
        worker.scheduler.forget(session.session_id)
        if self.drafter:
            self.drafter.forget(session.session_id)

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(min(SWEEP_EVERY_S, self.settings.session_idle_s / 4))
            self.evict(self.settings.session_idle_s)
            self.close_sessions_of_removed_accounts()

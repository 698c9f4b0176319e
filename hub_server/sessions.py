"""Sessions: each user's token context and settings. Plain Python, no torch.

The KV cache lives in the model runner; a session only holds an opaque handle to it, and the id
of the worker whose engine holds that cache (`placement.py`): the store is the hub's session table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hub_server.engine_api import VerifyJob
from hub_server.errors import BadRequest, SessionBusy, SessionNotFound
from specedge_common.grammar import Constraint, GrammarError

log = logging.getLogger("hub_server")

LOCAL_USER = "local"  # the owner's name on a hub without accounts (--no-auth, embedded)
# A client sends one request at a time on a session; a few more may wait for their turn (a retry
# racing its original), past that the session answers 429 at once.
MAX_WAITING_PER_SESSION = 8


class Turn:
    """One request at a time on a session, handed from one to the next in arrival order.

    Waiting costs no thread: a request waits on the event loop (`take`), so no number of
    requests on one session can use up the threads every other user needs, and at most
    `max_waiting` may wait (one more is refused `SessionBusy`). Whichever thread ends a request
    (the request's own, or a pass's callback when the request was cancelled meanwhile) hands
    the turn straight to the next waiter. The hub's own threads (eviction) wait with `held`.
    """

    def __init__(self, max_waiting: int = MAX_WAITING_PER_SESSION):
        self.max_waiting = max_waiting
        self._mutex = threading.Lock()
        self._held = False
        self._waiting: deque[_Waiter] = deque()

    @property
    def busy(self) -> bool:
        return self._held

    def try_take(self) -> bool:
        with self._mutex:
            if self._held:
                return False
            self._held = True
            return True

    async def take(self, bounded: bool = True) -> None:
        """The turn, waited for on the event loop; SessionBusy when too many already wait (unless
        not `bounded`: the hub's own closing of a session waits whatever the line)."""
        if self.try_take():
            return
        loop = asyncio.get_running_loop()
        granted: asyncio.Future[None] = loop.create_future()
        waiter = _Waiter(lambda: loop.call_soon_threadsafe(self._hand, granted), internal=not bounded)
        with self._mutex:
            if not self._held:
                self._held = True
                return
            if bounded and sum(not w.internal for w in self._waiting) >= self.max_waiting:
                raise SessionBusy(
                    f"{self.max_waiting} requests already wait for this session; send one request at a time "
                    "on a session and wait for its answer",
                    retry_after_s=1,
                )
            self._waiting.append(waiter)
        try:
            await granted
        except asyncio.CancelledError:
            with self._mutex:
                if waiter in self._waiting:  # never handed the turn: just leave the line
                    self._waiting.remove(waiter)
                    raise
            if granted.done() and not granted.cancelled():  # handed over as this was cancelled
                self.release()
            raise  # otherwise `_hand` sees the cancelled future and passes the turn on

    def _hand(self, granted: asyncio.Future[None]) -> None:
        """On the waiter's loop: give it the turn, or pass it on if it stopped waiting."""
        if granted.cancelled():
            self.release()
        else:
            granted.set_result(None)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the turn from a thread of the hub's own (eviction, closing): blocks that thread."""
        if not self.try_take():
            handed = threading.Event()
            with self._mutex:
                if self._held:
                    self._waiting.append(_Waiter(handed.set, internal=True))
                else:
                    self._held = True
                    handed.set()
            handed.wait()
        try:
            yield
        finally:
            self.release()

    def release_after(self, work: Future | None) -> None:
        """Release once `work` (a pass or prompt the holder queued) is over: at once if none or done."""
        if work is None:
            self.release()
        else:
            work.add_done_callback(lambda _: self.release())

    def release(self) -> None:
        """End the current request's turn: the next waiter has it, or nobody."""
        with self._mutex:
            while self._waiting:
                if self._waiting.popleft().hand_over():
                    return
            self._held = False


@dataclass(eq=False)
class _Waiter:
    wake: Callable[[], Any]  # hands it the turn; any thread
    internal: bool = False  # the hub's own wait (closing, eviction): not counted against max_waiting

    def hand_over(self) -> bool:
        """Wake it; False when it can no longer take the turn (its event loop is gone)."""
        try:
            self.wake()
        except RuntimeError:
            return False
        return True


@dataclass(frozen=True)
class Owner:
    """Who a session belongs to: an account, not a name. A user removed and added again under the
    same name is a new account and does not see the old one's sessions."""

    account_id: str
    name: str
    # Operators may read hub-wide figures (/metrics); a role change does not change whose sessions are whose.
    operator: bool = field(default=False, compare=False)


# The one owner of every session on a hub without accounts: its user runs the hub, so operates it too.
LOCAL_OWNER = Owner(account_id=LOCAL_USER, name=LOCAL_USER, operator=True)


@dataclass
class Session:
    session_id: str
    temperature: float
    seed: int
    stop_token_ids: frozenset[int]
    kv: Any  # the runner's KV handle; None once closed or evicted
    owner: Owner = LOCAL_OWNER  # the account that opened it; nobody else sees it
    worker_id: str = "0"  # the worker whose engine holds its KV cache; all its requests go there
    context: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    # One request at a time per session: a session's context is a sequence, not a set.
    turn: Turn = field(default_factory=Turn)
    constraint: Constraint | None = None  # the reply's grammar, following the context from its start on
    top_logprobs: int | None = None  # each verify answer carries the emitted tokens' logprobs

    grammar_failure: str = ""  # why the grammar could not follow the target's own tokens (a bug)

    def extend(self, tokens: list[int]) -> None:
        """The context takes a client's `tokens`, once the session's grammar (if any) allows them:
        BadRequest saying where it does not, the session as it was."""
        if self.constraint is not None:
            if self.grammar_failure:
                raise BadRequest(f"this session's grammar failed ({self.grammar_failure}); open a new session")
            try:
                self.constraint.advance(self.context + tokens)
            except GrammarError as exc:
                raise BadRequest(str(exc)) from exc
        self.context.extend(tokens)

    def take_emitted(self, tokens: list[int]) -> None:
        """The context takes a pass's emitted tokens, whatever the grammar says: the KV already holds
        them. Each was drawn under the grammar's mask, so it allows them; were it not so, the
        session would refuse its next request rather than go on unconstrained."""
        self.context.extend(tokens)
        if self.constraint is not None and not self.grammar_failure:
            try:
                self.constraint.advance(self.context)
            except GrammarError as exc:
                self.grammar_failure = str(exc)
                log.error("session %s: the grammar refused the target's own token: %s", self.session_id, exc)

    def check_reach(self, tokens: list[int]) -> None:
        """A verify's first choice is at the context's end: under a grammar that starts later it
        would be unconstrained, so the context (with `tokens`) must first reach the grammar's start."""
        length = len(self.context) + len(tokens)
        if self.constraint is not None and length < self.constraint.start:
            raise BadRequest(
                f"the session's grammar starts at position {self.constraint.start} and the context would hold "
                f"{length} tokens; send the whole prompt (feed it, or with the verify) before drafting"
            )

    def verify_job(self, draft: list[int], parents: list[int]) -> VerifyJob:
        """Its next pass: the context not yet in its KV, then `draft` shaped by `parents`; with the
        grammar's masks after each of the draft's paths (computed here, on the CPU, once a verify),
        when the session has one."""
        masks = self.constraint.tree_masks(draft, parents) if self.constraint is not None else None
        return VerifyJob(
            self.kv,
            self.context[self.kv.length :],
            draft,
            parents,
            self.temperature,
            self.seed,
            self.stop_token_ids,
            masks,
            self.top_logprobs,
        )


class SessionStore:
    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(
        self,
        temperature: float,
        seed: int,
        stop_token_ids: frozenset[int],
        kv: Any,
        owner: Owner = LOCAL_OWNER,
        worker_id: str = "0",
        constraint: Constraint | None = None,
        top_logprobs: int | None = None,
    ) -> Session:
        session = Session(secrets.token_urlsafe(16), temperature, seed, stop_token_ids, kv, owner, worker_id)
        session.constraint, session.top_logprobs = constraint, top_logprobs
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str, owner: Owner = LOCAL_OWNER, touch: bool = True) -> Session:
        """The session, if `owner` opened it; another user's session is as unknown as a missing one.
        `touch` counts the request as use (a verify counts once its pass is applied instead)."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise SessionNotFound(f"no session {session_id!r} on this hub; open a new session")
        if touch:
            session.last_used = time.monotonic()
        return session

    def count(self, owner: Owner) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.owner == owner)

    def count_on(self, worker_id: str) -> int:
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.worker_id == worker_id)

    def drop_worker(self, worker_id: str) -> list[Session]:
        """Remove every session the worker held (it is lost, and their KV caches with it): a
        request that waited for one of them then finds it gone."""
        with self._lock:
            lost = [s for s in self._sessions.values() if s.worker_id == worker_id]
            for session in lost:
                del self._sessions[session.session_id]
                session.kv = None
        return lost

    def rehome(self, session: Session, worker_id: str, kv: Any) -> None:
        """Move a session to a slot on another worker (its own was lost), and back into the table
        if the lost worker's sessions were dropped meanwhile. One step with `drop_worker`: either
        the drop comes first and this undoes it, or it comes after and no longer sees the session.
        A session its user closed meanwhile stays out (its closing then gives the new slot back)."""
        with self._lock:
            dropped = session.session_id not in self._sessions and session.kv is None
            session.worker_id, session.kv = worker_id, kv
            if dropped:
                self._sessions[session.session_id] = session

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def evict_idle(self, max_idle_s: float) -> list[Session]:
        """Drop sessions unused for `max_idle_s`; a client resumes by re-sending its context."""
        cutoff = time.monotonic() - max_idle_s
        with self._lock:
            idle = [s for s in self._sessions.values() if s.last_used < cutoff and not s.turn.busy]
            for session in idle:
                del self._sessions[session.session_id]
        return idle

    def take_longest_idle(self, min_idle_s: float, worker_id: str | None = None) -> Session | None:
        """Remove and return the session unused the longest (of one worker's, if `worker_id`), if
        unused at least `min_idle_s` and not busy (a full hub makes room for a new session this
        way, and a full worker for a growing one, one at a time)."""
        cutoff = time.monotonic() - min_idle_s
        with self._lock:
            idle = [
                s
                for s in self._sessions.values()
                if s.last_used <= cutoff and not s.turn.busy and worker_id in (None, s.worker_id)
            ]
            if not idle:
                return None
            session = min(idle, key=lambda s: s.last_used)
            del self._sessions[session.session_id]
        return session

    def remove_owned_by(self, owners: set[Owner]) -> list[Session]:
        """Remove every session of these accounts (removed from the accounts database)."""
        with self._lock:
            gone = [s for s in self._sessions.values() if s.owner in owners]
            for session in gone:
                del self._sessions[session.session_id]
        return gone

    def remove(self, session_id: str, owner: Owner = LOCAL_OWNER) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.owner != owner:
                raise SessionNotFound(f"no session {session_id!r} on this hub")
            del self._sessions[session_id]
        return session

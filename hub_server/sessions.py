"""Sessions: each user's token context and settings. Plain Python, no torch.

The KV cache lives in the model runner; a session only holds an opaque handle to it, and the id
of the worker whose engine holds that cache (`placement.py`): the store is the hub's session table.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hub_server.errors import SessionNotFound

LOCAL_USER = "local"  # the owner's name on a hub without accounts (--no-auth, embedded)


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
    lock: threading.Lock = field(default_factory=threading.Lock)


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
    ) -> Session:
        session = Session(secrets.token_urlsafe(16), temperature, seed, stop_token_ids, kv, owner, worker_id)
        with self._lock:
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str, owner: Owner = LOCAL_OWNER) -> Session:
        """The session, if `owner` opened it; another user's session is as unknown as a missing one."""
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None or session.owner != owner:
            raise SessionNotFound(f"no session {session_id!r} on this hub; open a new session")
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
            idle = [s for s in self._sessions.values() if s.last_used < cutoff and not s.lock.locked()]
            for session in idle:
                del self._sessions[session.session_id]
        return idle

    def take_longest_idle(self, min_idle_s: float) -> Session | None:
        """Remove and return the session unused the longest, if unused at least `min_idle_s`
        and not busy (a full hub makes room for a new session this way, one at a time)."""
        cutoff = time.monotonic() - min_idle_s
        with self._lock:
            idle = [s for s in self._sessions.values() if s.last_used <= cutoff and not s.lock.locked()]
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

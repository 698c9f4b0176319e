"""Who may use this hub: users and their API tokens in SQLite, and the token check of a request.

A token is shown once, when it is created, and stored only as its sha256 hash, so the
database never holds a usable secret. Every request looks its token up afresh, so a revocation
or an expiry takes effect on the next request. The database runs in WAL mode: the admin commands
write while a running hub reads. Plain Python, no torch, no HTTP.

A damaged database is refused when it is opened (SQLite's integrity check), by `hub_server serve`
as by the admin commands, with what to do: restore it, or move it aside. A 0-byte file where the
accounts were is damage too, never "no accounts": every user's token would silently stop working.

A database file replaced while the hub runs (a backup restored with `mv`, a file deleted and put
back) is noticed within `RECHECK_S`: the hub reopens the file now at the path, so revocations made
there take effect; while no file is there, requests are refused 503 saying so.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hub_server.errors import AccountError, AccountsDamaged, AccountsUnavailable, TokenExpired
from hub_server.sessions import LOCAL_OWNER, Owner

if TYPE_CHECKING:
    from hub_server.config import HubSettings

TOKEN_PREFIX = "seh_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
ROLES = ("user", "operator")  # operators may also read the hub-wide /metrics page
RECHECK_S = 1.0  # how often the hub looks whether its database file was replaced

# Ordered and named; each runs once per database, in this order. Never edit one: append.
MIGRATIONS = (
    (
        "001_users_and_tokens",
        """
        CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        );
        CREATE TABLE tokens (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            revoked_at TEXT
        );
    """,
    ),
    ("002_token_expiry", "ALTER TABLE tokens ADD COLUMN expires_at TEXT;"),
    # Sessions belong to this id, not to the name: a name removed and added again is a new account.
    (
        "003_account_ids",
        """
        ALTER TABLE users ADD COLUMN account_id TEXT;
        UPDATE users SET account_id = 'acct_' || lower(hex(randomblob(8)));
        CREATE UNIQUE INDEX users_account_id ON users(account_id);
    """,
    ),
    ("004_roles", "ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'user';"),
)


def _file_identity(path: Path) -> tuple[int, int]:
    """Which file is at `path` (a replaced file has another inode)."""
    status = os.stat(path)
    return status.st_dev, status.st_ino


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _now() -> str:
    return _iso(datetime.now(timezone.utc))


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class User:
    name: str
    created_at: str
    active_tokens: int
    role: str = "user"


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    user: str
    created_at: str
    revoked_at: str | None
    expires_at: str | None = None


class TokenCheck(Protocol):
    def owner_for_token(self, token: str) -> Owner | None:
        """The account a bearer token belongs to, or None when it is unknown or revoked
        (TokenExpired past its expiry, AccountsUnavailable when the accounts cannot be read)."""

    def gone(self, owners: set[Owner]) -> set[Owner]:
        """Those of `owners` whose accounts no longer exist (their sessions are closed)."""


class SingleToken:
    """One pre-authorised token, held in memory: the embedded hub of `specedge chat`."""

    def __init__(self, token: str, owner: Owner = LOCAL_OWNER):
        self._digest = token_digest(token)
        self._owner = owner

    def owner_for_token(self, token: str) -> Owner | None:
        return self._owner if hmac.compare_digest(token_digest(token), self._digest) else None

    def gone(self, owners: set[Owner]) -> set[Owner]:
        return set()


def token_check_for(settings: HubSettings) -> TokenCheck | None:
    """How this hub checks tokens: one in-memory token (embedded), none (--no-auth), or the accounts database."""
    if settings.embedded_token:
        return SingleToken(settings.embedded_token)
    if not settings.auth:
        return None
    return Accounts(settings.accounts_path)


class Accounts:
    """The accounts database. Safe to share between the hub's request threads."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.RLock()  # a reopen under it migrates under it
        self._identity: tuple[int, int] | None = None
        self._open()

    def _open(self) -> None:
        path = self.path
        if path.is_file() and path.stat().st_size == 0:
            raise self._damaged("it is empty: 0 bytes where the accounts were")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
            os.chmod(path, 0o600)
            self._identity = _file_identity(path)
        except (OSError, sqlite3.Error) as exc:
            raise self._unreachable(exc) from exc
        self._checked_at = time.monotonic()
        try:
            self._check_integrity()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.OperationalError as exc:  # permissions, locks, I/O: not the file's contents
            self._db.close()
            raise self._unreachable(exc) from exc
        except sqlite3.DatabaseError as exc:  # "file is not a database", "disk image is malformed"
            self._db.close()
            raise self._damaged(str(exc)) from exc

    def _check_integrity(self) -> None:
        """Refuse a damaged file before anything reads it (the database is small: this takes ms)."""
        problems = [row[0] for row in self._db.execute("PRAGMA integrity_check(3)")]
        if problems != ["ok"]:
            self._db.close()
            raise self._damaged("; ".join(problems))

    def _damaged(self, why: str) -> AccountsDamaged:
        return AccountsDamaged(
            f"the accounts database {self.path} is damaged ({why}): restore it from a backup, or move it "
            f"aside (with any {self.path.name}-wal and -shm beside it) to start with no accounts"
        )

    def _unreachable(self, exc: Exception) -> AccountError:
        return AccountError(
            f"cannot open the accounts database {self.path} ({exc}); give --data-dir a folder this user can write"
        )

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
            done = {row[0] for row in self._db.execute("SELECT name FROM migrations")}
            for name, script in MIGRATIONS:
                if name not in done:
                    self._db.executescript(
                        f"BEGIN; {script} INSERT INTO migrations VALUES ('{name}', '{_now()}'); COMMIT;"
                    )

    def _follow_replacement(self) -> None:
        """Reopen the file at our path if it is no longer the one open (under the lock)."""
        now = time.monotonic()
        if now - self._checked_at < RECHECK_S:
            return
        self._checked_at = now
        try:
            identity = _file_identity(self.path)
        except OSError as exc:
            raise AccountsUnavailable(
                f"the accounts database {self.path} is gone ({exc.strerror}); operator: restore it from a backup "
                "(the hub reads it again within a second of its return)"
            ) from exc
        if identity == self._identity:
            return
        self._db.close()
        try:
            self._open()
        except AccountError as exc:  # a damaged or unreadable replacement: refuse until a good one is there
            self._identity = None
            raise AccountsUnavailable(f"the hub cannot use its replaced accounts database: {exc}") from exc

    def _query(self, sql: str, *args: object) -> list[tuple]:
        """Run one statement. A database that became unreadable while the hub runs is a 503 that
        says why, never a 500; a broken constraint is the caller's to explain."""
        with self._lock:
            self._follow_replacement()
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.IntegrityError:
                raise
            except sqlite3.DatabaseError as exc:
                raise AccountsUnavailable(
                    f"the hub cannot read its accounts database ({exc}); retry later. Operator: stop the hub "
                    f"and restore {self.path} from a backup, or move it aside to start with no accounts"
                ) from exc

    def add_user(self, name: str, role: str = "user") -> User:
        if not _NAME.fullmatch(name):
            raise AccountError(f"{name!r} is not a valid user name: use letters, digits and . _ @ - (at most 64)")
        if role not in ROLES:
            raise AccountError(f"{role!r} is not a role: use one of {', '.join(ROLES)}")
        try:
            self._query(
                "INSERT INTO users (name, created_at, account_id, role) VALUES (?, ?, ?, ?)",
                name,
                _now(),
                "acct_" + secrets.token_hex(8),
                role,
            )
        except sqlite3.IntegrityError as exc:
            raise AccountError(f"user {name!r} already exists") from exc
        return self.user(name)

    _USERS = (
        "SELECT u.name, u.created_at, COUNT(t.id), u.role FROM users u "
        "LEFT JOIN tokens t ON t.user_id = u.id AND t.revoked_at IS NULL "
        "AND (t.expires_at IS NULL OR t.expires_at > ?) "
    )

    def user(self, name: str) -> User:
        rows = self._query(self._USERS + "WHERE u.name = ? GROUP BY u.id", _now(), name)
        if not rows:
            raise AccountError(f"no user {name!r}; add one with `hub_server users add {name}`")
        return User(*rows[0])

    def users(self) -> list[User]:
        return [User(*row) for row in self._query(self._USERS + "GROUP BY u.id ORDER BY u.name", _now())]

    def remove_user(self, name: str) -> None:
        """Remove a user and every token of theirs."""
        self.user(name)
        self._query("DELETE FROM users WHERE name = ?", name)

    def create_token(self, user: str, expires_at: datetime | None = None) -> tuple[TokenRecord, str]:
        """A new token for `user` (valid until `expires_at`, or for good): its record and the
        secret, which is never stored and never shown again."""
        self.user(user)
        if expires_at is not None and expires_at <= datetime.now(timezone.utc):
            raise AccountError(f"the expiry {_iso(expires_at)} is already past; give a later one")
        token, token_id = new_token(), "tok_" + secrets.token_hex(6)
        self._query(
            "INSERT INTO tokens (id, user_id, sha256, created_at, expires_at) "
            "SELECT ?, id, ?, ?, ? FROM users WHERE name = ?",
            token_id,
            token_digest(token),
            _now(),
            expires_at and _iso(expires_at),
            user,
        )
        return self._token(token_id), token

    _TOKENS = (
        "SELECT t.id, u.name, t.created_at, t.revoked_at, t.expires_at FROM tokens t JOIN users u ON u.id = t.user_id"
    )

    def tokens(self, user: str | None = None) -> list[TokenRecord]:
        sql = self._TOKENS
        rows = (
            self._query(sql + " WHERE u.name = ? ORDER BY t.created_at", user)
            if user
            else self._query(sql + " ORDER BY u.name, t.created_at")
        )
        return [TokenRecord(*row) for row in rows]

    def _token(self, token_id: str) -> TokenRecord:
        rows = self._query(self._TOKENS + " WHERE t.id = ?", token_id)
        if not rows:
            raise AccountError(f"no token {token_id!r}; `hub_server tokens list` shows the ids")
        return TokenRecord(*rows[0])

    def revoke_token(self, token_id: str) -> TokenRecord:
        self._token(token_id)
        self._query("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", _now(), token_id)
        return self._token(token_id)

    def owner_for_token(self, token: str) -> Owner | None:
        rows = self._query(
            "SELECT u.account_id, u.name, u.role, t.expires_at FROM tokens t JOIN users u ON u.id = t.user_id "
            "WHERE t.sha256 = ? AND t.revoked_at IS NULL",
            token_digest(token),
        )
        if not rows:
            return None
        account_id, name, role, expires_at = rows[0]
        if expires_at is not None and datetime.fromisoformat(expires_at) <= datetime.now(timezone.utc):
            raise TokenExpired(
                f"the API token expired at {expires_at}; ask the hub's operator for a new one and run `specedge login`"
            )
        return Owner(account_id, name, operator=role == "operator")

    def gone(self, owners: set[Owner]) -> set[Owner]:
        if not owners:
            return set()
        ids = sorted({owner.account_id for owner in owners})
        marks = ", ".join("?" * len(ids))
        alive = {row[0] for row in self._query(f"SELECT account_id FROM users WHERE account_id IN ({marks})", *ids)}
        return {owner for owner in owners if owner.account_id not in alive}

"""Who may use this hub: users and their API tokens in SQLite, and the token check of a request.

A token is shown once, when it is created, and stored only as its sha256 hash, so the
database never holds a usable secret. Every request looks its token up afresh, so a revocation
takes effect on the next request. The database runs in WAL mode: the admin commands write while
a running hub reads. Plain Python, no torch, no HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from hub_server.errors import AccountError
from hub_server.sessions import LOCAL_USER

TOKEN_PREFIX = "seh_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

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
)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class User:
    name: str
    created_at: str
    active_tokens: int


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    user: str
    created_at: str
    revoked_at: str | None


class TokenCheck(Protocol):
    def user_for_token(self, token: str) -> str | None:
        """The user a bearer token belongs to, or None when it is unknown or revoked."""


class SingleToken:
    """One pre-authorised token, held in memory: the embedded hub of `specedge chat`."""

    def __init__(self, token: str, user: str = LOCAL_USER):
        self._digest = token_digest(token)
        self._user = user

    def user_for_token(self, token: str) -> str | None:
        return self._user if hmac.compare_digest(token_digest(token), self._digest) else None


class Accounts:
    """The accounts database. Safe to share between the hub's request threads."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
            os.chmod(path, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise AccountError(
                f"cannot open the accounts database {path} ({exc}); give --data-dir a folder this user can write"
            ) from exc

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

    def _query(self, sql: str, *args) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def add_user(self, name: str) -> User:
        if not _NAME.fullmatch(name):
            raise AccountError(f"{name!r} is not a valid user name: use letters, digits and . _ @ - (at most 64)")
        try:
            self._query("INSERT INTO users (name, created_at) VALUES (?, ?)", name, _now())
        except sqlite3.IntegrityError as exc:
            raise AccountError(f"user {name!r} already exists") from exc
        return self.user(name)

    def user(self, name: str) -> User:
        rows = self._query(
            "SELECT u.name, u.created_at, COUNT(t.id) FROM users u "
            "LEFT JOIN tokens t ON t.user_id = u.id AND t.revoked_at IS NULL WHERE u.name = ? GROUP BY u.id",
            name,
        )
        if not rows:
            raise AccountError(f"no user {name!r}; add one with `hub_server users add {name}`")
        return User(*rows[0])

    def users(self) -> list[User]:
        rows = self._query(
            "SELECT u.name, u.created_at, COUNT(t.id) FROM users u "
            "LEFT JOIN tokens t ON t.user_id = u.id AND t.revoked_at IS NULL GROUP BY u.id ORDER BY u.name"
        )
        return [User(*row) for row in rows]

    def remove_user(self, name: str) -> None:
        """Remove a user and every token of theirs."""
        self.user(name)
        self._query("DELETE FROM users WHERE name = ?", name)

    def create_token(self, user: str) -> tuple[TokenRecord, str]:
        """A new token for `user`: its record and the secret, which is never stored and never shown again."""
        self.user(user)
        token, token_id = new_token(), "tok_" + secrets.token_hex(6)
        self._query(
            "INSERT INTO tokens (id, user_id, sha256, created_at) SELECT ?, id, ?, ? FROM users WHERE name = ?",
            token_id,
            token_digest(token),
            _now(),
            user,
        )
        return self._token(token_id), token

    def tokens(self, user: str | None = None) -> list[TokenRecord]:
        sql = "SELECT t.id, u.name, t.created_at, t.revoked_at FROM tokens t JOIN users u ON u.id = t.user_id"
        rows = (
            self._query(sql + " WHERE u.name = ? ORDER BY t.created_at", user)
            if user
            else self._query(sql + " ORDER BY u.name, t.created_at")
        )
        return [TokenRecord(*row) for row in rows]

    def _token(self, token_id: str) -> TokenRecord:
        rows = self._query(
            "SELECT t.id, u.name, t.created_at, t.revoked_at FROM tokens t "
            "JOIN users u ON u.id = t.user_id WHERE t.id = ?",
            token_id,
        )
        if not rows:
            raise AccountError(f"no token {token_id!r}; `hub_server tokens list` shows the ids")
        return TokenRecord(*rows[0])

    def revoke_token(self, token_id: str) -> TokenRecord:
        self._token(token_id)
        self._query("UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", _now(), token_id)
        return self._token(token_id)

    def user_for_token(self, token: str) -> str | None:
        rows = self._query(
            "SELECT u.name FROM tokens t JOIN users u ON u.id = t.user_id WHERE t.sha256 = ? AND t.revoked_at IS NULL",
            token_digest(token),
        )
        return rows[0][0] if rows else None

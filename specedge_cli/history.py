"""Conversations kept in SQLite in the user data directory (`logs.db`).

Every turn is written as it happens: the prompt (text and token ids) before its reply is
generated, the reply when it is complete, so a killed terminal loses at most the reply being
generated. The token ids are what the hub's context held, which is what resuming a conversation
feeds a new hub session. The schema grows by ordered, named migrations; each runs once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from specedge_cli.conversation import Turn
from specedge_cli.decoding import TurnStats
from specedge_cli.errors import ConversationNotFound

T = TypeVar("T")

# Several chats may write at once (each its own conversation): readers never wait in WAL mode,
# a writer waits for another's write up to the busy timeout, and a few retries beyond it.
BUSY_TIMEOUT_S = 10.0
RETRY_DELAYS_S = (0.1, 0.3, 1.0)


def _m001_conversations(db: sqlite3.Connection) -> None:
    for statement in (
        """CREATE TABLE conversations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at TEXT NOT NULL,
            model TEXT NOT NULL,            -- the --model the user gave (preset name or path)
            hub TEXT NOT NULL,
            system TEXT NOT NULL DEFAULT '',
            vocab_fingerprint TEXT NOT NULL -- token ids only mean something with this vocabulary
        )""",
        """CREATE TABLE turns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL,
            prompt TEXT NOT NULL,
            prompt_token_ids TEXT NOT NULL, -- JSON list
            reply TEXT,                     -- NULL until the reply is complete (or stopped)
            reply_token_ids TEXT,
            interrupted INTEGER NOT NULL DEFAULT 0,
            stats TEXT
        )""",
        "CREATE INDEX turns_by_conversation ON turns(conversation_id, id)",
    ):
        db.execute(statement)


# Each step runs inside the migration's transaction: plain `execute`s, never `executescript`,
# which commits whatever transaction is open before it runs.
MIGRATIONS: list[tuple[str, Callable[[sqlite3.Connection], None]]] = [
    ("m001_conversations", _m001_conversations),
]


def migrate(db: sqlite3.Connection) -> None:
    """Apply the migrations this database has not seen, in order, in one write transaction: two
    chats opening a new database at once migrate it once."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    if not _pending(db):
        return
    db.execute("BEGIN IMMEDIATE")  # the write lock first: another chat may be migrating now
    try:
        for name, step in _pending(db):
            step(db)
            db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, _now()))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _pending(db: sqlite3.Connection) -> list[tuple[str, Callable[[sqlite3.Connection], None]]]:
    applied = {row[0] for row in db.execute("SELECT name FROM _migrations")}
    return [(name, step) for name, step in MIGRATIONS if name not in applied]


def _retrying(call: Callable[[], T]) -> T:
    """Run a statement, trying again while another chat holds the database past the busy timeout."""
    for delay in RETRY_DELAYS_S:
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            time.sleep(delay)
    return call()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    created_at: str
    model: str
    hub: str
    first_prompt: str
    turns: int


@dataclass(frozen=True)
class SavedConversation:
    id: int
    model: str
    hub: str
    system: str
    vocab_fingerprint: str
    turns: list[Turn]


class History:
    """The conversation database."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        _retrying(lambda: self.db.execute("PRAGMA journal_mode = WAL"))
        self.db.execute("PRAGMA foreign_keys = ON")
        _retrying(lambda: migrate(self.db))

    def close(self) -> None:
        self.db.close()

    def _execute(self, sql: str, parameters: tuple = ()) -> sqlite3.Cursor:
        return _retrying(lambda: self.db.execute(sql, parameters))

    def start(self, model: str, hub: str, system: str, vocab_fingerprint: str) -> int:
        cursor = self._execute(
            "INSERT INTO conversations (created_at, model, hub, system, vocab_fingerprint) VALUES (?, ?, ?, ?, ?)",
            (_now(), model, hub, system, vocab_fingerprint),
        )
        return int(cursor.lastrowid or 0)

    def add_prompt(self, conversation_id: int, turn: Turn) -> int:
        cursor = self._execute(
            "INSERT INTO turns (conversation_id, created_at, prompt, prompt_token_ids) VALUES (?, ?, ?, ?)",
            (conversation_id, _now(), turn.prompt, json.dumps(turn.prompt_token_ids)),
        )
        return int(cursor.lastrowid or 0)

    def add_reply(self, turn_id: int, turn: Turn, stats: TurnStats) -> None:
        self._execute(
            "UPDATE turns SET reply = ?, reply_token_ids = ?, interrupted = ?, stats = ? WHERE id = ?",
            (turn.reply, json.dumps(turn.token_ids), int(turn.interrupted), json.dumps(stats.to_json()), turn_id),
        )

    def delete_turn(self, turn_id: int) -> None:
        self._execute("DELETE FROM turns WHERE id = ?", (turn_id,))

    def last_id(self) -> int | None:
        row = self._execute("SELECT max(id) FROM conversations").fetchone()
        return row[0]

    def summaries(self, limit: int = 50) -> list[ConversationSummary]:
        rows = self._execute(
            """
            SELECT c.id, c.created_at, c.model, c.hub,
                   (SELECT prompt FROM turns t WHERE t.conversation_id = c.id ORDER BY t.id LIMIT 1),
                   (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id)
            FROM conversations c ORDER BY c.id DESC LIMIT ?""",
            (limit,),
        )
        return [ConversationSummary(r[0], r[1], r[2], r[3], r[4] or "", r[5]) for r in rows]

    def load(self, conversation_id: int) -> SavedConversation:
        """A saved conversation; turns whose reply never completed are left out of its context."""
        row = self._execute(
            "SELECT id, model, hub, system, vocab_fingerprint FROM conversations WHERE id = ?", (conversation_id,)
        ).fetchone()
        if row is None:
            raise ConversationNotFound(
                f"no conversation {conversation_id}; run `specedge logs list` to see the saved ones"
            )
        conversation_id, model, hub, system, fingerprint = row
        turns = self.turns(conversation_id, complete_only=True)
        return SavedConversation(conversation_id, model, hub, system, fingerprint, turns=turns)

    def turns(self, conversation_id: int, complete_only: bool = False) -> list[Turn]:
        rows = self._execute(
            "SELECT id, prompt, prompt_token_ids, reply, reply_token_ids, interrupted FROM turns "
            "WHERE conversation_id = ? ORDER BY id",
            (conversation_id,),
        )
        turns = [_turn(*row) for row in rows]
        return [t for t in turns if t.sent] if complete_only else turns


def _turn(
    turn_id: int, prompt: str, prompt_ids: str, reply: str | None, reply_ids: str | None, interrupted: int
) -> Turn:
    return Turn(
        prompt=prompt,
        prompt_token_ids=json.loads(prompt_ids),
        token_ids=json.loads(reply_ids or "[]"),
        reply=reply or "",
        interrupted=bool(interrupted),
        sent=reply is not None,
        log_id=turn_id,
    )


class ConversationLog:
    """Writes one conversation's turns to the database as `Conversation` produces them.

    The conversation's row is created with its first prompt, so a chat that never says
    anything leaves nothing behind.
    """

    def __init__(
        self,
        history: History,
        model: str,
        hub: str,
        system: str,
        vocab_fingerprint: str,
        conversation_id: int | None = None,
    ):
        self.history = history
        self.model, self.hub, self.system, self.fingerprint = model, hub, system, vocab_fingerprint
        self.conversation_id = conversation_id

    def prompt_sent(self, turn: Turn) -> None:
        if self.conversation_id is None:
            self.conversation_id = self.history.start(self.model, self.hub, self.system, self.fingerprint)
        turn.log_id = self.history.add_prompt(self.conversation_id, turn)

    def reply_done(self, turn: Turn, stats: TurnStats) -> None:
        if turn.log_id is not None:
            self.history.add_reply(turn.log_id, turn, stats)

    def turn_dropped(self, turn: Turn) -> None:
        if turn.log_id is not None:
            self.history.delete_turn(turn.log_id)

    def new_conversation(self, system: str) -> None:
        """/clear: the next prompt starts a new saved conversation."""
        self.conversation_id, self.system = None, system


def history_path(data_dir: Path) -> Path:
    return data_dir / "logs.db"

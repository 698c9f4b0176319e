"""The conversation database: ordered migrations, turns kept as they happen."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time

from specedge_cli.conversation import Turn
from specedge_cli.decoding import TurnStats
from specedge_cli.history import MIGRATIONS, ConversationLog, History, migrate
from tests.conftest import REPO


def test_migrations_run_once_in_order(tmp_path):
    db = sqlite3.connect(tmp_path / "logs.db")
    migrate(db)
    migrate(db)
    names = [row[0] for row in db.execute("SELECT name FROM _migrations ORDER BY rowid")]
    assert names == [name for name, _ in MIGRATIONS] == sorted(names)


def test_prompt_is_kept_before_its_reply_and_an_unfinished_turn_is_left_out_of_the_context(tmp_path):
    history = History(tmp_path / "logs.db")
    log = ConversationLog(history, "tiny.gguf", "http://hub", "", "fp")
    done = Turn("first", [1, 2], sent=True)
    log.prompt_sent(done)
    assert history.turns(log.conversation_id)[0].prompt == "first"  # saved before any reply
    done.token_ids, done.reply = [3, 4], "ok"
    log.reply_done(done, TurnStats())
    log.prompt_sent(Turn("killed mid-reply", [5]))
    reopened = History(tmp_path / "logs.db").load(log.conversation_id)
    assert [(t.prompt, t.prompt_token_ids, t.token_ids) for t in reopened.turns] == [("first", [1, 2], [3, 4])]
    assert len(history.turns(log.conversation_id)) == 2


# One chat's writes, as `specedge chat` makes them: open the database, then a conversation of
# prompts and replies; it waits for the signal to start, so every process opens the new database at once.
CHAT_WRITER = """
import sys, time
from pathlib import Path
from specedge_cli.conversation import Turn
from specedge_cli.decoding import TurnStats
from specedge_cli.history import ConversationLog, History
folder, name, turns = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(folder / f"ready-{name}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
log = ConversationLog(History(folder / "logs.db"), "tiny.gguf", "http://hub", "", "fp")
for i in range(turns):
    turn = Turn(f"{name} prompt {i}", [i], sent=True)
    log.prompt_sent(turn)
    turn.token_ids, turn.reply = [i, i + 1], f"{name} reply {i}"
    log.reply_done(turn, TurnStats())
"""


def test_chats_writing_at_once_keep_every_turn(tmp_path):
    """Chats started together (a script running them in parallel) on a database none has created yet."""
    chats, turns = 8, 40
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", CHAT_WRITER, str(tmp_path), f"chat{n}", str(turns)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(chats)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < chats and time.monotonic() < deadline:
        time.sleep(0.02)
    (tmp_path / "go").touch()
    failures = [w.communicate(timeout=120)[1] for w in writers if w.wait(timeout=120) != 0]
    assert not failures, failures[0]
    history = History(tmp_path / "logs.db")
    saved = history.summaries()
    assert len(saved) == chats and {s.turns for s in saved} == {turns}
    for summary in saved:
        kept = history.load(summary.id).turns
        name = kept[0].prompt.split()[0]
        assert [(t.prompt, t.reply) for t in kept] == [
            (f"{name} prompt {i}", f"{name} reply {i}") for i in range(turns)
        ]

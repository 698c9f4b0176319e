"""The conversation database: ordered migrations, turns kept as they happen."""

from __future__ import annotations

import sqlite3

from specedge_cli.decoding import Turn, TurnStats
from specedge_cli.history import MIGRATIONS, ConversationLog, History, migrate


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

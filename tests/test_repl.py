"""The chat REPL as a person uses it: a real terminal (tmux), a real hub, the tiny draft model.

What the screen shows is checked on the screen; what was decoded is checked token for token
against the target alone, from the conversation log the REPL keeps.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.history import History, history_path
from tests.conftest import REPO, RunningHub, run_specedge

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make test installs it)")


class Terminal:
    """One tmux session on a private server: send keys, read the screen."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.socket = f"specedge-test-{os.getpid()}-{time.monotonic_ns()}"
        shell = f"cd {shlex.quote(str(REPO))} && {shlex.join(command)}; echo EXIT:$?; sleep 600"
        env_args = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        self._tmux("new-session", "-d", "-x", "160", "-y", "50", *env_args, shell)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-l", text)
        self.send("Enter")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-J", "-S", "-")

    def wait_for(self, text: str, count: int = 1, timeout_s: float = 120) -> str:
        return self.wait_until(lambda screen: screen.count(text) >= count, f"{text!r} (x{count})", timeout_s)

    def wait_until(self, shown, what: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = self.screen()
            if shown(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{what} never appeared; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def terminal(tiny, hub, tmp_path):
    opened: list[Terminal] = []

    def open_chat(*args: str) -> Terminal:
        command = [sys.executable, "-m", "specedge_cli", "chat", "--hub", hub.url, "--model", str(tiny.gguf_q8), *args]
        term = Terminal(command, {"SPECEDGE_HOME": os.environ["SPECEDGE_HOME"]})
        opened.append(term)
        term.wait_for(">>> ")
        return term

    yield open_chat
    for term in opened:
        term.close()


def assert_log_equals_target_alone(target_alone, engine_stop: frozenset[int]) -> int:
    """Every saved reply equals the target's own decoding of its conversation so far."""
    history = History(history_path(Path(os.environ["SPECEDGE_HOME"]) / "data"))
    checked = 0
    for summary in history.summaries():
        context: list[int] = []
        for turn in history.turns(summary.id, complete_only=True):
            context += turn.prompt_token_ids
            assert turn.token_ids, turn
            assert turn.token_ids == target_alone.decode(context, len(turn.token_ids), engine_stop)
            context += turn.token_ids
            checked += 1
    return checked


def test_repl_turns_commands_and_figures(terminal, tiny, target_alone):
    term = terminal("--max-tokens", "12", "--draft-len", "4")
    term.type("/?")
    term.wait_for("/regen")
    term.type("the cat sat on")
    screen = term.wait_for("tok/verify")
    figures = [line for line in screen.splitlines() if "tok/verify" in line][-1]
    assert "(cut at the limit of 12 tokens; /set max-tokens N for longer replies)" in term.wait_for("(cut at")
    assert figures.startswith("[ draft ") and " t/s | accepted " in figures and "% | " in figures
    assert "| RTT " in figures and figures.endswith(" t/s ]")
    term.type('"""numbers: one')
    term.wait_for("... ")
    term.type('two three"""')
    term.wait_for("tok/verify", count=2)
    term.type("/set max-tokens 5")
    term.type("/set temperature hot")  # refused by the parser flags and `config set` use, in its words
    term.wait_for("/set temperature: 'hot' is not a valid temperature (expected a number, at least 0); see /?")
    term.type("/set proactive maybe")
    term.wait_for("expected on, off or auto")
    term.type("/show")
    screen = term.wait_for("max-tokens   5")
    assert str(tiny.gguf_q8) in screen and "conversation 1 (2 turns)" in screen
    assert (
        "target       hf" in screen and "temperature  0\n" in screen
    )  # the hub's model; the refused value left no trace
    term.type("/regen")
    term.wait_for("tok/verify", count=3)
    term.type("/clear")
    term.wait_for("Cleared")
    term.type("once upon a time")
    term.wait_for("tok/verify", count=4)
    term.type("/bye")
    term.wait_for("EXIT:0")
    stop = frozenset(DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2).stop_token_ids())
    assert assert_log_equals_target_alone(target_alone, stop) == 3  # two turns (one regenerated), then one
    history = History(history_path(Path(os.environ["SPECEDGE_HOME"]) / "data"))
    assert [s.first_prompt for s in history.summaries()] == ["once upon a time", "the cat sat on"]
    assert history.turns(1)[1].prompt == "numbers: one\ntwo three"


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(terminal, tiny, target_alone):
    term = terminal("--max-tokens", "600", "--draft-len", "1")
    term.type("once upon a time there was")
    term.wait_until(lambda screen: len(screen.split("there was\n", 1)[-1].strip()) > 5, "the reply's first tokens")
    term.send("C-c")
    term.wait_for("(stopped)")
    term.wait_for(">>> ", count=2)
    term.type("/set max-tokens 8")
    term.type("the cat sat on")  # a new session holds exactly what the client kept of the stopped reply
    term.wait_for("tok/verify", count=2)
    term.send("C-c")
    term.wait_for("Press Ctrl+C again")
    term.send("C-c")
    term.wait_for("EXIT:130")
    stop = frozenset(DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2).stop_token_ids())
    history = History(history_path(Path(os.environ["SPECEDGE_HOME"]) / "data"))
    first, second = history.turns(1)
    assert first.interrupted and 0 < len(first.token_ids) < 600
    assert not second.interrupted and len(second.token_ids) <= 8
    assert assert_log_equals_target_alone(target_alone, stop) == 2


def test_ctrl_d_leaves_with_0(terminal):
    term = terminal()
    term.send("C-d")
    term.wait_for("EXIT:0")


def test_continue_resumes_the_last_conversation_in_a_new_session(tiny, hub, target_alone):
    common = ["--hub", hub.url, "--model", str(tiny.gguf_q8), "--max-tokens", "10", "--json"]
    first = json.loads(run_specedge("chat", "--prompt", "the dog ran", *common).stdout)
    result = run_specedge("chat", "--continue", "--prompt", "and then", *common)
    assert result.returncode == 0, result.stderr
    assert "Continuing conversation 1 (1 turns)" in result.stderr
    second = json.loads(result.stdout)
    stop = frozenset(DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2).stop_token_ids())
    context = first["prompt_token_ids"] + first["token_ids"] + second["prompt_token_ids"]
    assert second["token_ids"] == target_alone.decode(context, 10, stop)
    third = json.loads(run_specedge("chat", "--conversation", "1", "--prompt", "more", *common).stdout)
    shown = json.loads(run_specedge("logs", "show", "1", "--json").stdout)
    assert [t["token_ids"] for t in shown["turns"]] == [first["token_ids"], second["token_ids"], third["token_ids"]]
    listed = run_specedge("logs", "list").stdout.splitlines()
    assert (
        len(listed) == 1
        and listed[0].split()[0] == "1"
        and tiny.gguf_q8.name in listed[0]
        and "the dog ran" in listed[0]
    )


def test_logs_off_keeps_nothing_and_on_keeps_again(tiny, hub):
    assert run_specedge("logs", "off").returncode == 0
    common = ["--hub", hub.url, "--model", str(tiny.gguf_f32), "--max-tokens", "3", "--json", "--prompt", "hi"]
    assert run_specedge("chat", *common).returncode == 0
    assert run_specedge("logs", "list").stdout == ""
    run_specedge("logs", "on")
    assert run_specedge("chat", *common).returncode == 0
    assert len(run_specedge("logs", "list").stdout.splitlines()) == 1
    assert run_specedge("logs", "path").stdout.strip().endswith("logs.db")
    missing = run_specedge("chat", "--conversation", "42", *common)
    assert missing.returncode == 1 and "no conversation 42; run `specedge logs list`" in missing.stderr


def test_a_hub_that_goes_away_is_one_line_and_the_repl_stays(tiny, tmp_path, target_alone):
    own_hub = RunningHub(tiny.hf_dir, tmp_path / "hub")
    term = Terminal(
        [
            sys.executable,
            "-m",
            "specedge_cli",
            "chat",
            "--hub",
            own_hub.url,
            "--model",
            str(tiny.gguf_f32),
            "--max-tokens",
            "6",
        ],
        {"SPECEDGE_HOME": os.environ["SPECEDGE_HOME"], "SPECEDGE_RECONNECT_S": "1"},
    )
    try:
        term.wait_for(">>> ")
        term.type("the cat sat on")
        term.wait_for("tok/verify")
        own_hub.process.kill()
        own_hub.process.wait()
        term.type("and then")
        screen = term.wait_for("Error: lost the hub")
        assert "run `specedge chat --continue` when the hub is back" in screen and "Traceback" not in screen
        term.wait_for(">>> ", count=3)
        term.type("/bye")
        term.wait_for("EXIT:0")
    finally:
        term.close()
        own_hub.stop()
    history = History(history_path(Path(os.environ["SPECEDGE_HOME"]) / "data"))
    assert [turn.prompt for turn in history.turns(1)] == ["the cat sat on", "and then"]
    # The prompt the outage left unanswered stays in the context, so `--continue` answers it in context.
    assert [turn.prompt for turn in history.load(1).turns] == ["the cat sat on", "and then"]

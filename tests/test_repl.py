"""The chat REPL as a person uses it: a real terminal (tmux), a real hub, the tiny draft model.

What the screen shows is checked on the screen; what was decoded is checked token for token
against the target alone, from the conversation log the REPL keeps.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
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

    def embedded_hub_pid(self) -> int:
        """The process id of the embedded hub the chat in this terminal started."""
        shell = int(self._tmux("list-panes", "-F", "#{pane_pid}").split()[0])
        chats = [pid for pid in children(shell) if b"specedge_cli" in cmdline(pid)]
        hubs = [pid for chat in chats for pid in children(chat) if b"hub_server" in cmdline(pid)]
        assert len(hubs) == 1, (chats, hubs)
        return hubs[0]


def children(of: int) -> list[int]:
    """The processes whose parent is `of` (from /proc, as `ps` reads them)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        if int(fields[1]) == of:
            found.append(int(stat.parent.name))
    return found


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def gone_within(pid: int, timeout_s: float) -> bool:
    """True once process `pid` has ended (or is a zombie, waiting for its parent to read it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


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


def embedded_chat(tiny, *args: str) -> Terminal:
    """`specedge chat` in a terminal with no hub configured: it starts an embedded hub serving the
    draft's own GGUF (the perfect draft's, so the target is the tiny target itself)."""
    command = [sys.executable, "-m", "specedge_cli", "chat", "--model", str(tiny.gguf_f32), *args]
    term = Terminal(command, {"SPECEDGE_HOME": os.environ["SPECEDGE_HOME"]})
    try:  # a first start converts the GGUF target: minutes on a loaded machine
        screen = term.wait_until(lambda shown: ">>> " in shown or "EXIT:" in shown, "the prompt", timeout_s=300)
        assert ">>> " in screen, screen
    except BaseException:
        term.close()
        raise
    return term


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
    stop = frozenset(DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2).vocab.stop_token_ids())
    assert assert_log_equals_target_alone(target_alone, stop) == 3  # two turns (one regenerated), then one
    history = History(history_path(Path(os.environ["SPECEDGE_HOME"]) / "data"))
    assert [s.first_prompt for s in history.summaries()] == ["once upon a time", "the cat sat on"]
    assert history.turns(1)[1].prompt == "numbers: one\ntwo three"


def stop_a_reply(term) -> None:
    """Ask for a long reply and stop it with Ctrl+C once its first tokens show."""
    term.type("once upon a time there was")
    term.wait_until(lambda screen: len(screen.split("there was\n", 1)[-1].strip()) > 5, "the reply's first tokens")
    term.send("C-c")
    term.wait_for("(stopped)")


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(terminal, tiny, target_alone):
    term = terminal("--max-tokens", "600", "--draft-len", "1")
    stop_a_reply(term)
    term.wait_for(">>> ", count=2)
    term.type("/set max-tokens 8")
    term.type("the cat sat on")  # a new session holds exactly what the client kept of the stopped reply
    term.wait_for("tok/verify", count=2)
    term.send("C-c")
    term.wait_for("Press Ctrl+C again")
    term.send("C-c")
    term.wait_for("EXIT:130")
    stop = frozenset(DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2).vocab.stop_token_ids())
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
    stop = frozenset(DraftEngine(tiny.gguf_q8, n_ctx=1024, n_threads=2).vocab.stop_token_ids())
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


def test_ctrl_c_reaches_the_chat_and_never_its_embedded_hub(tiny, target_alone):
    term = embedded_chat(tiny, "--max-tokens", "600", "--draft-len", "1")
    try:
        hub = term.embedded_hub_pid()
        assert os.getsid(hub) != os.getsid(parent(hub))  # out of the chat's terminal session and its signals
        stop_a_reply(term)
        term.wait_for(">>> ", count=2)
        term.send("C-c")
        term.wait_for("Press Ctrl+C again or Ctrl+D to leave")
        term.type("/show")
        screen = term.wait_for("conversation 1 (1 turns)")
        assert f"target       {tiny.gguf_f32.name}" in screen, screen
        term.type("/set max-tokens 8")
        term.type("the cat sat on")
        screen = term.wait_for("tok/verify", count=2)
        assert "Error" not in screen and "reconnecting" not in screen and "starting it again" not in screen
        term.send("C-c")
        term.wait_for("Press Ctrl+C again", count=2)
        term.send("C-c")
        term.wait_for("EXIT:130")
        assert gone_within(hub, 15)  # the chat stops its hub as it leaves
    finally:
        term.close()
    stop = frozenset(DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=2).vocab.stop_token_ids())
    assert assert_log_equals_target_alone(target_alone, stop) == 2


def test_a_killed_embedded_hub_is_started_again_within_the_turn(tiny, target_alone):
    term = embedded_chat(tiny, "--max-tokens", "600", "--draft-len", "1")

    def reply(screen: str) -> str:
        return screen.split("there was\n", 1)[-1].strip()

    try:
        first = term.embedded_hub_pid()
        term.type("once upon a time there was")
        term.wait_until(lambda screen: len(reply(screen)) > 5, "the reply's first tokens")
        os.kill(first, signal.SIGSTOP)  # held mid-reply, then killed there
        shown = len(reply(term.screen()))
        os.kill(first, signal.SIGKILL)
        # One line while it starts again; in a terminal it is erased once the reply goes on.
        term.wait_for("the embedded hub was killed (SIGKILL); starting it again")
        term.wait_until(
            lambda screen: "starting it again" not in screen and len(reply(screen)) > shown + 20, "the reply going on"
        )
        term.send("C-c")  # enough of it: what came before and after the restart is checked below
        term.wait_for("(stopped)")
        second = term.embedded_hub_pid()
        assert second != first
        term.type("/set max-tokens 8")
        os.kill(second, signal.SIGKILL)  # at the prompt: the next message brings it back
        assert gone_within(second, 15)
        term.type("the cat sat on")
        term.wait_for("starting it again")
        screen = term.wait_for("tok/verify", count=2)
        assert "Error" not in screen and "Traceback" not in screen and "reconnecting" not in screen
        term.type("/bye")
        term.wait_for("EXIT:0")
    finally:
        term.close()
    history = History(history_path(Path(os.environ["SPECEDGE_HOME"]) / "data"))
    assert [turn.interrupted for turn in history.turns(1)] == [True, False]
    stop = frozenset(DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=2).vocab.stop_token_ids())
    assert assert_log_equals_target_alone(target_alone, stop) == 2  # lossless across both restarts


def test_a_turn_the_hub_never_answers_keeps_its_prompt_for_continue(tiny, hub, tmp_path, target_alone):
    """Ctrl+C mid-reply leaves the hub session in doubt, so the next turn reopens it first; the hub
    is gone by then: that turn fails, and its prompt is what `--continue` answers."""
    own_hub = RunningHub(tiny.hf_dir, tmp_path / "hub")
    command = [sys.executable, "-m", "specedge_cli", "chat", "--hub", own_hub.url, "--model", str(tiny.gguf_f32)]
    term = Terminal(
        [*command, "--max-tokens", "600", "--draft-len", "1"],
        {"SPECEDGE_HOME": os.environ["SPECEDGE_HOME"], "SPECEDGE_RECONNECT_S": "1"},
    )
    try:
        term.wait_for(">>> ")
        stop_a_reply(term)
        own_hub.stop()
        term.type("and then")
        screen = term.wait_for("Error: lost the hub")
        assert "run `specedge chat --continue` when the hub is back" in screen
        term.type("/bye")
        term.wait_for("EXIT:0")
    finally:
        term.close()
        own_hub.stop()
    history = History(history_path(Path(os.environ["SPECEDGE_HOME"]) / "data"))
    saved = history.load(1).turns
    assert [turn.prompt for turn in saved] == ["once upon a time there was", "and then"]
    result = run_specedge(
        "chat", "--continue", "more", "--hub", hub.url, "--model", str(tiny.gguf_f32), "-n", "6", "--json"
    )
    assert result.returncode == 0 and "Continuing conversation 1 (2 turns)" in result.stderr, result.stderr
    out = json.loads(result.stdout)
    context = [t for turn in saved for t in turn.prompt_token_ids + turn.token_ids] + out["prompt_token_ids"]
    stop = frozenset(DraftEngine(tiny.gguf_f32, n_ctx=1024, n_threads=2).vocab.stop_token_ids())
    assert out["token_ids"] == target_alone.decode(context, 6, stop)


def test_a_reply_that_fills_the_context_says_so_and_the_repl_goes_on(tiny, tmp_path):
    small = RunningHub(tiny.hf_dir, tmp_path / "hub", "--max-context", "48")
    command = [sys.executable, "-m", "specedge_cli", "chat", "--hub", small.url, "--model", str(tiny.gguf_f32)]
    term = Terminal([*command, "--max-tokens", "5000"], {"SPECEDGE_HOME": os.environ["SPECEDGE_HOME"]})
    try:
        term.wait_for(">>> ")
        term.type("the dog ran")
        term.wait_for("(cut at the end of the context, 48 tokens; /clear starts a new conversation)")
        term.type("and then")  # no room left for it: refused, and the chat goes on
        screen = term.wait_for("start a new conversation (/clear)")
        assert "Error: " in screen and "Traceback" not in screen
        term.type("/clear")
        term.type("/set max-tokens 4")
        term.type("the cat sat on")
        term.wait_for("tok/verify", count=2)
        term.type("/bye")
        term.wait_for("EXIT:0")
    finally:
        term.close()
        small.stop()
    history = History(history_path(Path(os.environ["SPECEDGE_HOME"]) / "data"))
    first, second = history.summaries()[::-1]
    assert first.turns == 1 and second.turns == 1  # the refused prompt is not kept

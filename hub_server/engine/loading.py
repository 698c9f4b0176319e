"""Loading the target model and its vocabulary from a GGUF file or a Hugging Face folder.

A GGUF target is dequantized into torch by transformers. That conversion is slow (tens of
seconds for a 270M model), so the converted weights are kept in the hub's cache directory and
later starts load them directly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from hub_server.vocabulary import Vocabulary, gguf_vocabulary

log = logging.getLogger("hub_server.loading")

KEEP_CONVERTED = 4  # converted GGUF targets kept in the cache, the most recently used
STALE_PARTIAL_S = 24 * 3600  # a conversion left half-written this long ago was abandoned


def read_vocabulary(model_path: Path) -> Vocabulary:
    if model_path.is_file():
        return gguf_vocabulary(model_path)
    return _hf_vocabulary(model_path)


def _hf_vocabulary(folder: Path) -> Vocabulary:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    by_id = {index: piece for piece, index in tokenizer.get_vocab().items()}
    return Vocabulary(tuple(by_id.get(i, "") for i in range(max(by_id) + 1)))


def choose_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def choose_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_target(model_path: Path, device: str, dtype: torch.dtype, cache_dir: Path):
    """The target as an eval-mode transformers causal LM on `device`."""
    from transformers import AutoModelForCausalLM

    if model_path.is_file():
        folder = _converted_gguf(model_path, dtype, cache_dir)
    else:
        folder = model_path
    # sdpa takes the boolean 4D masks the runner builds for batched tree verification.
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()


def _converted_gguf(path: Path, dtype: torch.dtype, cache_dir: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    folder = cache_dir / "converted" / f"{path.stem}-{key}"
    if (folder / "config.json").exists():
        os.utime(folder)  # used now: the last to be pruned
        return folder
    from transformers import AutoModelForCausalLM

    log.info("converting %s into torch (once; kept in %s)", path.name, folder)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    _save_plain(model, partial)
    # Several hubs may convert at once; the first rename wins and the others drop their copy.
    try:
        partial.rename(folder)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    prune_converted(folder.parent, KEEP_CONVERTED)
    return folder


def prune_converted(root: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` most recently used conversions (a float32 copy of a 1.5B
    target is 6 GB, and every new file or dtype makes another), and conversions abandoned
    half-written; returns what was deleted. A hub already running keeps the weights it loaded."""
    entries = list(root.iterdir())
    done = sorted(
        (p for p in entries if (p / "config.json").exists() and ".partial-" not in p.name),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    abandoned = [p for p in entries if ".partial-" in p.name and time.time() - p.stat().st_mtime > STALE_PARTIAL_S]
    removed = done[keep:] + abandoned
    for old in removed:
        log.info("removing %s from the converted-target cache (keeping the %d most recently used)", old.name, keep)
        shutil.rmtree(old, ignore_errors=True)
    return removed


def _save_plain(model, folder: Path) -> None:
    """Save dequantized weights as a plain checkpoint (save_pretrained refuses GGUF-loaded models)."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(str(folder))
    save_model(model, str(folder / "model.safetensors"))

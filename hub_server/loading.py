"""Loading the target model and its vocabulary from a GGUF file or a Hugging Face folder.

A GGUF target is dequantized into torch by transformers. That conversion is slow (tens of
seconds for a 270M model), so the converted weights are kept in the hub's cache directory and
later starts load them directly.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("hub_server.loading")

KEEP_CONVERTED = 4  # converted GGUF targets kept in the cache, the most recently used
STALE_PARTIAL_S = 24 * 3600  # a conversion left half-written this long ago was abandoned

# SentencePiece marks a leading space with U+2581; llama.cpp and transformers do not always
# spell whitespace-only pieces the same way, so the fingerprint compares them normalised.
_SPACE_MARK = "\u2581"


@dataclass(frozen=True)
class Vocabulary:
    pieces: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.pieces)

    @property
    def fingerprint(self) -> str:
        return vocab_fingerprint(self.pieces)


def vocab_fingerprint(pieces: list[str] | tuple[str, ...]) -> str:
    """sha256 over the token pieces in id order; the draft side computes the same."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece.replace(_SPACE_MARK, " ").encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def read_vocabulary(model_path: Path) -> Vocabulary:
    if model_path.is_file():
        return _gguf_vocabulary(model_path)
    return _hf_vocabulary(model_path)


def _gguf_vocabulary(path: Path) -> Vocabulary:
    return Vocabulary(tuple(gguf_tokens(path)))


# GGUF metadata value types (the GGUF specification): fixed-size scalars by their struct code,
# then strings (a uint64 length and the bytes) and arrays (element type, uint64 count, elements).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_tokens(path: Path) -> list[str]:
    """The token pieces of a GGUF file (`tokenizer.ggml.tokens`), read straight from its header.

    The metadata comes before the tensors, so this reads a few MB of a file of any size, one
    key after another. gguf's own reader builds an array view for every element of every
    metadata array: 10 s for Gemma's 262k tokens, against well under a second here.
    """
    if path.stat().st_size < 24:
        raise ValueError(f"{path} is not a GGUF file (version 2 or later)")
    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _gguf_header_tokens(path, data)
    except (struct.error, KeyError) as exc:  # a length or a type that runs past the end
        raise ValueError(f"{path} is damaged or cut short ({exc}): download it again") from exc


def _gguf_header_tokens(path: Path, data) -> list[str]:
    magic, version, _, keys = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF" or version < 2:
        raise ValueError(f"{path} is not a GGUF file (version 2 or later)")
    at = 24
    for _ in range(keys):
        key, at = _gguf_string(data, at)
        (kind,) = struct.unpack_from("<I", data, at)
        at += 4
        if key == "tokenizer.ggml.tokens" and kind == _GGUF_ARRAY:
            element, count = struct.unpack_from("<IQ", data, at)
            at += 12
            if element != _GGUF_STRING:
                raise ValueError(f"{path}: tokenizer.ggml.tokens holds no strings")
            pieces = []
            for _ in range(count):
                piece, at = _gguf_string(data, at)
                pieces.append(piece)
            return pieces
        at = _gguf_skip(data, at, kind)
    raise ValueError(f"{path} has no tokenizer.ggml.tokens: it holds no vocabulary")


def _gguf_string(data, at: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, at)
    at += 8
    if at + length > len(data):
        raise struct.error(f"a string at byte {at} runs past the end of the file")
    return data[at : at + length].decode("utf-8", "replace"), at + length


def _gguf_skip(data, at: int, kind: int) -> int:
    """Where the value of type `kind` that starts at `at` ends."""
    if kind == _GGUF_STRING:
        return at + 8 + struct.unpack_from("<Q", data, at)[0]
    if kind == _GGUF_ARRAY:
        element, count = struct.unpack_from("<IQ", data, at)
        at += 12
        if element in _GGUF_SCALARS:
            return at + count * struct.calcsize(_GGUF_SCALARS[element])
        for _ in range(count):
            at = _gguf_skip(data, at, element)
        return at
    return at + struct.calcsize(_GGUF_SCALARS[kind])


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

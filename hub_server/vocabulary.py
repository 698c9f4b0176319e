"""The target's vocabulary as the hub checks drafts against it, read without torch.

A GGUF target's pieces come straight from the file's header; a transformers folder's from its
tokenizer (`engine.loading.read_vocabulary`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from specedge_common.vocab import vocab_fingerprint


@dataclass(frozen=True)
class Vocabulary:
    pieces: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.pieces)

    @cached_property
    def fingerprint(self) -> str:
        # Hashing 262k pieces takes ~0.14 s of Python holding the GIL, which stalls the device's
        # passes on the scheduler thread: computed once, not at every session opened.
        return vocab_fingerprint(self.pieces)


def gguf_vocabulary(path: Path) -> Vocabulary:
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


def _gguf_header_tokens(path: Path, data: Any) -> list[str]:
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


def _gguf_string(data: Any, at: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, at)
    at += 8
    if at + length > len(data):
        raise struct.error(f"a string at byte {at} runs past the end of the file")
    return data[at : at + length].decode("utf-8", "replace"), at + length


def _gguf_skip(data: Any, at: int, kind: int) -> int:
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

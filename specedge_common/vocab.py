"""The vocabulary fingerprint both sides compute, and the llama.cpp vocabulary walks.

A hub refuses a session (409) whose draft vocabulary fingerprint is not its target's, so the
client and the hub must compute it the same way: this is the one definition.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

# SentencePiece marks a leading space with U+2581; llama.cpp and transformers do not always
# spell whitespace-only pieces the same way, so the fingerprint compares them normalised.
SPACE_MARK = "\u2581"


def vocab_fingerprint(pieces: Iterable[str]) -> str:
    """sha256 over the token pieces in id order, whitespace marks normalised."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece.replace(SPACE_MARK, " ").encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


def llama_vocab_pieces(lib: Any, vocab: Any, size: int) -> list[str]:
    """Every token piece of a llama.cpp vocabulary handle, in id order.

    lib: the `llama_cpp` module; vocab: `llama_model_get_vocab(model)`.
    """
    return [lib.llama_vocab_get_text(vocab, i).decode("utf-8", "replace") for i in range(size)]


def llama_stop_ids(lib: Any, vocab: Any, size: int) -> list[int]:
    """The ids llama.cpp marks end-of-generation, in id order."""
    return [i for i in range(size) if lib.llama_vocab_is_eog(vocab, i)]

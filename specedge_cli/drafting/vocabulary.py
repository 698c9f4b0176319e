"""A draft model's llama.cpp vocabulary: tokenizing, its pieces and their fingerprint, stop tokens.

The hub refuses a session whose draft vocabulary differs from its target's; both sides compare
the same fingerprint over the pieces in id order. `Vocabulary.load` reads only the vocabulary
of a GGUF (no weights), which is how `specedge doctor` checks a draft against a hub in a moment.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from specedge_cli.errors import ModelFileError
from specedge_common.vocab import llama_stop_ids, llama_vocab_pieces, vocab_fingerprint


class Vocabulary:
    """The vocabulary of a loaded `llama_cpp.Llama` (a full model or a vocabulary-only one)."""

    def __init__(self, llm: Any):
        import llama_cpp

        self._lib = llama_cpp
        self.llm = llm
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.size = llama_cpp.llama_vocab_n_tokens(self._vocab)

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        """The vocabulary of the GGUF at `path`, without its weights."""
        import llama_cpp

        try:
            with quiet_stderr():
                return cls(llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False))
        except ValueError as exc:
            raise ModelFileError(f"llama.cpp could not read the vocabulary of {path} ({exc})") from exc

    def pieces(self) -> list[str]:
        return llama_vocab_pieces(self._lib, self._vocab, self.size)

    def fingerprint(self) -> str:
        return vocab_fingerprint(self.pieces())

    def stop_token_ids(self) -> list[int]:
        return llama_stop_ids(self._lib, self._vocab, self.size)

    def fim_tokens(self) -> tuple[int, int, int] | None:
        """The fill-in-the-middle tokens (before the prefix, before the suffix, before the middle), as
        llama.cpp finds them in the GGUF; None for a model without them."""
        lib, vocab = self._lib, self._vocab
        found = (lib.llama_vocab_fim_pre(vocab), lib.llama_vocab_fim_suf(vocab), lib.llama_vocab_fim_mid(vocab))
        return None if any(token < 0 for token in found) else found

    def metadata(self, key: str) -> str | None:
        return self.llm.metadata.get(key)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return self.llm.detokenize(tokens, special=special)

    @property
    def bos_token_id(self) -> int:
        return self.llm.token_bos()


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """llama.cpp prints its load log on fd 2 even with verbose=False; keep the terminal clean."""
    if os.environ.get("SPECEDGE_DEBUG"):
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)

"""The draft engine: a llama.cpp model that drafts tokens ahead of the hub.

It keeps its KV cache across rounds. Before drafting it syncs to the conversation's token
history: the common prefix stays cached (nothing accepted is recomputed), rejected draft tokens
are rolled back, and only the new tokens (a user turn, the hub's bonus token) are evaluated.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from specedge_cli.errors import ModelFileError

_SPACE_MARK = "\u2581"


@dataclass
class DraftTimings:
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def vocab_fingerprint(pieces: list[str]) -> str:
    """sha256 over token pieces in id order, whitespace marks normalised (as the hub does)."""
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece.replace(_SPACE_MARK, " ").encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()


class DraftEngine:
    def __init__(self, model_path: Path, n_ctx: int = 4096, n_threads: int | None = None, n_gpu_layers: int = -1):
        import llama_cpp

        self._lib = llama_cpp
        if not model_path.is_file():
            raise ModelFileError(f"draft model {model_path} does not exist; run `specedge chat --model PATH` with a .gguf file")
        try:
            with _quiet_stderr():
                self.llm = llama_cpp.Llama(
                    model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads or _default_threads(),
                    n_threads_batch=n_threads or _default_threads(),
                    n_gpu_layers=n_gpu_layers, logits_all=False, verbose=False,
                )
        except ValueError as exc:
            raise ModelFileError(f"llama.cpp could not load {model_path}: is it a complete .gguf file? ({exc})") from exc
        self.path = model_path
        self.n_threads = n_threads or _default_threads()
        self.timings = DraftTimings()
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self._vocab)

    # --- vocabulary -------------------------------------------------------------------
    def vocab_pieces(self) -> list[str]:
        return [
            self._lib.llama_vocab_get_text(self._vocab, i).decode("utf-8", "replace")
            for i in range(self.vocab_size)
        ]

    def vocab_fingerprint(self) -> str:
        return vocab_fingerprint(self.vocab_pieces())

    def stop_token_ids(self) -> list[int]:
        return [i for i in range(self.vocab_size) if self._lib.llama_vocab_is_eog(self._vocab, i)]

    def metadata(self, key: str) -> str | None:
        return self.llm.metadata.get(key)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return self.llm.detokenize(tokens, special=special)

    @property
    def bos_token_id(self) -> int:
        return self.llm.token_bos()

    @property
    def n_ctx(self) -> int:
        return self.llm.n_ctx()

    def reset(self) -> None:
        """Forget the cached context (the next draft evaluates its history from scratch)."""
        self.llm.reset()

    # --- drafting ---------------------------------------------------------------------
    def draft(self, history: list[int], length: int) -> list[int]:
        """Greedily draft up to `length` tokens that continue `history`."""
        if length <= 0:
            return []
        started = time.perf_counter()
        self._sync(history)
        drafted = [self._argmax_last()]
        room = self.n_ctx - len(history) - 1
        while len(drafted) < min(length, room):
            self.llm.eval([drafted[-1]])
            drafted.append(self._argmax_last())
        self.timings.seconds += time.perf_counter() - started
        self.timings.tokens += len(drafted)
        return drafted

    def _sync(self, history: list[int]) -> None:
        """Make the KV cache hold `history`, reusing the longest cached prefix.

        At least the last token is re-evaluated so that its logits are the current ones.
        """
        cached = self.llm.input_ids[: self.llm.n_tokens].tolist()
        common = 0
        for cached_token, token in zip(cached, history):
            if cached_token != token:
                break
            common += 1
        common = min(common, len(history) - 1)
        self.llm.n_tokens = common  # eval() drops the KV from n_tokens on
        self.llm.eval(history[common:])

    def _argmax_last(self) -> int:
        pointer = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(pointer, shape=(self.vocab_size,))
        return int(logits.argmax())


def _default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


@contextlib.contextmanager
def _quiet_stderr():
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

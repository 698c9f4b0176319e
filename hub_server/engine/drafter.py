"""A draft model on the hub itself (llama.cpp), for the server-only speculative mode.

This is the baseline SpecEdge is measured against, and a real service for users without a
GPU: the hub drafts and verifies, spending its own time on both. Each session gets its own
llama.cpp context (its KV cache), kept while the session lives.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import numpy as np

from specedge_common.vocab import llama_stop_ids, llama_vocab_pieces, vocab_fingerprint


class HubDrafter:
    def __init__(
        self,
        model_path: Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        device_lock: threading.Lock | None = None,
    ):
        import llama_cpp

        self._lib = llama_cpp
        self._model_path = model_path
        self._n_ctx = n_ctx
        self._n_threads = n_threads or max(1, (os.cpu_count() or 2) // 2)
        self._contexts: dict[str, object] = {}
        self._lock = threading.Lock()
        # On the hub the draft shares the device with the target: one of them runs at a time.
        self._device_lock = device_lock or contextlib.nullcontext()
        self.name = model_path.name
        self.busy_seconds = 0.0  # time spent drafting while holding the device

    def draft(self, session_id: str, history: list[int], length: int) -> list[int]:
        """Greedily draft up to `length` tokens after `history`, reusing the session's cache."""
        llm = self._context(session_id)
        with self._device_lock:
            started = time.perf_counter()
            try:
                return self._draft(llm, history, length)
            finally:
                self.busy_seconds += time.perf_counter() - started

    def _draft(self, llm, history: list[int], length: int) -> list[int]:
        cached = llm.input_ids[: llm.n_tokens].tolist()
        common = 0
        for cached_token, token in zip(cached, history):
            if cached_token != token:
                break
            common += 1
        llm.n_tokens = min(common, len(history) - 1)  # eval() drops the KV from n_tokens on
        llm.eval(history[llm.n_tokens :])
        drafted = [self._argmax(llm)]
        while len(drafted) < min(length, self._n_ctx - len(history) - 1):
            llm.eval([drafted[-1]])
            drafted.append(self._argmax(llm))
        return drafted[:length]

    def tokenize(self, text: str) -> list[int]:
        return self._context("__vocabulary__").tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def vocab_fingerprint(self) -> str:
        """The draft's vocabulary fingerprint, as a client computes it for the same file."""
        return vocab_fingerprint(llama_vocab_pieces(self._lib, *self._vocab()))

    def stop_token_ids(self) -> frozenset[int]:
        return frozenset(llama_stop_ids(self._lib, *self._vocab()))

    def _vocab(self):
        """llama.cpp's vocabulary handle for the draft model, and how many tokens it holds."""
        llm = self._context("__vocabulary__")
        return self._lib.llama_model_get_vocab(llm.model), llm.n_vocab()

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._contexts.pop(session_id, None)

    def _context(self, session_id: str):
        with self._lock:
            llm = self._contexts.get(session_id)
            if llm is None:
                llm = self._lib.Llama(
                    model_path=str(self._model_path),
                    n_ctx=self._n_ctx,
                    n_threads=self._n_threads,
                    logits_all=False,
                    verbose=False,
                )
                self._contexts[session_id] = llm
            return llm

    def _argmax(self, llm) -> int:
        pointer = self._lib.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),)).argmax())

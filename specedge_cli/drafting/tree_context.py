"""A llama.cpp context that holds one conversation plus draft trees, through the batch API.

Sequence 0 holds the conversation's tokens. A draft tree node lives in a sequence that holds its
ancestors' cells (llama_memory_seq_cp tags cells, it copies nothing) and its own token at its
depth's position: a node's first child extends its sequence, every other child gets a new one,
so a chain needs one sequence and a whole tree level decodes in one llama_decode call. After a
verify the accepted path's cells are tagged into sequence 0 and the tree's sequences are dropped:
nothing accepted is recomputed.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from specedge_cli.errors import ModelFileError


class TreeContext:
    def __init__(self, llama_cpp: Any, model: Any, n_ctx: int, n_threads: int, max_sequences: int):
        self._lib = llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = min(n_ctx, 2048)
        params.n_ubatch = min(n_ctx, 512)
        params.n_threads = params.n_threads_batch = n_threads
        params.n_seq_max = max_sequences
        params.kv_unified = True  # tree sequences share the conversation's cells
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise ModelFileError(
                "llama.cpp could not create a drafting context; try a smaller --draft-budget or context"
            )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = n_ctx
        self.n_batch = params.n_batch
        self.max_sequences = max_sequences
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))

    def close(self) -> None:
        if self._ctx:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None

    def decode(self, tokens: list[int], positions: list[int], sequences: list[int], want_logits: list[bool]) -> None:
        """One llama_decode over tokens with their own positions and sequence ids."""
        for start in range(0, len(tokens), self.n_batch):
            end = min(len(tokens), start + self.n_batch)
            batch = self._batch
            batch.n_tokens = end - start
            for i in range(start, end):
                j = i - start
                batch.token[j] = tokens[i]
                batch.pos[j] = positions[i]
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = sequences[i]
                batch.logits[j] = want_logits[i]
            status = self._lib.llama_decode(self._ctx, batch)
            if status != 0:
                raise ModelFileError(
                    f"llama.cpp failed to decode a draft batch (status {status}); the context may be full"
                )

    def logits(self, index: int) -> np.ndarray:
        """Logits after the last decode's batch token `index` (it must have asked for them; -1: the last): [V]."""
        pointer = self._lib.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def remove(self, sequence: int, start: int = -1, end: int = -1) -> None:
        self._lib.llama_memory_seq_rm(self._memory, sequence, start, end)

    def copy(self, source: int, target: int, start: int = -1, end: int = -1) -> None:
        self._lib.llama_memory_seq_cp(self._memory, source, target, start, end)

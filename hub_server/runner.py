"""The model runner: the only part of the hub that touches torch and the device.

It owns the target model and every session's KV cache. Callers hand it token ids and get
token ids back; sessions and routes stay free of tensors.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from hub_server.config import HubSettings, default_cache_dir
from hub_server.loading import choose_device, choose_dtype, load_target, read_vocabulary
from hub_server.verify import accept_chain, target_choices


class KVCache:
    """One session's KV cache. Invariant: it holds every context token but the last."""

    def __init__(self, model):
        self.cache = DynamicCache(config=model.config)
        # Sliding-window layers (Gemma 3) must record past states so a rejected draft can be cropped.
        self.cache.activate_past_recording()
        self.length = 0


class ModelRunner:
    def __init__(self, settings: HubSettings):
        model_path = Path(settings.model).expanduser()
        self.name = model_path.name
        self.device = choose_device(settings.device)
        self.vocab = read_vocabulary(model_path)
        self.model = load_target(
            model_path, self.device, choose_dtype(settings.dtype, self.device),
            settings.cache_dir or default_cache_dir(),
        )
        model_limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 2**31)
        self.max_context = min(settings.max_context or model_limit, model_limit)
        # Ids the hub accepts: known to both the tokenizer and the embedding table.
        self.vocab_size = min(self.vocab.size, self.model.get_input_embeddings().num_embeddings)
        # One forward at a time: the model and its caches are not thread-safe.
        self._lock = threading.Lock()

    def new_kv(self) -> KVCache:
        return KVCache(self.model)

    @torch.inference_mode()
    def _forward(self, kv: KVCache, tokens: list[int], logits_to_keep: int) -> torch.Tensor:
        """Run `tokens` on top of the cache and return the last `logits_to_keep` logits: [S, V]."""
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, S]
        out = self.model(input_ids=input_ids, cache=kv.cache, use_cache=True, logits_to_keep=logits_to_keep)
        kv.length += len(tokens)
        return out.logits[0].float()

    def _crop(self, kv: KVCache, keep: int) -> None:
        kv.cache.crop(-(kv.length - keep))
        kv.length = keep

    def prefill(self, kv: KVCache, context: list[int]) -> None:
        """Bring the cache up to all of `context` but its last token."""
        with self._lock:
            if len(context) - 1 > kv.length:
                self._forward(kv, context[kv.length:-1], logits_to_keep=1)
                self._crop(kv, len(context) - 1)

    def verify(self, kv: KVCache, context: list[int], draft: list[int], temperature: float,
               seed: int, stop_token_ids: frozenset[int]) -> tuple[int, list[int], float]:
        """Verify `draft` after `context`: (accepted draft tokens, emitted tokens, seconds taken).

        The cache keeps the accepted tokens; the bonus token stays pending for the next request.
        """
        with self._lock:
            started = time.perf_counter()
            pending = context[kv.length:]
            logits = self._forward(kv, pending + draft, logits_to_keep=len(draft) + 1)  # [K + 1, V]
            choices = target_choices(logits, temperature, seed, first_position=len(context))
            accepted, emitted = accept_chain(draft, choices, stop_token_ids)
            self._crop(kv, len(context) + len(emitted) - 1)
            return accepted, emitted, time.perf_counter() - started

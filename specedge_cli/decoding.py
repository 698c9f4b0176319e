"""Edge-assisted decoding: draft locally, verify on the hub, emit what the hub accepts.

The client's `history` is always exactly the hub session's context: the first verify of a turn
carries the turn's new tokens, and every verify's emitted tokens (accepted draft + bonus) are
appended on both sides. A second turn therefore sends only its own tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from specedge_cli.drafting.chat_template import ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient


@dataclass
class TurnStats:
    verify_rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    tokens_per_s: float = 0.0
    draft_s: float = 0.0
    round_trip_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_verify(self) -> float:
        return self.emitted_tokens / self.verify_rounds if self.verify_rounds else 0.0

    def to_json(self) -> dict:
        return {
            "verify_rounds": self.verify_rounds, "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens, "tokens_per_verify": round(self.tokens_per_verify, 3),
            "ttft_ms": round(self.ttft_ms, 2), "itl_ms": round(self.itl_ms, 2),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    stats: TurnStats


@dataclass(frozen=True)
class DecodeSettings:
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    draft_len: int = 8          # chain length, or the tree's depth limit
    tree_budget: int = 0        # draft tree nodes per verify; 0 drafts a chain
    tree_width: int = 4         # candidates kept per tree level


class Conversation:
    """One chat with the hub: messages on our side, one hub session holding their tokens."""

    def __init__(self, engine: DraftEngine, hub: HubClient, template: ChatTemplate,
                 settings: DecodeSettings, system: str = ""):
        self.engine = engine
        self.hub = hub
        self.template = template
        self.settings = settings
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.history: list[int] = []
        self.stop_token_ids = frozenset(engine.stop_token_ids())
        self.session_id: str | None = None
        self._last_generated: list[int] = []
        self.max_draft_tokens = settings.draft_len
        self.max_tree_nodes = settings.tree_budget

    def open(self) -> None:
        opened = self.hub.open_session(wire.OpenSessionRequest(
            vocab_size=self.engine.vocab_size, vocab_fingerprint=self.engine.vocab_fingerprint(),
            draft_model=self.engine.path.name,
            sampling=wire.Sampling(temperature=self.settings.temperature, seed=self.settings.seed),
            stop_token_ids=sorted(self.stop_token_ids),
        ))
        self.session_id = opened.session_id
        self.max_draft_tokens = min(self.settings.draft_len, opened.max_draft_tokens)
        self.max_tree_nodes = opened.max_draft_tokens

    def close(self) -> None:
        if self.session_id is not None:
            self.hub.close_session(self.session_id)
            self.session_id = None

    def ask(self, prompt: str, on_tokens: Callable[[list[int]], None] | None = None) -> Reply:
        """Send one user turn and decode the reply; `on_tokens` sees tokens as they are accepted."""
        if self.session_id is None:
            self.open()
        self.messages.append({"role": "user", "content": prompt})
        turn_tokens = self._turn_tokens()
        generated, stats = self._decode(turn_tokens, on_tokens)
        text = self.engine.detokenize([t for t in generated if t not in self.stop_token_ids]).decode("utf-8", "replace")
        self.messages.append({"role": "assistant", "content": text})
        self._last_generated = generated
        return Reply(text=text, token_ids=generated, prompt_token_ids=turn_tokens, stats=stats)

    def _turn_tokens(self) -> list[int]:
        if not self.history:
            return self.engine.tokenize(self.template.first_turn_text(self.messages), add_bos=False)
        last = self._last_generated[-1:]
        stop_text = ""
        if last and last[0] in self.stop_token_ids:
            stop_text = self.engine.detokenize(last, special=True).decode("utf-8", "replace")
        return self.engine.tokenize(self.template.next_turn_text(self.messages, stop_text), add_bos=False)

    def _draft(self, history: list[int], room: int) -> tuple[list[int], list[int] | None]:
        """A chain (parents None), or a tree when a tree budget is set; never deeper than `room`."""
        depth = min(self.max_draft_tokens, room)
        if not self.settings.tree_budget or depth <= 0:
            return self.engine.draft(history, depth), None
        budget = min(self.settings.tree_budget, self.max_tree_nodes)
        return self.engine.draft_tree(history, budget, self.settings.tree_width, max_depth=depth)

    def _decode(self, turn_tokens: list[int], on_tokens) -> tuple[list[int], TurnStats]:
        stats = TurnStats()
        generated: list[int] = []
        started = time.perf_counter()
        first_token_at = started
        pending = turn_tokens
        while len(generated) < self.settings.max_tokens:
            draft_started = time.perf_counter()
            room = self.settings.max_tokens - len(generated) - 1  # the bonus token is always emitted
            draft, parents = self._draft(self.history + pending, room)
            sent = time.perf_counter()
            stats.draft_s += sent - draft_started
            reply = self.hub.verify(self.session_id, tokens=pending, draft=draft, parents=parents)
            stats.round_trip_ms.append((time.perf_counter() - sent) * 1000 - reply.verify_ms)
            self.history += pending + reply.tokens
            pending = []
            generated += reply.tokens
            stats.verify_rounds += 1
            stats.draft_tokens += len(draft)
            stats.accepted_tokens += reply.accepted
            if stats.verify_rounds == 1:
                first_token_at = time.perf_counter()
            if on_tokens:
                on_tokens(reply.tokens)
            if reply.tokens[-1] in self.stop_token_ids:
                break
        ended = time.perf_counter()
        stats.emitted_tokens = len(generated)
        stats.ttft_ms = (first_token_at - started) * 1000
        stats.itl_ms = (ended - first_token_at) * 1000 / max(1, len(generated) - 1) if generated else 0.0
        stats.tokens_per_s = len(generated) / (ended - started) if ended > started else 0.0
        return generated, stats

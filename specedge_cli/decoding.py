"""Edge-assisted decoding: draft locally, verify on the hub, emit what the hub accepts.

Three layers, each on the one below:
- `HubSession` (`remote/session.py`) keeps one hub session's context equal to a token history:
  it feeds what the hub lacks, reopens a lost session and waits out outages.
- `Decoder` (here) is the draft-verify loop over one token history: the first verify of a reply
  carries the new tokens (a user turn, a prompt), every verify's emitted tokens (accepted draft +
  bonus) are appended on both sides, so a reply never re-sends what the hub holds.
- `Conversation` (`conversation.py`) turns chat messages into that history: turns, the chat
  template, the log.

Because the history is ours, a lost session (hub restart, dropped connection, Ctrl+C mid-verify)
is rebuilt by opening a new one and feeding it the history; decoding then continues as if nothing
had happened.

Proactive drafting: while a verify is in flight (on a worker thread), the draft engine guesses
its outcome (the likeliest path and bonus token) and drafts the next tree below it. When the
reply matches, that draft goes out at once; otherwise it is dropped. The draft depth follows
the measured timings (`drafting/planner.py`) unless `draft_len` fixes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from specedge_cli.drafting.draft_tree import DraftTree
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.drafting.planner import DepthPlanner
from specedge_cli.errors import HubError, HubRejected
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.session import HubSession, ReplyTerms
from specedge_common.grammar import Constraint, GrammarError, grammar_tokenizer, prepare_grammar_tokenizer

if TYPE_CHECKING:
    from llguidance import LLTokenizer

    from specedge_cli.settings import ChatSettings

T = TypeVar("T")

# Why a reply ended (OpenAI's names): a stop token or stop sequence, the token limit, or cut short
# (Ctrl+C, a client that went away, a hub that did not come back).
STOP, LENGTH, INTERRUPTED = "stop", "length", "interrupted"

# Sees the tokens of each verify as they are accepted; returning True ends the reply there (a stop sequence).
OnTokens = Callable[[list[int]], "bool | None"]


@dataclass
class TurnStats:
    verify_rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    tokens_per_s: float = 0.0
    draft_s: float = 0.0  # drafting time, proactive drafting included
    draft_wait_s: float = 0.0  # drafting time the reply waited for
    proactive_drafts: int = 0  # drafts made while a verify was in flight
    proactive_hits: int = 0  # ... whose guess came true, so they were sent
    proactive_saved_s: float = 0.0  # drafting time those hits took off the critical path
    depth_sum: int = 0  # draft depths, for the mean
    round_trip_ms: list[float] = field(default_factory=list)

    @property
    def tokens_per_verify(self) -> float:
        return self.emitted_tokens / self.verify_rounds if self.verify_rounds else 0.0

    def to_json(self) -> dict:
        return {
            "verify_rounds": self.verify_rounds,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "tokens_per_verify": round(self.tokens_per_verify, 3),
            "ttft_ms": round(self.ttft_ms, 2),
            "itl_ms": round(self.itl_ms, 2),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "mean_depth": round(self.mean_depth, 2),
            "proactive_drafts": self.proactive_drafts,
            "proactive_hits": self.proactive_hits,
            "proactive_hit_rate": round(self.proactive_hit_rate, 3),
            "proactive_saved_ms": round(self.proactive_saved_s * 1000, 2),
            "draft_wait_ms": round(self.draft_wait_s * 1000, 2),
        }

    @property
    def proactive_hit_rate(self) -> float:
        return self.proactive_hits / self.proactive_drafts if self.proactive_drafts else 0.0

    @property
    def mean_depth(self) -> float:
        return self.depth_sum / self.verify_rounds if self.verify_rounds else 0.0

    @property
    def draft_tokens_per_s(self) -> float:
        return self.draft_tokens / self.draft_s if self.draft_s else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def median_round_trip_ms(self) -> float:
        ordered = sorted(self.round_trip_ms)
        return ordered[len(ordered) // 2] if ordered else 0.0


@dataclass(frozen=True)
class DecodeSettings:
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    draft_len: int = 0  # chain length, or the tree's depth; 0 chooses it from measured timings
    tree_budget: int = 0  # draft tree nodes per verify (at most, when the depth is chosen); 0 drafts a chain
    tree_width: int = 4  # children proposed per node and nodes expanded per tree level
    proactive: bool = True  # draft the next round while a verify is in flight
    reconnect_s: float = 60.0  # how long to keep reopening the session while the hub is away
    grammar: str = ""  # the reply's grammar (llguidance's format); "": unconstrained
    top_logprobs: int | None = None  # the target's logprobs of the reply's tokens, with this many alternatives

    @property
    def sampling(self) -> wire.Sampling:
        return wire.Sampling(temperature=self.temperature, seed=self.seed)

    @classmethod
    def of_chat(cls, chosen: ChatSettings, hub_elsewhere: bool) -> DecodeSettings:
        """The decode settings of a chat's (or an API client's) settings; `hub_elsewhere`: the
        hub is not an embedded one on this machine."""
        # An embedded hub runs on this machine: drafting while it verifies would slow its pass down.
        proactive = chosen.proactive if chosen.proactive is not None else hub_elsewhere
        return cls(
            max_tokens=chosen.max_tokens,
            temperature=chosen.temperature,
            seed=chosen.seed,
            draft_len=chosen.draft_len,
            tree_budget=chosen.tree_budget,
            proactive=proactive,
            reconnect_s=chosen.reconnect_s,
        )


@dataclass
class Generation:
    """What one reply added to the history: `tokens` after the pending ones, and why it ended."""

    tokens: list[int]
    finish_reason: str
    stats: TurnStats
    pending_sent: bool  # the pending tokens reached the history (and the hub)
    error: HubError | None = None  # the hub failure that cut it short, if one did
    logprobs: list[wire.TokenLogprobs] = field(default_factory=list)  # one per token, when asked for


class Decoder:
    """The draft-verify loop over one token history, which `session` keeps on the hub."""

    def __init__(
        self, engine: DraftEngine, session: HubSession, settings: DecodeSettings, fingerprint: Callable[[], str]
    ):
        self.engine = engine
        self.session = session
        self.settings = settings
        self.history: list[int] = []
        self.stop_token_ids = frozenset(engine.vocab.stop_token_ids())
        self.planner = self._new_planner(max_depth=64)
        self.logprobs: list[wire.TokenLogprobs] = []  # the reply's so far, when its settings ask for them
        self.fingerprint = fingerprint  # the draft vocabulary's (read once: it walks the whole vocabulary)

    def change_settings(self, settings: DecodeSettings) -> None:
        """New settings; new sampling reopens the session (fed our history) at the next reply."""
        self.settings = settings
        self.session.reconnect_s = settings.reconnect_s
        self.planner = self._new_planner(self.planner.max_depth)

    def _new_planner(self, max_depth: int) -> DepthPlanner:
        s = self.settings
        return DepthPlanner(
            fixed_depth=s.draft_len,
            tree_budget=s.tree_budget,
            tree_width=s.tree_width,
            max_depth=max_depth,
            proactive=s.proactive,
        )

    def sync(self) -> None:
        """Bring the hub session up to our history (waiting out an outage), and fit the planner to it.
        Between replies the session has no grammar: a grammar starts where its reply does, and
        `generate` opens the reply's own session (an older hub, which has none, still serves this)."""
        self.session.wanted = ReplyTerms(None, self.settings.top_logprobs)
        self.session.retrying(self._sync_once)

    def _sync_once(self) -> None:
        self.session.sync(self.history, self.settings.sampling)
        self.planner.max_depth = self.session.max_draft_tokens
        self.planner.tree_budget = min(self.settings.tree_budget, self.session.max_draft_tokens)
        self.planner.fixed_depth = self.settings.draft_len

    def generate(self, pending: list[int], on_tokens: OnTokens | None = None) -> Generation:
        """Draft and verify after history + `pending` until a stop token, `max_tokens`, the end of the
        hub's context, or `on_tokens` returns True; the reply is what `history` gained after `pending`.

        Ctrl+C or a hub that stays away ends it early (INTERRUPTED): what was accepted by then is kept.
        """
        stats, clock = TurnStats(), _Clock()
        start = len(self.history)
        finish, error = LENGTH, None
        self.engine.set_sampling(self.settings.temperature, self.settings.seed)
        refusal = self._no_room_for(pending)
        if refusal is not None:  # refused now, not after drafting a prompt the hub would refuse
            return Generation([], INTERRUPTED, stats, pending_sent=False, error=refusal)
        self.logprobs = []
        try:
            self._constrain(start + len(pending))
            self.session.retrying(self._sync_once)  # an outage here, too, is one the caller keeps the prompt through
            while True:
                unsent = [] if len(self.history) > start else pending
                room = self._room(max(0, len(self.history) - start - len(pending)), unsent)
                if room <= 0:
                    break  # the token limit, or the end of the hub's context: LENGTH either way
                emitted = self._round(unsent, room, stats)
                clock.tokens_emitted(stats.verify_rounds)
                if on_tokens and on_tokens(emitted):
                    finish = STOP
                    break
                if emitted[-1] in self.stop_token_ids:
                    finish = STOP
                    break
        except KeyboardInterrupt:
            finish = INTERRUPTED
        except HubError as exc:
            finish, error = INTERRUPTED, exc
            self.session.forget()
        sent = len(self.history) > start
        tokens = self.history[start + len(pending) :]
        clock.finish(stats, len(tokens))
        return Generation(tokens, finish, stats, sent, error, self.logprobs)

    def _constrain(self, start: int) -> None:
        """The reply from context position `start` on follows the settings' grammar, on the hub (its
        session's terms) and in the draft (it drafts only what the grammar allows)."""
        s = self.settings
        constraint = wire.Constraint(s.grammar, start) if s.grammar else None
        self.session.wanted = ReplyTerms(constraint, s.top_logprobs)
        if not s.grammar:
            self.engine.constrain(None)
            return
        try:
            self.engine.constrain(Constraint(self.grammar_tokenizer(), s.grammar, start))
        except GrammarError as exc:
            raise HubRejected(str(exc), 422, "bad_grammar") from exc

    def grammar_tokenizer(self) -> LLTokenizer:
        """llguidance's view of the draft's vocabulary, whose stop tokens end a grammar: built once
        a process (about a second for a 150k vocabulary), then kept."""
        return grammar_tokenizer(self.fingerprint(), self.engine.vocab.pieces, sorted(self.stop_token_ids))

    def prepare_grammars(self) -> None:
        """Build `grammar_tokenizer()` in the background now, not at the first constrained reply."""
        prepare_grammar_tokenizer(self.fingerprint(), self.engine.vocab.pieces, sorted(self.stop_token_ids))

    def _no_room_for(self, pending: list[int]) -> HubRejected | None:
        """A prompt that leaves no room for a reply in the context (`context_limit`), refused as the
        hub would refuse it (a draft's context it overruns would fail at its first draft)."""
        prompt_tokens, limit = len(self.history) + len(pending), self.context_limit
        if not pending or prompt_tokens < limit:
            return None
        return HubRejected(
            f"this prompt and the conversation before it come to {prompt_tokens} tokens, which leaves no room "
            f"for a reply in the model's context of {limit} tokens; shorten the prompt, or start a new conversation",
            422,
            "context_too_long",
        )

    @property
    def context_limit(self) -> int:
        """The most tokens the history may hold: the hub's context (once a session has told it)
        and the draft's, whichever is smaller."""
        hub = self.session.max_context
        return min(hub, self.engine.n_ctx) if hub else self.engine.n_ctx

    def _room(self, produced: int, unsent: list[int]) -> int:
        """How many tokens the next verify may add: what the token limit leaves, and what the
        context leaves after `unsent`. A prompt with no room at all that got past `_no_room_for`
        (the hub's context was not known yet) is sent anyway, for the hub to refuse in its words."""
        room = self.settings.max_tokens - produced
        left = self.context_limit - len(self.history) - len(unsent)
        if left > 0 or not unsent:
            room = min(room, left)
        return room

    def _round(self, pending: list[int], room: int, stats: TurnStats) -> list[int]:
        """One draft and verify; the emitted tokens are in `history` when it returns."""
        started = time.perf_counter()
        draft = self.engine.plan(self.history + pending, self.planner.shape(room - 1))  # the bonus is always emitted
        waited = time.perf_counter() - started
        stats.draft_wait_s += waited
        if draft.from_ahead:
            stats.proactive_hits += 1
            stats.proactive_saved_s += draft.draft_s
        stats.draft_s += waited  # a proactive draft's earlier part was counted when it was drafted
        self.planner.observe_draft(draft.decodes, draft.draft_s + draft.late_s)
        reply = self.session.retrying(lambda: self._verify(pending, draft, room, stats))
        self.history += pending + reply.tokens
        if reply.logprobs is not None:
            self.logprobs += reply.logprobs
        stats.verify_rounds += 1
        stats.draft_tokens += len(draft.wire_tokens)
        stats.accepted_tokens += reply.accepted
        stats.depth_sum += draft.levels
        return reply.tokens

    def _verify(self, pending: list[int], draft: DraftTree, room: int, stats: TurnStats) -> wire.VerifyResponse:
        self._sync_once()
        tokens, parents = draft.wire_tokens, draft.wire_parents
        chain = parents == list(range(-1, len(parents) - 1))
        flight = _InFlight(self.session.verify_request(pending, tokens, None if chain else parents))
        if self.settings.proactive:
            self._draft_ahead(draft, room, stats, flight)
        reply, elapsed_s = flight.result()
        self.session.settle(pending, reply)
        stats.round_trip_ms.append(elapsed_s * 1000 - reply.verify_ms)
        self.planner.observe_verify(elapsed_s, draft.levels, reply.accepted)
        return reply

    def _draft_ahead(self, draft: DraftTree, room: int, stats: TurnStats, flight: _InFlight) -> None:
        """Draft the next round below the likeliest outcome of `draft` until the reply is in."""
        guess = self.engine.guess(draft)
        if guess is None:
            return
        emitted = guess[0] + [guess[1]]
        left = room - len(emitted)
        if left <= 1 or any(token in self.stop_token_ids for token in emitted):
            return  # that outcome ends the reply: nothing to draft for
        started = time.perf_counter()
        self.engine.draft_ahead(draft, self.planner.shape(left - 1), stop=flight.done)
        stats.draft_s += time.perf_counter() - started
        stats.proactive_drafts += 1

    def text(self, tokens: list[int]) -> str:
        """The reply text of `tokens` (stop tokens left out)."""
        return self.engine.vocab.detokenize([t for t in tokens if t not in self.stop_token_ids]).decode(
            "utf-8", "replace"
        )


class _InFlight(Generic[T]):
    """A call running on its own thread (a verify request), so drafting can go on meanwhile."""

    def __init__(self, call: Callable[[], T]):
        self._call = call
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._started = time.perf_counter()
        self._elapsed = 0.0
        threading.Thread(target=self._run, daemon=True, name="specedge-verify").start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as exc:  # handed to the caller's thread by result()
            self._error = exc
        self._elapsed = time.perf_counter() - self._started
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> tuple[T, float]:
        """(the call's value, seconds it took); its exception is raised here."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value, self._elapsed  # type: ignore[return-value]  # set when no error was


class _Clock:
    """Time to first token and the rest of a reply."""

    def __init__(self) -> None:
        self.started = self.first_token_at = time.perf_counter()

    def tokens_emitted(self, rounds: int) -> None:
        if rounds == 1:
            self.first_token_at = time.perf_counter()

    def finish(self, stats: TurnStats, n_tokens: int) -> None:
        ended = time.perf_counter()
        stats.emitted_tokens = n_tokens
        stats.ttft_ms = (self.first_token_at - self.started) * 1000
        stats.itl_ms = (ended - self.first_token_at) * 1000 / max(1, n_tokens - 1) if n_tokens else 0.0
        stats.tokens_per_s = n_tokens / (ended - self.started) if ended > self.started else 0.0

"""Edge-assisted decoding: draft locally, verify on the hub, emit what the hub accepts.

Three layers, each on the one below:
- `HubSession` (`remote/session.py`) keeps one hub session's context equal to a token history:
  it feeds what the hub lacks, reopens a lost session and waits out outages.
- `Decoder` is the draft-verify loop over one token history: the first verify of a reply
  carries the new tokens (a user turn, a prompt), every verify's emitted tokens (accepted draft +
  bonus) are appended on both sides, so a reply never re-sends what the hub holds.
- `Conversation` turns chat messages into that history: turns, the chat template, the log.

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
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar

from specedge_cli.drafting.chat_template import ChatTemplate
from specedge_cli.drafting.draft_tree import DraftTree
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.drafting.planner import DepthPlanner
from specedge_cli.errors import HubBusy, HubError, HubRejected, HubUnreachable, SessionLost
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient
from specedge_cli.remote.session import DraftIdentity, HubSession, Reconnecting, ReconnectNotice

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


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    stats: TurnStats
    finish_reason: str = STOP  # STOP, LENGTH or INTERRUPTED (then `token_ids` are what was accepted by then)

    @property
    def interrupted(self) -> bool:
        return self.finish_reason == INTERRUPTED


@dataclass
class Turn:
    """One user prompt and the reply to it, as text and as the token ids in the hub's context."""

    prompt: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    reply: str = ""
    interrupted: bool = False
    sent: bool = False  # the prompt is part of the context
    log_id: int | None = None  # its row in the conversation log, when it is kept

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.reply}]


class TurnLog(Protocol):
    """Where turns are kept as they happen (`history.ConversationLog`)."""

    def prompt_sent(self, turn: Turn) -> None: ...
    def reply_done(self, turn: Turn, stats: TurnStats) -> None: ...
    def turn_dropped(self, turn: Turn) -> None: ...


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

    @property
    def sampling(self) -> wire.Sampling:
        return wire.Sampling(temperature=self.temperature, seed=self.seed)


@dataclass
class Generation:
    """What one reply added to the history: `tokens` after the pending ones, and why it ended."""

    tokens: list[int]
    finish_reason: str
    stats: TurnStats
    pending_sent: bool  # the pending tokens reached the history (and the hub)
    error: HubError | None = None  # the hub failure that cut it short, if one did


def draft_identity(engine: DraftEngine) -> DraftIdentity:
    """What the hub checks a draft by (the fingerprint reads the whole vocabulary: computed once)."""
    return DraftIdentity(
        vocab_size=engine.vocab_size,
        vocab_fingerprint=engine.vocab_fingerprint(),
        draft_model=engine.path.name,
        stop_token_ids=tuple(engine.stop_token_ids()),
    )


class Decoder:
    """The draft-verify loop over one token history, which `session` keeps on the hub."""

    def __init__(self, engine: DraftEngine, session: HubSession, settings: DecodeSettings):
        self.engine = engine
        self.session = session
        self.settings = settings
        self.history: list[int] = []
        self.stop_token_ids = frozenset(engine.stop_token_ids())
        self.planner = self._new_planner(max_depth=64)

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
        """Bring the hub session up to our history (waiting out an outage), and fit the planner to it."""
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
        try:
            self.sync()  # an outage here, too, is one the caller keeps the prompt through
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
        return Generation(tokens, finish, stats, sent, error)

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
        return self.engine.detokenize([t for t in tokens if t not in self.stop_token_ids]).decode("utf-8", "replace")


class Conversation:
    """One chat with the hub: turns on our side, one hub session holding their tokens.

    The session is disposable: whenever it is lost (the hub restarted, a verify was cut short by
    Ctrl+C, the settings changed) a new one is opened and fed `history`, so the hub's context is
    again exactly ours and decoding continues where it stopped.
    """

    def __init__(
        self,
        engine: DraftEngine,
        hub: HubClient,
        template: ChatTemplate,
        settings: DecodeSettings,
        system: str = "",
        log: TurnLog | None = None,
        on_reconnect: Callable[[Reconnecting], None] | None = None,
        vocab_fingerprint: str | None = None,  # the engine's, when already known (it reads the whole vocabulary)
    ):
        self.engine = engine
        self.hub = hub
        self.template = template
        self.system = system
        self.log = log
        self.turns: list[Turn] = []
        self._fingerprint = vocab_fingerprint
        session = HubSession(
            hub,
            self._identity,
            reconnect_s=settings.reconnect_s,
            on_reconnect=on_reconnect if on_reconnect is not None else ReconnectNotice(),
        )
        self.decoder = Decoder(engine, session, settings)

    # --- what the layers below hold ---------------------------------------------------------------
    @property
    def session(self) -> HubSession:
        return self.decoder.session

    @property
    def history(self) -> list[int]:
        """The conversation's tokens: exactly the hub session's context once it is synced."""
        return self.decoder.history

    @history.setter
    def history(self, tokens: list[int]) -> None:
        self.decoder.history = tokens

    @property
    def settings(self) -> DecodeSettings:
        return self.decoder.settings

    @property
    def planner(self) -> DepthPlanner:
        return self.decoder.planner

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self.decoder.stop_token_ids

    @property
    def session_id(self) -> str | None:
        return self.session.session_id

    @property
    def reconnects(self) -> int:
        return self.session.reconnects

    @property
    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [m for turn in self.turns for m in turn.messages()]

    def vocab_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.engine.vocab_fingerprint()
        return self._fingerprint

    def _identity(self) -> DraftIdentity:
        return DraftIdentity(
            self.engine.vocab_size, self.vocab_fingerprint(), self.engine.path.name, tuple(sorted(self.stop_token_ids))
        )

    def open(self) -> None:
        """Open the hub session now (and feed it our history) rather than at the first reply."""
        self.decoder.sync()

    def close(self) -> None:
        self.session.close()

    # --- turns ----------------------------------------------------------------------------
    def ask(self, prompt: str, on_tokens: OnTokens | None = None) -> Reply:
        """Send one user turn and decode the reply; `on_tokens` sees tokens as they are accepted
        (and may return True to end the reply there).

        Ctrl+C stops the reply: what was accepted so far is kept (on both sides) and the reply
        comes back with finish_reason INTERRUPTED. A hub that stays away past the reconnect window
        raises HubUnreachable, after the turn (its prompt and what was accepted) is kept and logged.
        """
        outage = self._sync_before_prompt()
        turn = Turn(prompt, self._turn_tokens(prompt))
        if self.log:
            self.log.prompt_sent(turn)
        if outage is None:
            generation = self.decoder.generate(turn.prompt_token_ids, on_tokens)
        else:
            generation = Generation([], INTERRUPTED, TurnStats(), pending_sent=False, error=outage)
        turn.token_ids, turn.interrupted = generation.tokens, generation.finish_reason == INTERRUPTED
        turn.sent = generation.pending_sent or self._keep_unanswered(turn, generation.error)
        turn.reply = self.decoder.text(turn.token_ids)
        self._record(turn, generation.stats)
        if generation.error is not None:
            raise generation.error
        return Reply(turn.reply, turn.token_ids, turn.prompt_token_ids, generation.stats, generation.finish_reason)

    def _sync_before_prompt(self) -> HubError | None:
        """Bring the hub session up to date before the prompt is logged, so a wrong address keeps
        nothing; an outage of a hub reached before is returned, and the prompt is kept for
        `--continue` as it is when the hub goes away mid-reply."""
        try:
            self.decoder.sync()
        except (HubUnreachable, HubBusy, SessionLost) as exc:
            if not self.session.reached_hub:  # a wrong address: nothing of this turn to keep
                raise
            self.session.forget()
            return exc
        return None

    def _keep_unanswered(self, turn: Turn, error: HubError | None) -> bool:
        """An outage before the prompt reached the hub keeps it in the context (unanswered), so
        `--continue` has it; a prompt the hub refused, or one stopped by Ctrl+C, is dropped."""
        if not isinstance(error, (HubUnreachable, HubBusy, SessionLost)):
            return False
        self.history += turn.prompt_token_ids
        return True

    def _record(self, turn: Turn, stats: TurnStats) -> None:
        if turn.sent:
            self.turns.append(turn)
            if self.log:
                self.log.reply_done(turn, stats)
        elif self.log:  # Ctrl+C before the prompt reached the hub: as if it was never sent
            self.log.turn_dropped(turn)

    def regenerate(self, on_tokens: OnTokens | None = None) -> Reply | None:
        """Forget the last reply and answer its prompt again (with the next seed when sampling)."""
        if not self.turns:
            return None
        last = self.drop_last_turn()
        if self.settings.temperature > 0:
            self.change_settings(replace(self.settings, seed=self.settings.seed + 1))
        return self.ask(last.prompt, on_tokens)

    def drop_last_turn(self) -> Turn:
        """Forget the last turn (the hub's session, which still holds it, is replaced at the next reply)."""
        last = self.turns.pop()
        del self.history[len(self.history) - len(last.prompt_token_ids) - len(last.token_ids) :]
        if self.log:
            self.log.turn_dropped(last)
        return last

    def restore(self, turns: list[Turn]) -> None:
        """Take up a saved conversation: its turns become our history, fed to the next session."""
        self.turns = list(turns)
        self.history = [t for turn in turns for t in turn.prompt_token_ids + turn.token_ids]

    def add_exchange(self, prompt: str, reply: str) -> None:
        """Take an earlier exchange as text (an API client sent it back): its tokens join the
        history, and reach the hub with the next reply."""
        turn = Turn(prompt, self._turn_tokens(prompt), reply=reply, sent=True)
        turn.token_ids = self.engine.tokenize(reply, add_bos=False)
        self.turns.append(turn)
        self.history += turn.prompt_token_ids + turn.token_ids

    def reset(self, system: str | None = None) -> None:
        """Start a new conversation (optionally with a new system prompt)."""
        self.turns, self.history = [], []
        if system is not None:
            self.system = system

    def change_settings(self, settings: DecodeSettings) -> None:
        """New decode settings; sampling ones take a new session (fed our history)."""
        self.decoder.change_settings(settings)

    def _turn_tokens(self, prompt: str) -> list[int]:
        """The tokens a new user turn appends to the context (the whole prompt for the first turn)."""
        messages = self.messages + [{"role": "user", "content": prompt}]
        if not self.history:
            return self.engine.tokenize(self.template.first_turn_text(messages), add_bos=False)
        last = self.turns[-1].token_ids[-1:] if self.turns else []
        stop_text = ""
        if last and last[0] in self.stop_token_ids:
            stop_text = self.engine.detokenize(last, special=True).decode("utf-8", "replace")
        return self.engine.tokenize(self.template.next_turn_text(messages, stop_text), add_bos=False)


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

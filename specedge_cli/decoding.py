"""Edge-assisted decoding: draft locally, verify on the hub, emit what the hub accepts.

The client's `history` is always exactly the hub session's context: the first verify of a turn
carries the turn's new tokens, and every verify's emitted tokens (accepted draft + bonus) are
appended on both sides. A second turn therefore sends only its own tokens. Because the history is
ours, a lost session (hub restart, dropped connection, Ctrl+C mid-verify) is rebuilt by opening a
new one and feeding it the history; decoding then continues as if nothing had happened.

Proactive drafting: while a verify is in flight (on a worker thread), the draft engine guesses
its outcome (the likeliest path and bonus token) and drafts the next tree below it. When the
reply matches, that draft goes out at once; otherwise it is dropped. The draft depth follows
the measured timings (`drafting/planner.py`) unless `draft_len` fixes it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from specedge_cli.drafting.chat_template import ChatTemplate
from specedge_cli.drafting.draft_tree import DraftTree
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.drafting.planner import DepthPlanner
from specedge_cli.errors import HubBusy, HubError, HubUnreachable, SessionLost
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient

T = TypeVar("T")
FEED_CHUNK = 4096  # tokens per feed request when a session is rebuilt (keeps bodies well under 1 MiB)


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
    interrupted: bool = False  # Ctrl+C stopped it; `token_ids` are what was accepted by then


@dataclass
class Turn:
    """One user prompt and the reply to it, as text and as the token ids in the hub's context."""

    prompt: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    reply: str = ""
    interrupted: bool = False
    sent: bool = False  # the prompt reached the hub's context
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
    ):
        self.engine = engine
        self.hub = hub
        self.template = template
        self.settings = settings
        self.system = system
        self.log = log
        self.turns: list[Turn] = []
        self.history: list[int] = []
        self.stop_token_ids = frozenset(engine.stop_token_ids())
        self.session_id: str | None = None
        self.planner = self._new_planner(max_depth=64)
        self.reconnects = 0
        self._reached_hub = False  # a hub never reached is a wrong address, not an outage to wait out
        self._fingerprint: str | None = None
        self._session_in_doubt = False

    @property
    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [m for turn in self.turns for m in turn.messages()]

    # --- the hub session ------------------------------------------------------------------
    def open(self) -> None:
        """Open a hub session and feed it our history (empty for a new conversation)."""
        opened = self.hub.open_session(
            wire.OpenSessionRequest(
                vocab_size=self.engine.vocab_size,
                vocab_fingerprint=self.vocab_fingerprint(),
                draft_model=self.engine.path.name,
                sampling=wire.Sampling(temperature=self.settings.temperature, seed=self.settings.seed),
                stop_token_ids=sorted(self.stop_token_ids),
            )
        )
        self._session_in_doubt = True  # until our history is fed
        self.session_id = opened.session_id
        self._reached_hub = True
        self.planner.max_depth = opened.max_draft_tokens
        self.planner.tree_budget = min(self.settings.tree_budget, opened.max_draft_tokens)
        self.planner.fixed_depth = self.settings.draft_len
        for start in range(0, len(self.history), FEED_CHUNK):
            self.hub.feed(self.session_id, self.history[start : start + FEED_CHUNK])
        self._session_in_doubt = False

    def close(self) -> None:
        if self.session_id is not None:
            session_id, self.session_id = self.session_id, None
            with contextlib.suppress(HubError):
                self.hub.close_session(session_id)

    def _new_planner(self, max_depth: int) -> DepthPlanner:
        s = self.settings
        return DepthPlanner(
            fixed_depth=s.draft_len,
            tree_budget=s.tree_budget,
            tree_width=s.tree_width,
            max_depth=max_depth,
            proactive=s.proactive,
        )

    def vocab_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.engine.vocab_fingerprint()
        return self._fingerprint

    def _ensure_session(self) -> None:
        if self.session_id is None or self._session_in_doubt:
            self.close()
            self.open()

    # --- turns ----------------------------------------------------------------------------
    def ask(self, prompt: str, on_tokens: Callable[[list[int]], None] | None = None) -> Reply:
        """Send one user turn and decode the reply; `on_tokens` sees tokens as they are accepted.

        Ctrl+C stops the reply: what was accepted so far is kept (on both sides) and the reply
        comes back with `interrupted` set.
        """
        self._with_reconnects(self._ensure_session)
        turn_tokens = self._turn_tokens(prompt)
        turn = Turn(prompt, turn_tokens)
        if self.log:
            self.log.prompt_sent(turn)
        start = len(self.history)
        try:
            stats = self._decode(turn, on_tokens)
        except HubError:  # the hub stayed away: forget the half reply, as a resumed conversation would
            del self.history[start:]
            self._session_in_doubt = True
            raise
        turn.reply = self._text(turn.token_ids)
        if turn.sent:
            self.turns.append(turn)
            if self.log:
                self.log.reply_done(turn, stats)
        elif self.log:  # Ctrl+C before the prompt reached the hub: as if it was never sent
            self.log.turn_dropped(turn)
        return Reply(
            text=turn.reply,
            token_ids=turn.token_ids,
            prompt_token_ids=turn.prompt_token_ids,
            stats=stats,
            interrupted=turn.interrupted,
        )

    def regenerate(self, on_tokens: Callable[[list[int]], None] | None = None) -> Reply | None:
        """Forget the last reply and answer its prompt again (with the next seed when sampling)."""
        if not self.turns:
            return None
        last = self.drop_last_turn()
        if self.settings.temperature > 0:
            self.settings = replace(self.settings, seed=self.settings.seed + 1)
        return self.ask(last.prompt, on_tokens)

    def drop_last_turn(self) -> Turn:
        last = self.turns.pop()
        del self.history[len(self.history) - len(last.prompt_token_ids) - len(last.token_ids) :]
        if self.log:
            self.log.turn_dropped(last)
        self._session_in_doubt = True  # the hub's context still holds that turn
        return last

    def restore(self, turns: list[Turn]) -> None:
        """Take up a saved conversation: its turns become our history, fed to the next session."""
        self.turns = list(turns)
        self.history = [t for turn in turns for t in turn.prompt_token_ids + turn.token_ids]
        self._session_in_doubt = True

    def reset(self, system: str | None = None) -> None:
        """Start a new conversation (optionally with a new system prompt)."""
        self.turns, self.history = [], []
        if system is not None:
            self.system = system
        self._session_in_doubt = True

    def change_settings(self, settings: DecodeSettings) -> None:
        """New decode settings; sampling ones take a new session (fed our history)."""
        resample = (settings.temperature, settings.seed) != (self.settings.temperature, self.settings.seed)
        self.settings = settings
        self.planner = self._new_planner(self.planner.max_depth)
        self._session_in_doubt = self._session_in_doubt or resample

    def _text(self, tokens: list[int]) -> str:
        return self.engine.detokenize([t for t in tokens if t not in self.stop_token_ids]).decode("utf-8", "replace")

    def _turn_tokens(self, prompt: str) -> list[int]:
        messages = self.messages + [{"role": "user", "content": prompt}]
        if not self.history:
            return self.engine.tokenize(self.template.first_turn_text(messages), add_bos=False)
        last = self.turns[-1].token_ids[-1:] if self.turns else []
        stop_text = ""
        if last and last[0] in self.stop_token_ids:
            stop_text = self.engine.detokenize(last, special=True).decode("utf-8", "replace")
        return self.engine.tokenize(self.template.next_turn_text(messages, stop_text), add_bos=False)

    # --- the draft-verify loop --------------------------------------------------------------
    def _decode(self, turn: Turn, on_tokens) -> TurnStats:
        """Draft and verify until a stop token or max_tokens; the reply is what `history` gained."""
        stats = TurnStats()
        clock = _Clock()
        start, prompt_len = len(self.history), len(turn.prompt_token_ids)
        self.engine.set_sampling(self.settings.temperature, self.settings.seed)
        try:
            while (produced := max(0, len(self.history) - start - prompt_len)) < self.settings.max_tokens:
                pending = [] if len(self.history) > start else turn.prompt_token_ids
                emitted = self._round(pending, self.settings.max_tokens - produced, stats)
                clock.tokens_emitted(stats.verify_rounds)
                if on_tokens:
                    on_tokens(emitted)
                if emitted[-1] in self.stop_token_ids:
                    break
        except KeyboardInterrupt:
            turn.interrupted = True
        turn.sent = len(self.history) > start
        turn.token_ids = self.history[start + prompt_len :]
        clock.finish(stats, len(turn.token_ids))
        return stats

    def _round(self, pending: list[int], room: int, stats: TurnStats) -> list[int]:
        """One draft and verify; the emitted tokens are in `history` when it returns."""
        started = time.perf_counter()
        draft = self.engine.plan(self.history + pending, self.planner.shape(room - 1))  # the bonus is always emitted
        waited = time.perf_counter() - started
        stats.draft_wait_s += waited
        if draft.from_ahead:
            stats.proactive_hits += 1
            stats.proactive_saved_s += draft.draft_s
            stats.draft_s += waited  # its earlier part was counted when it was drafted
        else:
            stats.draft_s += waited
        self.planner.observe_draft(draft.decodes, draft.draft_s + draft.late_s)
        reply = self._with_reconnects(lambda: self._verify(pending, draft, room, stats))
        self.history += pending + reply.tokens
        self._session_in_doubt = False
        stats.verify_rounds += 1
        stats.draft_tokens += len(draft.wire_tokens)
        stats.accepted_tokens += reply.accepted
        stats.depth_sum += draft.levels
        return reply.tokens

    def _verify(self, pending: list[int], draft: DraftTree, room: int, stats: TurnStats) -> wire.VerifyResponse:
        self._ensure_session()
        self._session_in_doubt = True
        tokens, parents = draft.wire_tokens, draft.wire_parents
        chain = parents == list(range(-1, len(parents) - 1))
        session_id = self.session_id
        flight = _InFlight(
            lambda: self.hub.verify(session_id, tokens=pending, draft=tokens, parents=None if chain else parents)
        )
        if self.settings.proactive:
            self._draft_ahead(draft, room, stats, flight)
        reply, elapsed_s = flight.result()
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

    def _with_reconnects(self, call: Callable[[], T]) -> T:
        """Run `call`, reopening the session with backoff while the hub is away or restarting."""
        deadline = time.monotonic() + self.settings.reconnect_s
        for delay in _backoff():
            try:
                return call()
            except (HubUnreachable, SessionLost, HubBusy) as exc:
                if not self._reached_hub or (isinstance(exc, HubBusy) and exc.code != "not_ready"):
                    raise  # a full hub says when to come back; that is the user's call
                if time.monotonic() + delay > deadline:
                    raise HubUnreachable(
                        f"lost the hub at {self.hub.base_url} and it did not come back in "
                        f"{self.settings.reconnect_s:.0f} s ({exc.message}); the conversation is saved: "
                        "run `specedge chat --continue` when the hub is back"
                    ) from exc
                self._session_in_doubt = True
                self.session_id = None  # the old one is gone or unknown; do not wait on it
                self.reconnects += 1
                time.sleep(delay)
        raise AssertionError("unreachable")


class _InFlight:
    """A call running on its own thread (a verify request), so drafting can go on meanwhile."""

    def __init__(self, call: Callable[[], T]):
        self._call = call
        self._done = threading.Event()
        self._value = self._error = None
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

    def result(self):
        """(the call's value, seconds it took); its exception is raised here."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value, self._elapsed


def _backoff() -> Iterator[float]:
    delay = 0.2
    while True:
        yield delay
        delay = min(delay * 2, 4.0)


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

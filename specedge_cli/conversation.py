"""A chat as the hub's context: turns on our side, the chat template, the conversation log.

`Conversation` turns chat messages into the token history that `decoding.Decoder` drafts and
verifies after: a user turn's tokens (the whole templated prompt for the first turn, the next
turn's text after the last reply's stop token otherwise) are the pending tokens of its reply.
Because the history is ours, a lost hub session is rebuilt by opening a new one and feeding it
the history; decoding then continues as if nothing had happened.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeAlias

from specedge_cli.decoding import INTERRUPTED, STOP, Decoder, DecodeSettings, Generation, OnTokens, TurnStats
from specedge_cli.drafting.chat_template import ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.drafting.planner import DepthPlanner
from specedge_cli.errors import HubBusy, HubError, HubUnreachable, SessionLost
from specedge_cli.remote.client import HubClient
from specedge_cli.remote.protocol import TokenLogprobs
from specedge_cli.remote.session import DraftIdentity, HubSession, Reconnecting, ReconnectNotice


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    stats: TurnStats
    finish_reason: str = STOP  # STOP, LENGTH or INTERRUPTED (then `token_ids` are what was accepted by then)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # the target's, of the decoded tokens, when asked

    @property
    def interrupted(self) -> bool:
        return self.finish_reason == INTERRUPTED


# What a turn sends: a user message's text, or the messages between two replies (an API client's
# tool results, say) as the chat template reads them.
Prompt: TypeAlias = str | tuple[dict, ...]


def prompt_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@dataclass
class Turn:
    """One user prompt and the reply to it, as text and as the token ids in the hub's context."""

    prompt: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    reply: str = ""  # as the model wrote it (a tool call in its own markup included)
    interrupted: bool = False
    sent: bool = False  # the prompt is part of the context
    log_id: int | None = None  # its row in the conversation log, when it is kept
    inputs: tuple[dict, ...] = ()  # the prompt's messages, when it is not one user message

    @classmethod
    def of(cls, prompt: Prompt, prompt_token_ids: list[int], **fields: Any) -> Turn:
        if isinstance(prompt, str):
            return cls(prompt, prompt_token_ids, **fields)
        text = "\n\n".join(str(m.get("content") or "") for m in prompt)
        return cls(text, prompt_token_ids, inputs=prompt, **fields)

    @property
    def sent_prompt(self) -> Prompt:
        return self.inputs or self.prompt

    def messages(self) -> list[dict]:
        return [*prompt_messages(self.sent_prompt), {"role": "assistant", "content": self.reply}]


class TurnLog(Protocol):
    """Where turns are kept as they happen (`history.ConversationLog`)."""

    def prompt_sent(self, turn: Turn) -> None: ...
    def reply_done(self, turn: Turn, stats: TurnStats) -> None: ...
    def turn_dropped(self, turn: Turn) -> None: ...


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
        self.tools: list[dict] | None = None  # the functions the chat template shows the model
        self.log = log
        self.turns: list[Turn] = []
        self._fingerprint = vocab_fingerprint
        session = HubSession(
            hub,
            self._identity,
            reconnect_s=settings.reconnect_s,
            on_reconnect=on_reconnect if on_reconnect is not None else ReconnectNotice(),
        )
        self.decoder = Decoder(engine, session, settings, self.vocab_fingerprint)

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
            self._fingerprint = self.engine.vocab.fingerprint()
        return self._fingerprint

    def _identity(self) -> DraftIdentity:
        return DraftIdentity(
            self.engine.vocab.size, self.vocab_fingerprint(), self.engine.path.name, tuple(sorted(self.stop_token_ids))
        )

    def open(self) -> None:
        """Open the hub session now (and feed it our history) rather than at the first reply."""
        self.decoder.sync()

    def close(self) -> None:
        self.session.close()

    # --- turns ----------------------------------------------------------------------------
    def ask(self, prompt: Prompt, on_tokens: OnTokens | None = None, reply_start: str = "") -> Reply:
        """Send one user turn and decode the reply; `on_tokens` sees tokens as they are accepted
        (and may return True to end the reply there). A `reply_start` is put in the model's mouth:
        its tokens follow the prompt, and the reply (text and tokens) begins with it.

        Ctrl+C stops the reply: what was accepted so far is kept (on both sides) and the reply
        comes back with finish_reason INTERRUPTED. A hub that stays away past the reconnect window
        raises HubUnreachable, after the turn (its prompt and what was accepted) is kept and logged.
        """
        outage = self._sync_before_prompt()
        turn = Turn.of(prompt, self._turn_tokens(prompt))
        start = self.engine.vocab.tokenize(reply_start, add_bos=False) if reply_start else []
        if self.log:
            self.log.prompt_sent(turn)
        if outage is None:
            generation = self.decoder.generate(turn.prompt_token_ids + start, on_tokens)
        else:
            generation = Generation([], INTERRUPTED, TurnStats(), pending_sent=False, error=outage)
        turn.token_ids = (start if generation.pending_sent else []) + generation.tokens
        turn.interrupted = generation.finish_reason == INTERRUPTED
        turn.sent = generation.pending_sent or self._keep_unanswered(turn, generation.error)
        turn.reply = self.decoder.text(turn.token_ids)
        self._record(turn, generation.stats)
        if generation.error is not None:
            raise generation.error
        return Reply(
            turn.reply,
            turn.token_ids,
            turn.prompt_token_ids,
            generation.stats,
            generation.finish_reason,
            generation.logprobs,
        )

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

    def add_exchange(self, prompt: Prompt, reply: str) -> None:
        """Take an earlier exchange as text (an API client sent it back): its tokens join the
        history, and reach the hub with the next reply."""
        turn = Turn.of(prompt, self._turn_tokens(prompt), reply=reply, sent=True)
        turn.token_ids = self.engine.vocab.tokenize(reply, add_bos=False)
        self.turns.append(turn)
        self.history += turn.prompt_token_ids + turn.token_ids

    def reset(self, system: str | None = None, tools: Sequence[dict] | None = None) -> None:
        """Start a new conversation (optionally with a new system prompt), offering the model `tools`."""
        self.turns, self.history = [], []
        self.tools = list(tools) if tools else None
        if system is not None:
            self.system = system

    def change_settings(self, settings: DecodeSettings) -> None:
        """New decode settings; sampling ones take a new session (fed our history)."""
        self.decoder.change_settings(settings)

    def _turn_tokens(self, prompt: Prompt) -> list[int]:
        """The tokens a new user turn appends to the context (the whole prompt for the first turn)."""
        new = prompt_messages(prompt)
        messages = self.messages + new
        if not self.history:
            return self.engine.vocab.tokenize(self.template.first_turn_text(messages, self.tools), add_bos=False)
        last = self.turns[-1].token_ids[-1:] if self.turns else []
        stop_text = ""
        if last and last[0] in self.stop_token_ids:
            stop_text = self.engine.vocab.detokenize(last, special=True).decode("utf-8", "replace")
        text = self.template.next_turn_text(messages, stop_text, self.tools, len(new))
        return self.engine.vocab.tokenize(text, add_bos=False)

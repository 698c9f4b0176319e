"""One hub session kept in step with the client's token history.

The client owns the history; the hub session only mirrors it. `HubSession` remembers which
tokens the hub holds (`held`: every token it fed or that a verify appended), so `sync` sends only
what the hub lacks, and opens a fresh session (fed the whole history) whenever the mirror cannot
be trusted: no session yet, a request that changes the context was cut short (Ctrl+C, a dropped
connection), the history no longer starts with what the hub holds (a turn was dropped, another
conversation took this session), or the sampling changed. `retrying` runs a call and, while the
hub is away or restarting, reopens the session with backoff for up to `reconnect_s`, telling
`on_reconnect` about every attempt.

Verifies go over the session's stream (`stream.py`: one WebSocket frame each way) where the hub
offers it, over HTTP where it does not (a hub of protocol version 1, an upgrade refused). Either
way a verify fails with the same errors, so what follows a failure (a retry, a reopened session)
does not depend on the way it went.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TextIO, TypeVar

from specedge_cli.errors import HubBusy, HubError, HubRejected, HubUnreachable, SessionLost
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient
from specedge_cli.remote.stream import STREAM_VERSION, SessionStream, StreamClosed, StreamRefused, open_stream

T = TypeVar("T")
FEED_CHUNK = 4096  # tokens per feed request (keeps bodies well under the hub's 1 MiB)


@dataclass(frozen=True)
class DraftIdentity:
    """What a session is opened with: the draft's vocabulary and the tokens that end a reply."""

    vocab_size: int
    vocab_fingerprint: str
    draft_model: str
    stop_token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ReplyTerms:
    """What a session is opened for beyond sampling (protocol version 3): the reply's grammar, and
    whether verify answers carry the target's logprobs (with this many alternatives)."""

    constraint: wire.Constraint | None = None
    top_logprobs: int | None = None

    @property
    def plain(self) -> bool:
        return self.constraint is None and self.top_logprobs is None


@dataclass(frozen=True)
class Reconnecting:
    """The hub went away; `attempt` is the retry about to be made, or it came back (`back`)."""

    attempt: int
    window_s: float
    reason: str
    back: bool = False
    memory_full: bool = False  # the hub is there, its KV memory full for now: the session is kept


class HubSession:
    """A hub session that follows our token history, reopened and refed whenever it is lost."""

    def __init__(
        self,
        hub: HubClient,
        identity: Callable[[], DraftIdentity],
        reconnect_s: float = 60.0,
        on_reconnect: Callable[[Reconnecting], None] | None = None,
    ):
        self.hub = hub
        self._identity = identity
        self.reconnect_s = reconnect_s
        self.on_reconnect = on_reconnect
        self.session_id: str | None = None
        self.max_draft_tokens = 64  # the hub's, once a session is open
        self.max_context = 0  # the hub's context limit per session, once one is open (0: not known yet)
        self.held: list[int] = []  # the hub's context, as far as we sent it
        self.sampling = wire.Sampling()
        self.terms = ReplyTerms()  # the open session's
        self.wanted = ReplyTerms()  # the next session's: the reply being decoded asks for them
        self.reconnects = 0
        self.memory_waits = 0  # verifies or feeds the hub refused for want of KV memory, waited out
        self._in_doubt = False  # a request that changes the hub's context did not answer
        self._reached_hub = False  # a hub never reached is a wrong address, not an outage to wait out
        self._hub_version: int | None = None  # the hub's protocol version, read before a session is opened
        self._stream: SessionStream | None = None  # the open session's verify stream, when the hub offers one
        self._streams_refused = False  # an upgrade was refused: verify over HTTP until the hub goes away

    @property
    def reached_hub(self) -> bool:
        """A session was opened on this hub before: losing it now is an outage, not a wrong address."""
        return self._reached_hub

    # --- keeping the hub's context equal to ours ----------------------------------------------
    def sync(self, history: list[int], sampling: wire.Sampling) -> None:
        """Make the hub's context `history`: feed what it lacks, or reopen when it holds something else."""
        if not self._holds_prefix_of(history, sampling):
            self.close()
            self._open(sampling)
        self._feed(history[len(self.held) :])

    def reusable_for(self, history: list[int], sampling: wire.Sampling) -> int:
        """How many of `history`'s tokens this session already holds (0 when it must be reopened)."""
        return len(self.held) if self._holds_prefix_of(history, sampling) else 0

    def _holds_prefix_of(self, history: list[int], sampling: wire.Sampling) -> bool:
        held = self.held
        return (
            self.session_id is not None
            and not self._in_doubt
            and sampling == self.sampling
            and self.terms == self.wanted
            and len(held) <= len(history)
            and history[: len(held)] == held
        )

    def _open(self, sampling: wire.Sampling) -> None:
        identity = self._identity()
        if self._hub_version is None:
            self._hub_version = self.hub.info().protocol_version
        terms = self.wanted
        if not terms.plain and self._hub_version < wire.GRAMMAR_VERSION:
            raise HubRejected(
                f"the hub at {self.hub.base_url} speaks protocol version {self._hub_version}, and structured "
                f"output and logprobs need version {wire.GRAMMAR_VERSION}: the reply would not be constrained "
                "(or would come without logprobs); upgrade the hub, or leave response_format and logprobs out",
                422,
                "hub_lacks_grammars",
            )
        opened = self.hub.open_session(
            wire.OpenSessionRequest(
                vocab_size=identity.vocab_size,
                vocab_fingerprint=identity.vocab_fingerprint,
                draft_model=identity.draft_model,
                sampling=sampling,
                stop_token_ids=sorted(identity.stop_token_ids),
                protocol_version=min(wire.PROTOCOL_VERSION, self._hub_version),  # an older hub's own
                constraint=terms.constraint,
                top_logprobs=terms.top_logprobs,
            )
        )
        self.session_id, self.sampling, self.terms, self.held = opened.session_id, sampling, terms, []
        self.max_draft_tokens, self.max_context = opened.max_draft_tokens, opened.max_context
        self._reached_hub = True
        self._stream = self._open_stream(opened.session_id)

    def _open_stream(self, session_id: str) -> SessionStream | None:
        """The session's verify stream, or None to verify over HTTP (the hub does not offer one, or
        cannot be reached now: HTTP then says so in its usual words)."""
        if self._streams_refused or not self.hub.offers_streams or (self._hub_version or 0) < STREAM_VERSION:
            return None
        try:
            return open_stream(self.hub, session_id)
        except StreamRefused:
            self._streams_refused = True
        except OSError:
            pass
        return None

    def _feed(self, tokens: list[int]) -> None:
        for start in range(0, len(tokens), FEED_CHUNK):
            chunk = tokens[start : start + FEED_CHUNK]
            with self._changing_context():
                self.hub.feed(self._id(), chunk)
            self.held += chunk

    # --- verify: the request runs on another thread, its outcome is settled on ours ------------
    def verify_request(
        self, pending: list[int], draft: list[int], parents: list[int] | None
    ) -> Callable[[], wire.VerifyResponse]:
        """The verify call to run (on a worker thread): the session stays in doubt until `settle`."""
        session_id = self._id()
        if self._stream is not None and self._stream.closed:  # closed between verifies: the session is intact
            self._stream.close()
            self._stream = self._open_stream(session_id)
        stream = self._stream
        self._in_doubt = True
        if stream is None:
            return lambda: self.hub.verify(session_id, tokens=pending, draft=draft, parents=parents)
        return lambda: self._verify_on(stream, session_id, pending, draft, parents)

    def _verify_on(
        self, stream: SessionStream, session_id: str, pending: list[int], draft: list[int], parents: list[int] | None
    ) -> wire.VerifyResponse:
        try:
            return stream.verify(pending, draft, parents)
        except StreamClosed:  # it closed before the frame left: nothing was sent, HTTP sends it
            return self.hub.verify(session_id, tokens=pending, draft=draft, parents=parents)

    def settle(self, pending: list[int], reply: wire.VerifyResponse) -> None:
        """The verify answered: the hub's context gained `pending` and the emitted tokens."""
        self.held += pending + reply.tokens
        self._in_doubt = False

    @contextlib.contextmanager
    def _changing_context(self) -> Iterator[None]:
        self._in_doubt = True
        yield
        self._in_doubt = False

    def _id(self) -> str:
        if self.session_id is None:
            raise SessionLost("no hub session is open", 404, "session_not_found")
        return self.session_id

    def close(self) -> None:
        """Close the hub session, if any (a hub that is gone has closed it already)."""
        self._close_stream()
        if self.session_id is not None:
            session_id, self.session_id, self.held = self.session_id, None, []
            with contextlib.suppress(HubError):
                self.hub.close_session(session_id)

    def forget(self) -> None:
        """Drop the session without asking the hub (it is gone, or its state is unknown)."""
        self._close_stream()
        self.session_id, self.held, self._in_doubt = None, [], False

    def _close_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            stream.close()

    # --- outages --------------------------------------------------------------------------------
    def retrying(self, call: Callable[[], T]) -> T:
        """Run `call`, reopening the session with backoff while the hub is away or restarting."""
        deadline = None  # the window opens at the first failure, however long the call took
        attempt = 0
        for delay in _backoff():
            try:
                value = call()
            except (HubUnreachable, SessionLost, HubBusy) as exc:
                if not self._worth_waiting_for(exc):
                    raise
                deadline = deadline or time.monotonic() + self.reconnect_s
                out_of_memory = isinstance(exc, HubBusy) and exc.code == "kv_memory_full"
                if isinstance(exc, HubBusy) and out_of_memory:  # as long as the hub asked, within the window
                    delay = max(delay, min(exc.retry_after_s, deadline - time.monotonic()))
                if time.monotonic() + delay > deadline:
                    raise self._gone(exc) from exc
                attempt += 1
                if out_of_memory:
                    self._in_doubt = False  # refused before any pass: the session is as it was, keep it
                    self.memory_waits += 1
                    self._notify(Reconnecting(attempt, self.reconnect_s, exc.message, memory_full=True))
                else:
                    self._lost(attempt, exc)
                time.sleep(delay)
                continue
            if attempt:
                self._notify(Reconnecting(attempt, self.reconnect_s, "", back=True))
            return value
        raise AssertionError("unreachable")

    def _worth_waiting_for(self, exc: HubError) -> bool:
        """An outage, a restart and a hub whose KV memory is full for now (mid-reply, its session
        kept) are waited out; a hub too full for a new session, or a user's limit, says when to come
        back: that is the user's call."""
        if isinstance(exc, HubBusy):
            return exc.code in ("not_ready", "kv_memory_full")
        return self._reached_hub

    def _lost(self, attempt: int, exc: HubError) -> None:
        self.forget()  # the old session is gone or unknown; do not wait on it
        self._hub_version, self._streams_refused = None, False  # what comes back may be another hub
        self.reconnects += 1
        self._notify(Reconnecting(attempt, self.reconnect_s, exc.message))

    def _notify(self, event: Reconnecting) -> None:
        if self.on_reconnect is not None:
            self.on_reconnect(event)

    def _gone(self, exc: HubError) -> HubUnreachable:
        return HubUnreachable(
            f"lost the hub at {self.hub.base_url} and it did not come back in "
            f"{self.reconnect_s:.0f} s ({exc.message}); the conversation is saved: "
            "run `specedge chat --continue` when the hub is back"
        )


def _backoff() -> Iterator[float]:
    delay = 0.2
    while True:
        yield delay
        delay = min(delay * 2, 4.0)


class ReconnectNotice:
    """Shows an outage as one line on stderr: on a terminal it is rewritten in place at each attempt
    and erased when the hub is back (the cursor returns to the line above, where the reply's live
    text ends, so its redraw lands where it was); elsewhere it is written once."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self._showing = False

    def __call__(self, event: Reconnecting) -> None:
        tty = self.stream.isatty()
        if event.back:
            if self._showing and tty:
                self.stream.write("\r\x1b[K\x1b[1A")
            self._showing = False
        elif not self._showing or tty:
            lead = "\r" if self._showing else "\n"
            what = "hub's memory is full; waiting" if event.memory_full else "hub unreachable; reconnecting"
            self.stream.write(
                f"{lead}{what} (attempt {event.attempt}, "
                f"retrying for up to {event.window_s:.0f} s)" + ("\x1b[K" if tty else "\n")
            )
            self._showing = True
        self.stream.flush()

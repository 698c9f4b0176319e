"""Simulated users: each with an edge device of their own, answering prompts in one mode at a time.

A user talks to the hub through the typed client (`specedge_cli.remote.client.HubClient`) over
an emulated round trip: half of `rtt_ms` before each request reaches the hub, half after its
answer leaves. In `specedge` mode the user drafts on its edge and the hub verifies; in the two
server-only modes the hub decodes alone (`speculative`, with its own copy of the draft model, or
`autoregressive`) and streams the reply back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from specedge_bench.config import BenchConfig
from specedge_bench.edges import EmulatedEdges
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient

SERVER_MODES = {"server_only_spec": "speculative", "autoregressive": "autoregressive"}


def connect(config: BenchConfig, timeout_s: float = 60) -> HubClient:
    """A connection to the hub under test, with the token where one is given. Plain http to
    another machine is refused only when a token would cross it."""
    return HubClient(config.hub_url, token=config.token, timeout_s=timeout_s, insecure=config.token is None)


def run_all(calls: list[Callable[[], object]]) -> None:
    """Run the calls in threads of their own, all at once; re-raise the first that failed."""
    errors: list[BaseException] = []

    def guarded(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller's thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def open_session(client: HubClient, info: wire.HubInfo, stop_ids: frozenset[int] = frozenset()) -> str:
    """A new session on the hub for the bench's draft (the hub's vocabulary, checked beforehand)."""
    request = wire.OpenSessionRequest(
        vocab_size=info.vocab_size,
        vocab_fingerprint=info.vocab_fingerprint,
        draft_model="bench",
        stop_token_ids=sorted(stop_ids),
    )
    return client.open_session(request).session_id


@dataclass
class ClientRecord:
    emitted: int = 0
    step_itl_ms: list[float] = field(default_factory=list)  # per token: step time / tokens in step
    ttft_ms: list[float] = field(default_factory=list)
    drafts_ahead: int = 0  # verifies sent while the edge could draft the next round ahead
    ahead_hits: int = 0  # ... whose guessed outcome came back, so that draft was sent
    edge_busy_s: float = 0.0  # the user's device drafting, drafts made ahead and thrown away included


class SimulatedUser:
    """One user: an edge device of their own, their prompts in turn, one mode at a time."""

    def __init__(
        self,
        index: int,
        config: BenchConfig,
        edge: EmulatedEdges | None,
        info: wire.HubInfo | None,
        stop_ids: frozenset[int],
    ):
        self.index = index
        self.config = config
        self.edge = edge  # None for a user that only runs server-only modes
        self.info = info
        self.stop_ids = stop_ids
        self.record = ClientRecord()
        self.replies: dict[tuple[int, ...], list[int]] = {}  # prompt -> what this user received

    def run(self, mode: str, prompt_tokens: list[list[int]]) -> None:
        """Answer each prompt in turn, in a session of its own, over one connection."""
        with connect(self.config, timeout_s=600) as client:
            for prompt in prompt_tokens:
                self.replies[tuple(prompt)] = self.answer(client, mode, prompt)

    def answer(self, client: HubClient, mode: str, prompt: list[int]) -> list[int]:
        """One prompt's reply in `mode`, in a session opened and closed for it; recorded in `record`."""
        assert self.info is not None, "a user needs the hub's info to open sessions"
        session = open_session(client, self.info, self.stop_ids)
        try:
            if mode == "specedge":
                return self._specedge(client, session, prompt)
            return self._server_only(client, session, prompt, SERVER_MODES[mode])
        finally:
            client.close_session(session)

    def _half_rtt(self) -> None:
        time.sleep(self.config.rtt_ms / 2000)

    def _specedge(self, client: HubClient, session: str, prompt: list[int]) -> list[int]:
        assert self.edge is not None, "a SpecEdge user drafts on an edge"
        context, pending, produced = list(prompt), list(prompt), 0
        started = time.perf_counter()
        drafting_since = None  # when the edge began the next draft, if before this step
        while produced < self.config.max_tokens:
            step_started = time.perf_counter()
            room = self.config.max_tokens - produced - 1
            draft = self.edge.draft(context, min(self.config.draft_len, room), drafting_since) if room > 0 else []
            self.record.edge_busy_s += self.edge.draft_seconds(len(draft))
            sent = time.perf_counter()
            self._half_rtt()
            emitted = client.verify(session, pending, draft).tokens
            self._half_rtt()
            drafting_since = self._drafted_ahead(sent, context, draft, emitted, room)
            pending = []
            context += emitted
            produced += len(emitted)
            self._record_step(started, step_started, len(emitted), first=produced == len(emitted))
            if emitted[-1] in self.stop_ids:
                break
        return context[len(prompt) :]

    def _drafted_ahead(
        self, sent: float, context: list[int], draft: list[int], emitted: list[int], room: int
    ) -> float | None:
        """Proactive drafting, as the real client does it: while a verify is out, the edge drafts
        the next round below its likeliest outcome, every draft token accepted and then the
        draft model's own next token. When that is what comes back, the next draft began when
        this verify was sent (returns that time); otherwise it begins now (None), and what the
        edge drafted while the verify was out is thrown away (its device time still counts).
        The guess is only looked at when the whole draft was accepted, so it never costs a draft
        step here. `room`: the tokens this step could emit beyond its bonus token."""
        ahead = min(self.config.draft_len, room - len(draft) - 1)
        if not (self.config.proactive and draft) or ahead <= 0:
            return None  # no next round to draft for after the guessed outcome
        assert self.edge is not None
        self.record.drafts_ahead += 1
        if emitted[:-1] == draft and emitted[-1] == self.edge.next_token(context + draft):
            self.record.ahead_hits += 1
            return sent
        self.record.edge_busy_s += min(self.edge.draft_seconds(ahead), time.perf_counter() - sent)
        return None

    def _server_only(self, client: HubClient, session: str, prompt: list[int], mode: str) -> list[int]:
        request = wire.GenerateRequest(
            mode=mode, tokens=prompt, max_tokens=self.config.max_tokens, draft_len=self.config.draft_len
        )
        started = time.perf_counter()
        self._half_rtt()
        step_started, produced, reply = started, 0, []
        for chunk in client.generate(session, request):
            if chunk.done:
                break
            if produced == 0:
                self._half_rtt()  # the first chunk travels back; later ones stream behind it
            produced += len(chunk.tokens)
            reply += chunk.tokens
            self._record_step(started, step_started, len(chunk.tokens), first=produced == len(chunk.tokens))
            step_started = time.perf_counter()
        return reply

    def _record_step(self, started: float, step_started: float, tokens: int, first: bool) -> None:
        now = time.perf_counter()
        self.record.emitted += tokens
        if first:
            self.record.ttft_ms.append((now - started) * 1000)
            return
        self.record.step_itl_ms.extend([(now - step_started) * 1000 / tokens] * tokens)

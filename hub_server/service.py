"""What the hub does for each request, checked and independent of HTTP."""

from __future__ import annotations

import time

from hub_server import protocol as wire
from hub_server.config import HubSettings
from hub_server.errors import BadRequest, ContextTooLong, HubFull, VocabMismatch
from hub_server.runner import VerifyJob
from hub_server.scheduler import Scheduler
from hub_server.sessions import SessionStore
from hub_server.verify import chain_parents, node_depths, tree_problem


class Hub:
    def __init__(self, settings: HubSettings, runner):
        self.settings = settings
        self.runner = runner
        self.sessions = SessionStore()
        self.scheduler = Scheduler(runner.verify_batch, max_batch=settings.max_batch,
                                   max_wait_s=settings.batch_wait_ms / 1000)

    def info(self) -> wire.HubInfo:
        return wire.HubInfo(
            protocol_version=wire.PROTOCOL_VERSION, model=self.runner.name,
            vocab_size=self.runner.vocab.size, vocab_fingerprint=self.runner.vocab.fingerprint,
            max_draft_tokens=self.settings.max_draft_tokens, max_context=self.runner.max_context,
        )

    def open_session(self, request: wire.OpenSessionRequest) -> wire.OpenSessionResponse:
        if request.protocol_version != wire.PROTOCOL_VERSION:
            raise BadRequest(
                f"this hub speaks protocol version {wire.PROTOCOL_VERSION}, the client "
                f"{request.protocol_version}; upgrade the older of the two"
            )
        vocab = self.runner.vocab
        if request.vocab_size != vocab.size or request.vocab_fingerprint != vocab.fingerprint:
            raise VocabMismatch(
                f"the draft model {request.draft_model or '(unnamed)'} has a vocabulary of "
                f"{request.vocab_size} tokens that differs from the target {self.runner.name} "
                f"({vocab.size} tokens); use a draft model of the target's family"
            )
        self._check_ids(request.stop_token_ids, "stop_token_ids")
        if len(self.sessions) >= self.settings.max_sessions:
            raise HubFull(
                f"the hub serves its maximum of {self.settings.max_sessions} sessions; retry in a few seconds"
            )
        session = self.sessions.add(
            request.sampling.temperature, request.sampling.seed,
            frozenset(request.stop_token_ids), self.runner.new_kv(),
        )
        return wire.OpenSessionResponse(
            session_id=session.session_id, model=self.runner.name,
            max_draft_tokens=self.settings.max_draft_tokens, max_context=self.runner.max_context,
        )

    def feed(self, session_id: str, request: wire.FeedRequest) -> wire.FeedResponse:
        session = self.sessions.get(session_id)
        with session.lock:
            self._check_ids(request.tokens, "tokens")
            self._check_room(len(session.context) + len(request.tokens))
            session.context.extend(request.tokens)
            self.runner.prefill(session.kv, session.context)
            return wire.FeedResponse(context_len=len(session.context))

    def verify(self, session_id: str, request: wire.VerifyRequest) -> wire.VerifyResponse:
        session = self.sessions.get(session_id)
        with session.lock:
            parents = self._check_draft(request)
            if not session.context and not request.tokens:
                raise BadRequest("the session has no context yet: send the prompt in `tokens` or feed it first")
            # +1 for the bonus token the verify adds.
            self._check_room(len(session.context) + len(request.tokens) + max(node_depths(parents), default=0) + 1)
            session.context.extend(request.tokens)
            job = VerifyJob(
                session.kv, session.context[session.kv.length:], request.draft, parents,
                session.temperature, session.seed, session.stop_token_ids,
            )
            started = time.perf_counter()
            self.scheduler.submit(job).result()
            session.context.extend(job.emitted)
            return wire.VerifyResponse(
                accepted=len(job.path), tokens=job.emitted, context_len=len(session.context),
                verify_ms=(time.perf_counter() - started) * 1000,
            )

    def _check_draft(self, request: wire.VerifyRequest) -> list[int]:
        """The draft's parents (a chain when none are given), once the draft is known to be sound."""
        self._check_ids(request.tokens, "tokens")
        self._check_ids(request.draft, "draft")
        if len(request.draft) > self.settings.max_draft_tokens:
            raise BadRequest(
                f"draft of {len(request.draft)} tokens is longer than this hub's limit of "
                f"{self.settings.max_draft_tokens}; send shorter drafts"
            )
        if request.parents is None:
            return chain_parents(len(request.draft))
        if len(request.parents) != len(request.draft):
            raise BadRequest(f"parents has {len(request.parents)} entries for {len(request.draft)} draft tokens; send one per token")
        problem = tree_problem(request.parents)
        if problem:
            raise BadRequest(problem)
        return request.parents

    def close(self, session_id: str) -> None:
        self.sessions.remove(session_id)

    def _check_ids(self, tokens: list[int], name: str) -> None:
        bad = [t for t in tokens if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise BadRequest(
                f"{name} holds token id {bad[0]} outside this model's vocabulary "
                f"[0, {self.runner.vocab_size}); is the draft model of the target's family?"
            )

    def _check_room(self, needed: int) -> None:
        if needed > self.runner.max_context:
            raise ContextTooLong(
                f"the conversation would need {needed} tokens, more than this model's context "
                f"of {self.runner.max_context}; start a new conversation"
            )

"""The checks a request passes before the hub takes it on: each raises the refusal a client sees,
with what to do. Pure functions of the request and the hub's limits; no torch, no state."""

from __future__ import annotations

from hub_server import protocol as wire
from hub_server.errors import BadRequest, ContextTooLong, SessionNotFound, VocabMismatch
from hub_server.sessions import Session
from hub_server.tree import chain_parents, tree_problem


def check_opening(request: wire.OpenSessionRequest, model: str, vocab_size: int, vocab_fingerprint: str) -> None:
    """A session opens only in this hub's protocol and for a draft of the target's vocabulary."""
    if not wire.OLDEST_PROTOCOL_VERSION <= request.protocol_version <= wire.PROTOCOL_VERSION:
        raise BadRequest(
            f"this hub speaks protocol versions {wire.OLDEST_PROTOCOL_VERSION} to {wire.PROTOCOL_VERSION}, "
            f"the client {request.protocol_version}; upgrade the older of the two"
        )
    asks = [name for name in ("constraint", "top_logprobs") if getattr(request, name) is not None]
    if asks and request.protocol_version < wire.GRAMMAR_VERSION:
        raise BadRequest(
            f"{asks[0]} came in protocol version {wire.GRAMMAR_VERSION}; open the session in that version "
            f"(the client says {request.protocol_version})"
        )
    if request.constraint is not None and not request.stop_token_ids:
        raise BadRequest("a session with a constraint needs stop_token_ids: the grammar's end is where a reply stops")
    if request.vocab_size != vocab_size or request.vocab_fingerprint != vocab_fingerprint:
        raise VocabMismatch(
            f"the draft model {request.draft_model or '(unnamed)'} has a vocabulary of "
            f"{request.vocab_size} tokens that differs from the target {model} "
            f"({vocab_size} tokens); use a draft model of the target's family"
        )


def check_ids(tokens: list[int], name: str, vocab_size: int) -> None:
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise BadRequest(
            f"{name} holds token id {bad[0]} outside this model's vocabulary "
            f"[0, {vocab_size}); is the draft model of the target's family?"
        )


def check_room(needed: int, max_context: int) -> None:
    if needed > max_context:
        raise ContextTooLong(
            f"the conversation would need {needed} tokens, more than this model's context "
            f"of {max_context}; start a new conversation"
        )


def check_draft(request: wire.VerifyRequest, max_draft_tokens: int, vocab_size: int) -> list[int]:
    """The draft's parents (a chain when none are given), once the draft is known to be sound."""
    check_ids(request.tokens, "tokens", vocab_size)
    check_ids(request.draft, "draft", vocab_size)
    if len(request.draft) > max_draft_tokens:
        raise BadRequest(
            f"draft of {len(request.draft)} tokens is longer than this hub's limit of "
            f"{max_draft_tokens}; send shorter drafts"
        )
    if request.parents is None:
        return chain_parents(len(request.draft))
    if len(request.parents) != len(request.draft):
        raise BadRequest(
            f"parents has {len(request.parents)} entries for {len(request.draft)} draft tokens; send one per token"
        )
    problem = tree_problem(request.parents)
    if problem:
        raise BadRequest(problem)
    return request.parents


def check_open(session: Session) -> None:
    """A request that waited for a session closed or evicted meanwhile finds it gone."""
    if session.kv is None:
        raise SessionNotFound(f"no session {session.session_id!r} on this hub; open a new session")

"""Errors the hub reports to clients.

    RequestRefused            base: an HTTP status, a stable code and a message saying what to do
    ├── BadRequest            400/422  malformed body, ids out of range, draft too long
    ├── VocabMismatch         409      draft and target vocabularies differ
    ├── ContextTooLong        422      context would pass the model's limit
    ├── SessionNotFound       404      unknown (or another user's) session
    │   └── WorkerLost        404      the engine worker holding the session died (same code:
    │                                  clients reopen the session and feed its context again)
    ├── HubFull               429      no room for another session now (with Retry-After)
    ├── KVMemoryFull          503      a session's context needs KV blocks and none is free nor
    │                                  reclaimable now (with Retry-After)
    ├── Unauthorized          401      missing, unknown or revoked API token
    │   └── TokenExpired      401      a token past its expiry
    ├── Forbidden             403      a route for the hub's operators (/metrics) asked by another user
    ├── RateLimited           429      a per-user limit (sessions, tokens per minute; with Retry-After)
    │   └── SessionBusy       429      too many requests already wait for one session's turn
    ├── NotReady              503      the model is still loading
    │   └── EngineRestarting  503      the engine process is starting again (with Retry-After)
    ├── UnknownWorker         404      `hub_server workers drain ID`: no worker of that id
    └── AccountsUnavailable   503      the accounts database cannot be read now (damaged, locked)

    AccountError              the admin commands (`hub_server users|tokens`): unknown or
                              duplicate user, bad name, unknown token id
    └── AccountsDamaged       the accounts database is damaged: refused at open, by `serve` too
    KVBudgetError             start-up: the configured sessions x context do not fit the KV budget
    ClusterError              start-up: the Ray cluster for the workers cannot be joined or started

Route handlers raise these; one exception handler in `app.py` turns them into JSON bodies.
"""

from __future__ import annotations


class RequestRefused(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(RequestRefused):
    status = 422
    code = "bad_request"


class VocabMismatch(RequestRefused):
    status = 409
    code = "vocab_mismatch"


class ContextTooLong(RequestRefused):
    status = 422
    code = "context_too_long"


class SessionNotFound(RequestRefused):
    status = 404
    code = "session_not_found"


class WorkerLost(SessionNotFound):
    """The worker that held a session is gone (process killed, device error, node lost), so is
    the session's KV cache. Raised where Ray's errors enter (`workers.py`); the code stays
    `session_not_found`, which every client already answers by reopening the session."""


class UnknownWorker(RequestRefused):
    status = 404
    code = "worker_not_found"


class NotReady(RequestRefused):
    status = 503
    code = "not_ready"


class EngineRestarting(NotReady):
    """The hub's engine process is starting or starting again; its front end answers meanwhile."""

    retry_after_s = 2


class HubFull(RequestRefused):
    status = 429
    code = "hub_full"
    retry_after_s = 5


class KVMemoryFull(RequestRefused):
    """A growing session found no free KV block, no cached one to reclaim and no idle session to
    evict: the request is refused before any pass runs, so the session stays as it was."""

    status = 503
    code = "kv_memory_full"
    retry_after_s = 5


class Unauthorized(RequestRefused):
    status = 401
    code = "unauthorized"


class TokenExpired(Unauthorized):
    pass


class Forbidden(RequestRefused):
    status = 403
    code = "forbidden"


class AccountsUnavailable(RequestRefused):
    status = 503
    code = "accounts_unavailable"
    retry_after_s = 30


class RateLimited(RequestRefused):
    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SessionBusy(RateLimited):
    code = "session_busy"


class AccountError(Exception):
    """An admin command cannot do what it was asked; the message says why."""


class AccountsDamaged(AccountError):
    """The accounts database is damaged; the message says how to recover."""


class KVBudgetError(ValueError):
    """The configured sessions and context do not fit the KV memory budget; the message says what to change."""


class ClusterError(RuntimeError):
    """The Ray cluster for the engine workers cannot be joined or started; the message says what to check."""


def refusal(kind: str, message: str, retry_after_s: int | None = None) -> RequestRefused:
    """A refusal made on the other side of the engine process's boundary, as its own class again
    (by name; an unknown name is answered as the base class, a 500 that says what happened)."""
    cls = _refusal_classes().get(kind, RequestRefused)
    refused = cls.__new__(cls)
    RequestRefused.__init__(refused, message)
    if retry_after_s is not None:
        refused.retry_after_s = retry_after_s  # type: ignore[attr-defined]
    return refused


def _refusal_classes() -> dict[str, type[RequestRefused]]:
    found: dict[str, type[RequestRefused]] = {}
    pending: list[type[RequestRefused]] = [RequestRefused]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found

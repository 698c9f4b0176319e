"""The hub's side of the wire format (documented in docs/protocol.md).

Only token ids cross the network. A client opens a session with its sampling settings and
the fingerprint of its draft model's vocabulary, feeds tokens (a new user turn), asks the hub
to verify drafts, and closes the session. Every body is JSON; every error body is
`{"error": {"code": ..., "message": ...}}`.

`specedge_cli.remote.protocol` is the client's copy; tests/test_protocol.py proves they agree.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 3  # 2: a session's verify stream (`hub_server/stream.py`); 3: grammars and logprobs
GRAMMAR_VERSION = 3  # the first version whose sessions may carry a constraint or ask for logprobs
# Sessions of older clients still open: each version since adds to the wire, none changes it.
OLDEST_PROTOCOL_VERSION = 1


class _Body(BaseModel):
    # Unknown keys are refused so that a client speaking another dialect hears about it.
    model_config = ConfigDict(extra="forbid", strict=True)


class Sampling(_Body):
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    seed: int = Field(0, ge=0, le=2**63 - 1)


class Constraint(_Body):
    """A grammar (llguidance's format) the context's tokens from `start` on must follow: the target's
    token at every position from `start` is drawn from the tokens the grammar allows there."""

    grammar: str = Field(min_length=1, max_length=512 * 1024)
    start: int = Field(ge=0)


class OpenSessionRequest(_Body):
    protocol_version: int
    vocab_size: int = Field(gt=0)
    vocab_fingerprint: str = Field(min_length=1, max_length=128)
    draft_model: str = Field("", max_length=256)
    sampling: Sampling = Sampling(temperature=0.0, seed=0)
    # Acceptance stops at the first stop token, so the hub's context ends where the reply ends.
    stop_token_ids: list[int] = Field(default_factory=list, max_length=64)
    # Version 3: the reply's grammar; and the target's log-probabilities of the emitted tokens with
    # each verify answer, with this many of its likeliest tokens beside each (None: no logprobs).
    constraint: Constraint | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class OpenSessionResponse(_Body):
    session_id: str
    model: str
    max_draft_tokens: int
    max_context: int


class FeedRequest(_Body):
    tokens: list[int] = Field(min_length=1)


class FeedResponse(_Body):
    context_len: int


class VerifyRequest(_Body):
    # Tokens to append to the context before the draft: the previous bonus token, or a new turn.
    tokens: list[int] = Field(default_factory=list)
    draft: list[int] = Field(default_factory=list)
    # The draft as a tree: parents[i] is node i's parent index, -1 for the context. None: a chain.
    parents: list[int] | None = None


class TokenLogprobs(_Body):
    """The target's log-probability of one emitted token (log_softmax of its logits, before any
    temperature or grammar), and its `top_logprobs` likeliest tokens with theirs."""

    logprob: float
    top_tokens: list[int] = Field(default_factory=list)
    top_logprobs: list[float] = Field(default_factory=list)


class VerifyResponse(_Body):
    accepted: int  # how many draft tokens the target agreed with
    tokens: list[int]  # the emitted tokens: the accepted draft prefix, then the bonus token
    context_len: int  # tokens in the session's context after this verify (bonus included)
    verify_ms: float  # hub time spent on this request, for the client's figures
    logprobs: list[TokenLogprobs] | None = None  # one per emitted token, when the session asked; else left out


class GenerateRequest(_Body):
    """Server-only decoding: the hub produces the tokens itself (the baselines, and users without a GPU)."""

    mode: Literal["autoregressive", "speculative"] = "autoregressive"
    tokens: list[int] = Field(default_factory=list)  # appended to the context first
    max_tokens: int = Field(256, ge=1, le=65536)
    draft_len: int = Field(8, ge=1, le=64)  # speculative mode: hub-side draft length


class GenerateChunk(_Body):
    """One line of the NDJSON stream a generate request answers; the last has done = true."""

    tokens: list[int]
    done: bool = False
    verifies: int = 0
    context_len: int = 0


class WorkerCount(_Body):
    """Engine workers serving now (ready or draining) and configured; /v1/info and /health."""

    ready: int
    total: int


class DraftHint(_Body):
    """The draft the hub's operator names for its target (`hub_server serve --draft-hint`): a client
    preset by name, or a GGUF file on the Hugging Face Hub with its sha256. Empty fields are unset."""

    preset: str = ""  # a `specedge models` preset name
    hf_repo: str = ""  # OWNER/REPO
    hf_file: str = ""  # the .gguf file's path in the repository
    sha256: str = ""  # of that file, checked before first use


class HubInfo(_Body):
    protocol_version: int
    model: str
    vocab_size: int
    vocab_fingerprint: str
    max_draft_tokens: int
    max_context: int
    modes: list[str] = Field(default_factory=list)  # serving modes this hub offers
    workers: WorkerCount = WorkerCount(ready=1, total=1)
    draft_hint: DraftHint | None = None  # the draft that fits this target, when the operator named one


class WorkerInfo(_Body):
    """One engine worker, for operators (`GET /v1/workers`, `hub_server workers`)."""

    worker_id: str
    node: str  # host name (in-process) or Ray node id
    pid: int
    device: str
    devices: list[str] = []  # every device its passes run on: a tensor-parallel worker's ranks, in order
    pids: list[int] = []  # every process of it: its ranks', rank 0 (`pid`) first
    state: Literal["ready", "draining", "lost"]
    sessions: int  # open sessions placed on it
    kv_slots: int  # sessions its table holds (--max-sessions); memory is in blocks
    kv_bytes_used: int
    kv_bytes_reserved: int
    kv_blocks: int = 0  # KV blocks allocated at start
    kv_blocks_used: int = 0  # held by its open sessions
    kv_blocks_cached: int = 0  # held by none, kept for their prefix until memory is needed
    queue_depth: int  # verifies waiting for its device
    passes: int  # verify passes it has run
    restarts: int  # times it came back as a new process


class WorkerList(_Body):
    workers: list[WorkerInfo]


class UserLimits(_Body):
    max_sessions_per_user: int  # 0: no per-user cap
    tokens_per_minute: int  # 0: unlimited


class WhoAmIResponse(_Body):
    """`GET /v1/whoami`: who the token belongs to, their limits and what they use now."""

    user: str
    limits: UserLimits
    sessions: int  # sessions of this user open now
    tokens_left: int | None  # tokens this user may send now; None when unlimited


class ErrorDetail(_Body):
    code: str
    message: str


class ErrorResponse(_Body):
    error: ErrorDetail

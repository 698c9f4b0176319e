"""The client's side of the wire format (docs/protocol.md); tests prove it matches the hub's.

Plain dataclasses: the client does not need a validation library to speak to a hub.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

PROTOCOL_VERSION = 3  # 2: a session's verify stream (`stream.py`); a hub of 1 is spoken to in 1, over HTTP
GRAMMAR_VERSION = 3  # 3: a session's grammar (`constraint`) and the target's logprobs


class _Message:
    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]  # every subclass is a dataclass

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Self:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{key: value for key, value in body.items() if key in names})


@dataclass(frozen=True)
class Sampling(_Message):
    temperature: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Constraint(_Message):
    grammar: str  # llguidance's format
    start: int  # the first context position the grammar covers


@dataclass(frozen=True)
class OpenSessionRequest(_Message):
    vocab_size: int
    vocab_fingerprint: str
    draft_model: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    stop_token_ids: list[int] = field(default_factory=list)
    protocol_version: int = PROTOCOL_VERSION
    constraint: Constraint | None = None
    top_logprobs: int | None = None  # None: the answers carry no logprobs

    def to_json(self) -> dict[str, Any]:
        # Left out when unset: a hub older than GRAMMAR_VERSION refuses fields it does not know.
        return {key: value for key, value in super().to_json().items() if value is not None}


@dataclass(frozen=True)
class OpenSessionResponse(_Message):
    session_id: str
    model: str
    max_draft_tokens: int
    max_context: int


@dataclass(frozen=True)
class FeedRequest(_Message):
    tokens: list[int]


@dataclass(frozen=True)
class FeedResponse(_Message):
    context_len: int


@dataclass(frozen=True)
class VerifyRequest(_Message):
    tokens: list[int]
    draft: list[int]
    parents: list[int] | None = None


@dataclass(frozen=True)
class TokenLogprobs(_Message):
    logprob: float
    top_tokens: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class VerifyResponse(_Message):
    accepted: int
    tokens: list[int]
    context_len: int
    verify_ms: float
    logprobs: list[TokenLogprobs] | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> VerifyResponse:
        reply = super().from_json({key: value for key, value in body.items() if key != "logprobs"})
        logprobs = body.get("logprobs")
        if logprobs is None:
            return reply
        return replace(reply, logprobs=[TokenLogprobs.from_json(entry) for entry in logprobs])


@dataclass(frozen=True)
class GenerateRequest(_Message):
    mode: str = "autoregressive"
    tokens: list[int] = field(default_factory=list)
    max_tokens: int = 256
    draft_len: int = 8


@dataclass(frozen=True)
class GenerateChunk(_Message):
    tokens: list[int]
    done: bool = False
    verifies: int = 0
    context_len: int = 0


@dataclass(frozen=True)
class DraftHint(_Message):
    """The draft the hub's operator names for its target: a preset, or a Hugging Face file and its sha256."""

    preset: str = ""
    hf_repo: str = ""
    hf_file: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class HubInfo(_Message):
    protocol_version: int
    model: str
    vocab_size: int
    vocab_fingerprint: str
    max_draft_tokens: int
    max_context: int
    modes: list[str] = field(default_factory=list)
    workers: dict[str, int] = field(default_factory=lambda: {"ready": 1, "total": 1})  # engine workers
    draft_hint: DraftHint | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> HubInfo:
        hint = body.get("draft_hint")
        info = super().from_json({key: value for key, value in body.items() if key != "draft_hint"})
        return replace(info, draft_hint=DraftHint.from_json(hint)) if isinstance(hint, dict) else info


@dataclass(frozen=True)
class UserLimits(_Message):
    max_sessions_per_user: int = 0
    tokens_per_minute: int = 0


@dataclass(frozen=True)
class WhoAmIResponse(_Message):
    user: str
    limits: UserLimits
    sessions: int = 0
    tokens_left: int | None = None

    @classmethod
    def from_json(cls, body: dict) -> WhoAmIResponse:
        return cls(
            user=body["user"],
            limits=UserLimits.from_json(body.get("limits") or {}),
            sessions=body.get("sessions", 0),
            tokens_left=body.get("tokens_left"),
        )

"""Hub settings: one dataclass, validated once at start-up and passed to what needs it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

import platformdirs

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("specedge-hub"))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HubSettings:
    model: str                           # a .gguf file or a Hugging Face model folder
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    max_draft_tokens: int = 64           # longest draft one verify may carry
    max_context: int = 0                 # 0: the model's own limit
    max_sessions: int = 64
    draft: str | None = None             # a .gguf draft for the server-only speculative mode
    session_idle_s: float = 600.0        # idle sessions are evicted after this long
    max_batch: int = 16                  # sessions verified in one forward pass
    batch_wait_ms: float = 2.0           # longest wait for a fuller batch
    cache_dir: Path | None = None        # where converted GGUF targets are kept

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"--port must be between 1 and 65535, not {self.port}")
        if self.max_batch < 1:
            raise ValueError("--max-batch must be at least 1")
        if self.max_draft_tokens < 1:
            raise ValueError("--max-draft-tokens must be at least 1")

"""Hub settings: one dataclass, validated once at start-up and passed to what needs it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

from specedge_common.net import is_loopback

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("auto", "on", "off")
CPU_MATMULS = ("auto", "mkl", "onednn")
ATTENTIONS = ("auto", "reference", "kernel", "flex")
SHARE_PREFIXES = ("account", "across-accounts", "off")
CORES_PER_FRONT_END = 4  # the engine process keeps cores for its own loop and the device's feeding


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class DraftHint:
    """`--draft-hint`, as /v1/info publishes it (`protocol.DraftHint`; this module stays free of pydantic)."""

    preset: str = ""
    hf_repo: str = ""
    hf_file: str = ""
    sha256: str = ""


_PRESET_NAME = re.compile(r"[\w.+-]{1,100}")
_HF_HINT = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[\w./+-]+\.gguf)@(?P<sha256>[0-9a-fA-F]{64})")


def parse_draft_hint(text: str) -> DraftHint:
    """`--draft-hint`: a client preset name, or OWNER/REPO/FILE.gguf@SHA256 on the Hugging Face Hub."""
    text = text.strip()
    if _PRESET_NAME.fullmatch(text):
        return DraftHint(preset=text)
    hf = _HF_HINT.fullmatch(text)
    if hf is None:
        raise ValueError(
            f"--draft-hint takes a preset name (e.g. qwen2.5-coder-0.5b) or OWNER/REPO/FILE.gguf@SHA256, not {text!r}"
        )
    return DraftHint(hf_repo=hf["repo"], hf_file=hf["file"], sha256=hf["sha256"].lower())


def default_cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("specedge-hub"))


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("specedge-hub"))


def accounts_path(data_dir: Path | None) -> Path:
    return (data_dir or default_data_dir()) / "accounts.sqlite3"


@dataclass(frozen=True)
class HubSettings:
    model: str  # a .gguf file or a Hugging Face model folder
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    max_draft_tokens: int = 64  # longest draft one verify may carry
    max_context: int = 0  # a session's limit (reserves nothing); 0: the model's, cut to what the KV blocks hold
    max_sessions: int = 64  # the session table's rows; KV blocks are taken as contexts grow
    kv_memory_gib: float = 0.0  # KV pool budget; 0: a share of the memory free after loading
    draft: str | None = None  # a .gguf draft for the server-only speculative mode
    draft_hint: DraftHint | None = None  # the draft /v1/info names for clients (--draft-hint)
    session_idle_s: float = 600.0  # idle sessions are evicted after this long
    max_batch: int = 16  # sessions verified in one forward pass
    batch_wait_ms: float = 2.0  # longest wait for work on its way to fill a batch
    merge_wait_share: float = 1.0  # wait for users due back within this share of a pass's fixed cost
    max_pass_tokens: int = 0  # prompt tokens a step carries beside its verifies; 0: auto (measured)
    threads: int = 0  # torch's threads for a CPU target's passes; 0: one for verify passes, every core for prompts
    cache_dir: Path | None = None  # where converted GGUF targets and compiled passes are kept
    compile: str = "auto"  # compiled fixed-shape passes: on, off, or auto (on for CUDA)
    cpu_matmul: str = "auto"  # a CPU target's float32 products: mkl, onednn, or auto (the faster, timed at start)
    attention: str = "auto"  # the attention backend: reference, kernel (a CPU's), flex, or auto (attention/choice.py)
    share_prefixes: str = "account"  # whose sessions share a common prefix's KV: one account's, all, or none
    data_dir: Path | None = None  # accounts database; None: default_data_dir()
    auth: bool = True  # False (--no-auth) is allowed on loopback only
    # A single pre-authorised token (the embedded hub of `specedge chat`); no database then.
    embedded_token: str | None = field(default=None, repr=False)
    max_sessions_per_user: int = 0  # 0: no per-user cap (--max-sessions still applies)
    tokens_per_minute: int = 0  # per user; 0: unlimited
    max_queue_depth: int = 0  # feeds and verifies in flight at once; 0: no cap
    log_format: str = "text"
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    request_timeout_s: float = 30.0  # a request's headers and body must all arrive within this
    max_connections: int = 1024  # open connections; one more is answered 503 and closed
    ssl_keyfile: Path | None = None  # TLS served by uvicorn itself (or put a proxy in front)
    ssl_certfile: Path | None = None
    workers: int = 1  # engine workers on --device; more than one run on Ray
    devices: tuple[str, ...] = ()  # one worker per device (cpu, cuda, cuda:N); overrides workers
    tensor_parallel: int = 1  # devices of one node each worker spans, each holding 1/N of every layer
    ray_address: str | None = None  # join this Ray cluster (auto, HOST:PORT); None: in-process or a local one
    api_servers: int = 0  # front-end processes serving HTTP before the engine process; 0: one per 4 cores

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}, not {self.compile!r}")
        if self.cpu_matmul not in CPU_MATMULS:
            raise ValueError(f"--cpu-matmul must be one of {', '.join(CPU_MATMULS)}, not {self.cpu_matmul!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTIONS)}, not {self.attention!r}")
        if self.share_prefixes not in SHARE_PREFIXES:
            raise ValueError(
                f"--share-prefixes must be one of {', '.join(SHARE_PREFIXES)}, not {self.share_prefixes!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if not 0 < self.port < 65536 and self.port != 0:
            raise ValueError(f"--port must be between 1 and 65535, not {self.port}")
        if self.threads < 0:
            raise ValueError("--threads must be 0 (chosen per pass) or a number of threads")
        if self.max_pass_tokens < 0:
            raise ValueError("--max-pass-tokens must be 0 (auto) or a number of tokens")
        if self.max_batch < 1:
            raise ValueError("--max-batch must be at least 1")
        if self.max_sessions < 1:
            raise ValueError("--max-sessions must be at least 1")
        if self.max_context < 0 or self.kv_memory_gib < 0:
            raise ValueError("--max-context and --kv-memory-gib must be 0 (automatic) or more")
        if self.max_draft_tokens < 1:
            raise ValueError("--max-draft-tokens must be at least 1")
        if not self.auth and not is_loopback(self.host):
            raise ValueError(
                f"--no-auth is only allowed on a loopback address, not {self.host}; "
                "create tokens with `hub_server tokens create --user NAME` instead"
            )
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        if min(self.max_sessions_per_user, self.tokens_per_minute, self.max_queue_depth) < 0:
            raise ValueError(
                "--max-sessions-per-user, --tokens-per-minute and --max-queue-depth must be 0 (no limit) or more"
            )
        if not 0 <= self.merge_wait_share <= 1:
            raise ValueError(f"--merge-wait-share must be between 0 (never wait) and 1, not {self.merge_wait_share}")
        if self.api_servers < 0:
            raise ValueError("--api-servers must be 0 (one per 4 cores) or a number of front ends")
        if self.shutdown_timeout_s < 0:
            raise ValueError("--shutdown-timeout must be 0 or more")
        if self.request_timeout_s <= 0 or self.max_connections < 1:
            raise ValueError("--request-timeout-s must be above 0 and --max-connections at least 1")
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("give both --ssl-keyfile and --ssl-certfile, or neither")
        self._check_workers()

    def _check_workers(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        self._check_tensor_parallel()
        groups = len(self.devices) // self.tensor_parallel
        if self.devices and self.workers not in (1, groups):
            raise ValueError(
                f"--workers {self.workers} disagrees with the {len(self.devices)} --devices; give one of them"
            )
        for device in self.devices:
            kind, _, index = device.partition(":")
            if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
                raise ValueError(f"--devices takes cpu, cuda or cuda:N, not {device!r}")
            if index and self.ray_address:
                raise ValueError(
                    f"--devices {device}: on a Ray cluster each worker gets a free GPU of some node; "
                    "give --workers N --device cuda instead"
                )
        if self.ray_address is not None and not self.ray_address.strip():
            raise ValueError("--ray-address takes auto or HOST:PORT")

    def _check_tensor_parallel(self) -> None:
        tp = self.tensor_parallel
        if tp < 1:
            raise ValueError("--tensor-parallel must be at least 1 (devices per worker)")
        if tp == 1:
            return
        if self.devices and len(self.devices) % tp:
            raise ValueError(f"--devices: {len(self.devices)} devices do not make workers of --tensor-parallel {tp}")
        if len({device.partition(":")[0] for device in self.devices}) > 1:
            raise ValueError("--devices: a tensor-parallel worker's devices are all cpu or all cuda")
        if self.compile == "on":
            raise ValueError(f"--compile on does not combine with --tensor-parallel {tp} yet; use --compile off")

    @property
    def worker_devices(self) -> tuple[str, ...]:
        """The device of each engine worker (its first, for a tensor-parallel worker)."""
        return self.devices[:: self.tensor_parallel] or (self.device,) * self.workers

    @property
    def rank_devices(self) -> tuple[str, ...]:
        """Every device the workers take: `tensor_parallel` for each worker, in worker order."""
        return self.devices or (self.device,) * (self.workers * self.tensor_parallel)

    @property
    def front_ends(self) -> int:
        """How many processes serve HTTP: --api-servers, or one per `CORES_PER_FRONT_END` cores (at most 8)."""
        return self.api_servers or max(1, min(8, (os.cpu_count() or 1) // CORES_PER_FRONT_END))

    @property
    def in_process(self) -> bool:
        """One worker and no cluster: the engine runs in the hub's own process, without Ray."""
        return len(self.worker_devices) == 1 and self.tensor_parallel == 1 and self.ray_address is None

    @property
    def accounts_path(self) -> Path:
        return accounts_path(self.data_dir)

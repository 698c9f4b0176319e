"""Shared fixtures: tiny models built at test time, a real hub on loopback, and the target
model decoding alone (the reference every decoding test compares against)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from hub_server.engine.cpu.products import onednn_available
from hub_server.engine.sampling import sample_row
from hub_server.tree import position_uniform
from specedge_common.launcher import HubProcess, HubStartError
from specedge_common.net import free_port
from tests.tiny_models import TinyModel, build_tiny_model, build_tokenizer

# The device the runner tests put their runners on (benchmarks/gpu_check.sh sets cuda).
DEVICE = os.environ.get("SPECEDGE_TEST_DEVICE", "cpu")
# The attention backends this machine has (`--attention`): the CPU kernel where a C compiler can build it.
HAS_COMPILER = shutil.which(os.environ.get("CC") or "cc") is not None
ATTENTIONS = ("reference", "kernel", "flex") if HAS_COMPILER and DEVICE == "cpu" else ("reference", "flex")
# The backend the suite's hubs and runners attend through (every pass, whatever `auto` would choose):
# SPECEDGE_TEST_ATTENTION, or the CPU kernel where it builds. The runner's equality tests
# (test_runner.py) and the compiled ones (test_compiled_passes.py) run through each backend.
ATTENTION = os.environ.get("SPECEDGE_TEST_ATTENTION") or ("kernel" if "kernel" in ATTENTIONS else "reference")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def specedge_home(tmp_path, monkeypatch):
    """Keep every test's config, data and models in its own folder, and no hub from the environment."""
    monkeypatch.setenv("SPECEDGE_HOME", str(tmp_path / "specedge-home"))
    monkeypatch.delenv("SPECEDGE_HUB", raising=False)
    monkeypatch.delenv("SPECEDGE_TOKEN", raising=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir) -> Path:
    return build_tokenizer(tiny_dir / "tokenizer")


@pytest.fixture(scope="session")
def tiny(tiny_dir, tiny_tokenizer) -> TinyModel:
    """The tiny target; its GGUF f32 copy is the perfect draft, its q8_0 copy an imperfect one."""
    return build_tiny_model(tiny_dir / "target", seed=0, tokenizer_dir=tiny_tokenizer)


@pytest.fixture(scope="session")
def unrelated(tiny_dir, tiny_tokenizer) -> TinyModel:
    """Another random model with the same tokenizer: near-zero acceptance."""
    return build_tiny_model(tiny_dir / "unrelated", seed=1, tokenizer_dir=tiny_tokenizer)


class RunningHub:
    """`python -m hub_server serve` as a child process on a loopback port; without tokens
    (`--no-auth`) unless `no_auth=False`, then with the accounts in `--data-dir` of `extra`."""

    def __init__(
        self,
        model: Path,
        cache_dir: Path,
        *extra: str,
        no_auth: bool = True,
        env: dict | None = None,
        port: int | None = None,
        ready_timeout_s: float = 120,
    ):
        port = port or free_port()
        self.log = cache_dir / f"hub-{port}.log"
        args = ["--model", str(model), "--cache-dir", str(cache_dir), *(["--no-auth"] if no_auth else []), *extra]
        self._hub = HubProcess(args, log_path=self.log, env=env, port=port, cwd=REPO)
        self.url, self.process = self._hub.url, self._hub.process
        try:
            self._hub.wait_ready(timeout_s=ready_timeout_s)
        except HubStartError as exc:
            self.stop()  # a hub that failed to start must not outlive the test run
            raise RuntimeError(f"{exc}\n{self.log.read_text()}") from exc
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._hub.stop(timeout_s=30)


def hub_of_commit(commit: str, tiny: TinyModel, folder: Path) -> Iterator[HubProcess]:
    """A hub as it was at `commit`, run from that commit's files unpacked into `folder` (a
    module's fixture: the older protocol versions a client must still talk to)."""
    if subprocess.run(["git", "cat-file", "-e", commit], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip(f"needs the repository's history (commit {commit})")
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder / "")], input=archive, check=True)
    args = ["--model", str(tiny.hf_dir), "--cache-dir", str(folder / "cache"), "--no-auth", "--max-draft-tokens", "16"]
    hub = HubProcess(args, log_path=folder / "hub.log", cwd=folder)
    try:
        hub.wait_ready(timeout_s=180)
        yield hub
    finally:
        hub.stop(timeout_s=30)


@pytest.fixture(scope="session")
def hub(tiny, tmp_path_factory):
    """A real hub serving the tiny target (its Hugging Face folder) on loopback."""
    # oneDNN's products where torch has them, not MKL's: the suite's equality tests then cover the
    # path a CPU hub takes where oneDNN is faster (`--cpu-matmul auto`), against the target alone on MKL.
    products = "onednn" if onednn_available() else "mkl"
    running = RunningHub(
        tiny.hf_dir,
        tmp_path_factory.mktemp("hub-cache"),
        *("--max-draft-tokens", "16", "--cpu-matmul", products, "--attention", ATTENTION),
    )
    yield running
    running.stop()


def hub_admin(data_dir: Path, *args: str):
    """Run an account command (`hub_server users|tokens ...`) as an operator would; its JSON answer."""
    result = subprocess.run(
        [sys.executable, "-m", "hub_server", *args, "--data-dir", str(data_dir), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


class AuthHub(RunningHub):
    """A hub that needs tokens, with users in its own accounts database; `tokens[name]` is theirs.
    Names in `operators` are added with `--role operator` (they may read /metrics)."""

    def __init__(
        self,
        model: Path,
        workdir: Path,
        users: tuple[str, ...],
        *extra: str,
        operators: tuple[str, ...] = (),
        ready_timeout_s: float = 120,
    ):
        self.data_dir = workdir / "data"
        self.tokens = {}
        for name in users + operators:
            role = "operator" if name in operators else "user"
            hub_admin(self.data_dir, "users", "add", name, "--role", role)
            self.tokens[name] = hub_admin(self.data_dir, "tokens", "create", "--user", name)["token"]
        super().__init__(
            model,
            workdir / "cache",
            "--data-dir",
            str(self.data_dir),
            *extra,
            no_auth=False,
            ready_timeout_s=ready_timeout_s,
        )

    def client(self, user: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)


@pytest.fixture(scope="session")
def auth_hub(tiny, tmp_path_factory):
    """A real hub with accounts (users ada and bob, the operator ops), JSON logs, no per-user limits."""
    running = AuthHub(
        tiny.hf_dir,
        tmp_path_factory.mktemp("auth-hub"),
        ("ada", "bob"),
        "--max-draft-tokens",
        "16",
        "--log-format",
        "json",
        operators=("ops",),
    )
    yield running
    running.stop()


class TargetAlone:
    """The target model decoding by itself: full recomputation, no cache, no draft."""

    def __init__(self, model):
        self.model = model

    @torch.inference_mode()
    def next_logits(self, context: list[int]) -> torch.Tensor:
        return self.model(input_ids=torch.tensor([context], device=self.model.device)).logits[0, -1].float()

    def decode(
        self,
        context: list[int],
        max_tokens: int,
        stop_ids: frozenset[int] = frozenset(),
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[int]:
        context = list(context)
        generated: list[int] = []
        while len(generated) < max_tokens:
            logits = self.next_logits(context)
            if temperature == 0.0:
                token = int(logits.argmax())
            else:
                token = sample_row(logits, temperature, position_uniform(seed, len(context)))
            context.append(token)
            generated.append(token)
            if token in stop_ids:
                break
        return generated


def plain_target(folder: Path, device: str = "cpu") -> TargetAlone:
    """The target in the folder as transformers loads it by itself (float32, its own attention and
    matrix products): what the hub's replies must equal."""
    from transformers import AutoModelForCausalLM

    return TargetAlone(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval())


@pytest.fixture(scope="session")
def target_alone(tiny) -> TargetAlone:
    return plain_target(tiny.hf_dir)


def run_specedge(
    *args: str, env_extra: dict | None = None, timeout: float = 300, input_text: str | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "specedge_cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input="" if input_text is None else input_text,  # never the test runner's own stdin
    )

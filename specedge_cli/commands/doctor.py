"""`specedge doctor`: checks what a chat needs and says what to fix."""

from __future__ import annotations

import email.utils
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import typer
from rich.console import Console

from specedge_cli import paths, settings
from specedge_cli.drafting.vocabulary import Vocabulary
from specedge_cli.errors import HubBusy, HubError, SpecEdgeError
from specedge_cli.models import PRESETS, resolve_model
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient
from specedge_cli.settings import chat_settings

out = Console(highlight=False, soft_wrap=True)
CLOCK_SKEW_LIMIT_S = 30.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def doctor() -> None:
    """Check the draft backend and model, the hub and its target, your login, the vocabulary, round trip and clock."""
    model, draft = model_check()
    checks = [backend_check(), model, *hub_checks(draft)]
    for check in checks:
        mark = "[green]ok[/green]  " if check.ok else "[red]fail[/red]"
        fix = f" [yellow]→ {check.fix}[/yellow]" if check.fix else ""
        out.print(f"{mark} {check.name:<8} {check.detail}{fix}")
    if not all(check.ok for check in checks):
        raise typer.Exit(1)


def backend_check() -> Check:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace")
    gpu = next((name for name in ("CUDA", "Metal", "Vulkan", "ROCm") if name.upper() in info.upper()), None)
    if gpu:
        return Check("backend", True, f"llama.cpp {llama_cpp.__version__} with {gpu}")
    fix = ""
    if shutil.which("nvidia-smi"):
        fix = (
            'this machine has an NVIDIA GPU: CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall '
            "--no-cache-dir llama-cpp-python"
        )
    return Check("backend", True, f"llama.cpp {llama_cpp.__version__} on the CPU", fix)


def model_check() -> tuple[Check, Path | None]:
    """The draft model's check, and its file when there is one."""
    try:
        name = chat_settings().model
        resolved = resolve_model(name, paths.models_dir(), offline=True)
    except SpecEdgeError as exc:
        return Check("model", False, exc.message), None
    return Check("model", True, f"{name}: {resolved.path}"), resolved.path


def hub_checks(draft: Path | None) -> list[Check]:
    address = settings.hub_address(None)
    if not address.url:
        return [
            Check(
                "hub",
                True,
                "none configured: `specedge chat` starts an embedded hub",
                "run `specedge login` or set SPECEDGE_HUB to use a shared one",
            )
        ]
    try:
        with HubClient(address.url, address.token, timeout_s=10, insecure=address.insecure) as client:
            round_trips, skew = _probe(address.url)
            login = _login_check(client, address)
            info = _hub_info(client) if login.ok else None
            return [
                Check("hub", True, f"{address.url} answers" + (f", target {info.model}" if info else "")),
                login,
                *([_vocab_check(draft, info)] if info and draft else []),
                Check(
                    "rtt", True, f"{statistics.median(round_trips):.0f} ms to the hub (median of {len(round_trips)})"
                ),
                _clock_check(skew),
            ]
    except (HubError, SpecEdgeError) as exc:
        return [Check("hub", False, exc.message)]


def _probe(url: str, times: int = 5) -> tuple[list[float], float | None]:
    """Round trips of GET /health (ms), and how far our clock is from the hub's (s)."""
    round_trips, skew = [], None
    for _ in range(times):
        sent = time.perf_counter()
        try:
            response = httpx.get(f"{url.rstrip('/')}/health", timeout=10)
        except httpx.TransportError as exc:
            raise HubError(
                f"cannot reach the hub at {url} ({exc.__class__.__name__}); "
                f"check the URL and that `curl {url}/health` answers"
            ) from exc
        round_trips.append((time.perf_counter() - sent) * 1000)
        if "date" in response.headers:
            skew = time.time() - email.utils.parsedate_to_datetime(response.headers["date"]).timestamp()
    return round_trips, skew


def _login_check(client: HubClient, address: settings.HubAddress) -> Check:
    try:
        who = client.whoami()
    except HubError as exc:
        fix = (
            "fix or unset SPECEDGE_TOKEN (it overrides your login)"
            if address.token_from_env
            else "run `specedge login`"
        )
        return Check("login", False, exc.message, fix)
    return Check("login", True, f"signed in as {who.user}" if address.token else f"the hub needs no token ({who.user})")


def _hub_info(client: HubClient) -> wire.HubInfo | None:
    try:
        return client.info()
    except HubBusy:  # still loading its target: nothing to compare with yet
        return None


def _squash(name: str) -> str:
    """gemma-3-270m and gemma3 alike: lower case without separators."""
    return "".join(c for c in name.lower() if c not in "-_ ")


def _vocab_check(draft: Path, info: wire.HubInfo) -> Check:
    """The hub refuses a session whose draft vocabulary is not its target's: say so before a chat does."""
    fingerprint = Vocabulary.load(draft).fingerprint()
    if fingerprint == info.vocab_fingerprint:
        return Check("vocab", True, f"{draft.name} shares the vocabulary of the target {info.model}")
    target = _squash(info.model)
    family = [p.name for p in PRESETS.values() if _squash(p.target_family) in target]
    fix = f"use a draft of the target's family: --model {family[0]}" if family else "use a draft made for that target"
    return Check("vocab", False, f"{draft.name} has another vocabulary than the hub's target {info.model}", fix)


def _clock_check(skew: float | None) -> Check:
    if skew is None:
        return Check("clock", True, "the hub sent no Date header to compare with")
    if abs(skew) > CLOCK_SKEW_LIMIT_S:
        return Check("clock", False, f"{skew:+.0f} s off the hub's clock", "set your clock (e.g. enable NTP)")
    return Check("clock", True, f"within {max(abs(skew), 1):.0f} s of the hub's")

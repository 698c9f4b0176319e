"""`specedge doctor`: checks what a chat needs and says what to fix."""

from __future__ import annotations

import email.utils
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from specedge_cli import paths, settings
from specedge_cli.draft_choice import (
    fingerprint_of,
    fitting_model,
    named_model,
    nothing_fits,
    pull_command,
    suggested_preset,
)
from specedge_cli.errors import HubError, ModelFileError, SpecEdgeError
from specedge_cli.models import (
    DEFAULT_MODEL,
    PRESETS,
    in_installed_package,
    preset_path,
    registered_models,
    resolve_model,
)
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient
from specedge_cli.waiting import wait_for_remote

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
CLOCK_SKEW_LIMIT_S = 30.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def doctor(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Draft model to check: a .gguf path or a preset name (default: your setting, else one that fits the hub).",
        ),
    ] = None,
) -> None:
    """Check the draft backend and model, the hub and its target, your login, the vocabulary, round trip and clock."""
    hub, info = hub_checks()
    draft, name, fingerprint = model_check(named_model(model), info)
    vocab = [_vocab_check(name, fingerprint, info)] if info and fingerprint else []
    checks = [backend_check(), draft, *hub, *vocab]
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


def model_check(named: str | None, info: wire.HubInfo | None) -> tuple[Check, str, str | None]:
    """The draft model's check, its name, and its vocabulary fingerprint when it can be had.

    Without a model named, the one a chat would take: the default, or with a hub one that fits it."""
    fits = fitting_model(info) if info and not named else None
    name = named or fits or DEFAULT_MODEL
    if info and not named and fits is None:
        return Check("model", False, nothing_fits(info, settings.hub_address(None).url or "")), name, None
    try:
        where, path = _locate(name)
    except SpecEdgeError as exc:
        return Check("model", False, exc.message), name, None
    chosen = "" if named or name == DEFAULT_MODEL else " (fits the hub's target)"
    return Check("model", True, f"{name}{chosen}: {where}"), name, fingerprint_of(name, path, paths.models_dir())


def _locate(name: str) -> tuple[str, Path]:
    """Where the model is, without fetching or assembling it: doctor only looks."""
    models_dir = paths.models_dir()
    preset = PRESETS.get(name)
    if preset is None or name in registered_models(models_dir) or preset_path(preset, models_dir).is_file():
        resolved = resolve_model(name, models_dir, offline=True)
        return str(resolved.path), resolved.path
    target = preset_path(preset, models_dir)
    if in_installed_package(preset):
        return f"in the installed package {preset.pypi_package} (written to {target} by the first chat)", target
    raise ModelFileError(f"{name} is not downloaded; run `specedge models pull {name}`")


def hub_checks() -> tuple[list[Check], wire.HubInfo | None]:
    """The hub's checks, and its /v1/info when it answered one."""
    address = settings.hub_address(None)
    if not address.url:
        return [
            Check(
                "hub",
                True,
                "none configured: `specedge chat` starts an embedded hub",
                "run `specedge login` or set SPECEDGE_HUB to use a shared one",
            )
        ], None
    try:
        with HubClient(address.url, address.token, timeout_s=10, insecure=address.insecure) as client:
            wait_for_remote(client, err)  # a hub still starting or loading is waited for, as a chat would
            round_trips, skew = _probe(address.url)
            login = _login_check(client, address)
            info = client.info() if login.ok else None
            return [
                Check("hub", True, f"{address.url} answers" + (f", target {info.model}" if info else "")),
                login,
                Check(
                    "rtt", True, f"{statistics.median(round_trips):.0f} ms to the hub (median of {len(round_trips)})"
                ),
                _clock_check(skew),
            ], info
    except (HubError, SpecEdgeError) as exc:
        return [Check("hub", False, exc.message)], None


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


def _vocab_check(name: str, fingerprint: str, info: wire.HubInfo) -> Check:
    """The hub refuses a session whose draft vocabulary is not its target's: say so before a chat does."""
    if fingerprint == info.vocab_fingerprint:
        return Check("vocab", True, f"{name} shares the vocabulary of the target {info.model}")
    return Check("vocab", False, f"{name} has another vocabulary than the hub's target {info.model}", _draft_fix(info))


def _draft_fix(info: wire.HubInfo) -> str:
    """The draft to use instead: one here that fits, the one the hub names, or a preset for its target."""
    fitting = fitting_model(info)
    if fitting:
        return f"{fitting} fits it: pass --model {fitting}, or leave the model unset and chat picks it"
    if info.draft_hint:
        return f"fetch the draft the hub names: `{pull_command(info.draft_hint)}`"
    preset = suggested_preset(info)
    if preset:
        return f"fetch a draft made for it: `specedge models pull {preset}`"
    return "register a draft made for that target: `specedge models pull PATH.gguf --name NAME`"


def _clock_check(skew: float | None) -> Check:
    if skew is None:
        return Check("clock", True, "the hub sent no Date header to compare with")
    if abs(skew) > CLOCK_SKEW_LIMIT_S:
        return Check("clock", False, f"{skew:+.0f} s off the hub's clock", "set your clock (e.g. enable NTP)")
    return Check("clock", True, f"within {max(abs(skew), 1):.0f} s of the hub's")

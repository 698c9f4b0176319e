"""`specedge doctor`: checks what a chat needs and says what to fix."""

from __future__ import annotations

import email.utils
import shutil
import statistics
import time
from dataclasses import dataclass

import httpx
import typer
from rich.console import Console

from specedge_cli import config
from specedge_cli.errors import HubError, SpecEdgeError
from specedge_cli.models import resolve_model
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
    """Check the draft backend, the draft model, the hub, your login, round-trip time and clock."""
    checks = [backend_check(), model_check(), *hub_checks()]
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


def model_check() -> Check:
    name = chat_settings().model
    try:
        resolved = resolve_model(name, config.models_dir(), offline=True)
    except SpecEdgeError as exc:
        return Check("model", False, f"{name}: {exc.message}")
    return Check("model", True, f"{name}: {resolved.path}")


def hub_checks() -> list[Check]:
    address = config.hub_address(None)
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
            return [
                Check("hub", True, f"{address.url} answers"),
                _login_check(client, address.token),
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


def _login_check(client: HubClient, token: str | None) -> Check:
    try:
        who = client.whoami()
    except HubError as exc:
        return Check("login", False, exc.message, "run `specedge login`")
    return Check("login", True, f"signed in as {who.user}" if token else f"the hub needs no token ({who.user})")


def _clock_check(skew: float | None) -> Check:
    if skew is None:
        return Check("clock", True, "the hub sent no Date header to compare with")
    if abs(skew) > CLOCK_SKEW_LIMIT_S:
        return Check("clock", False, f"{skew:+.0f} s off the hub's clock", "set your clock (e.g. enable NTP)")
    return Check("clock", True, f"within {max(abs(skew), 1):.0f} s of the hub's")

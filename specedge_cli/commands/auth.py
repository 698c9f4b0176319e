"""`specedge login`, `specedge whoami`, `specedge logout`: one login, then every command just works.

The hub address and token are stored in the config file (0600 in a 0700 folder);
SPECEDGE_HUB and SPECEDGE_TOKEN override them. `logout` forgets both, so chat is local again
(an embedded hub) until the next login.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from specedge_cli import paths, settings
from specedge_cli.draft_choice import fitting_model, hint_name, nothing_fits, pull_command
from specedge_cli.errors import HubBusy, NotLoggedIn
from specedge_cli.models import DEFAULT_MODEL, fetch_hinted_draft
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient
from specedge_cli.waiting import say_starting, start_window_s, wait_for_remote

err = Console(stderr=True, highlight=False, soft_wrap=True)

HubOption = Annotated[str | None, typer.Option("--hub", help="Hub URL; default: SPECEDGE_HUB or the stored login.")]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="Allow plain http to another machine (the token crosses in clear).")
]


def login(
    hub: HubOption = None,
    token: Annotated[str | None, typer.Option(help="API token; asked for with hidden input when not given.")] = None,
    insecure: InsecureOption = False,
) -> None:
    """Check an API token against a hub and store both for later commands; show the draft the hub names."""
    url = settings.hub_address(hub).url
    if not url:
        raise NotLoggedIn("which hub? run `specedge login --hub https://your-hub.example`")
    with HubClient(url, insecure=insecure) as probe:  # a hub still starting is waited for before the token is asked
        probe.health_once_up(lambda: say_starting(probe, err), start_window_s())
    token = token or typer.prompt(f"API token for {url}", hide_input=True).strip()
    with HubClient(url, token, insecure=insecure) as client:
        who = _whoami_once_loaded(client, lambda: _store_login(url, token, insecure))
        info = client.info()
    path = _store_login(url, token, insecure)
    typer.echo(f"Logged in to {url} as {who.user}. Token stored in {path}")
    _name_the_draft(info, url)


def _store_login(url: str, token: str, insecure: bool) -> Path:
    return settings.update_config_file(
        {"hub": url, "token": token, "insecure": True} if insecure else {"hub": url, "token": token},
        remove=() if insecure else ("insecure",),
    )


def _whoami_once_loaded(client: HubClient, store: Callable[[], Path]) -> wire.WhoAmIResponse:
    """Who the token belongs to. A hub loading its target answers 503 to a token it accepted (a
    refused one gets 401 at once): the token is stored first, so a wait cut short costs no new paste."""
    try:
        return client.whoami()
    except HubBusy as exc:
        if exc.code != "not_ready":
            raise
    store()
    wait_for_remote(client, err)
    return client.whoami()


def _name_the_draft(info: wire.HubInfo, url: str) -> None:
    """Which draft model fits the hub: one here, or the one it names (offered for download), or what to pull."""
    fits = fitting_model(info)
    if fits:
        chosen = "" if fits == DEFAULT_MODEL else "; chat and serve use it when no --model is given"
        typer.echo(f"Draft model: {fits} shares the vocabulary of the target {info.model}{chosen}.")
        return
    if info.draft_hint is None:
        typer.echo(f"Note: {nothing_fits(info, url)}.")
        return
    name, command = hint_name(info.draft_hint), pull_command(info.draft_hint)
    typer.echo(f"The hub names the draft model for its target {info.model}: {name}.")
    if not sys.stdin.isatty():
        typer.echo(f"Fetch it with: {command}")
        return
    if typer.confirm("Fetch it now?", default=True):
        typer.echo(f"{name} is ready: {fetch_hinted_draft(info.draft_hint, paths.models_dir())}")
    else:
        typer.echo(f"Fetch it later with: {command}")


def whoami(
    hub: HubOption = None,
    insecure: InsecureOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show who the hub thinks you are, its target model, and your limits there."""
    address = settings.hub_address(hub)
    if not address.url:
        raise NotLoggedIn("no hub configured; run `specedge login --hub URL`")
    with HubClient(address.url, address.token, insecure=insecure or address.insecure) as client:
        who = client.whoami()
        target = target_model(client)
    if as_json:
        typer.echo(json.dumps({"hub": address.url, "target": target, **who.to_json()}))
    else:
        typer.echo(f"user:     {who.user}\nhub:      {address.url}\ntarget:   {target}\n{_describe_limits(who)}")


def target_model(client: HubClient) -> str:
    """The model the hub verifies with, or what it says while that model is still loading."""
    try:
        return client.info().model
    except HubBusy:
        return "(still loading)"


def _describe_limits(who: wire.WhoAmIResponse) -> str:
    sessions = who.limits.max_sessions_per_user or "no limit"
    rate = f"{who.limits.tokens_per_minute} tokens/min" if who.limits.tokens_per_minute else "no limit"
    left = "" if who.tokens_left is None else f" ({who.tokens_left} left now)"
    return f"sessions: {who.sessions} open, limit {sessions}\nrate:     {rate}{left}"


def logout() -> None:
    """Forget the stored hub and token: chat is local again (an embedded hub) until the next login."""
    stored = settings.read_config_file()
    if any(key in stored for key in settings.LOGIN_KEYS):
        path = settings.update_config_file({}, remove=settings.LOGIN_KEYS)
        typer.echo(f"Logged out of {stored.get('hub', 'the hub')}: removed the hub and token from {path}")
    else:
        typer.echo("Not logged in: nothing to do.")
    for variable in ("SPECEDGE_TOKEN", "SPECEDGE_HUB"):
        if os.environ.get(variable):
            typer.echo(
                f"Warning: {variable} is still set in your environment and will still be used; unset it.", err=True
            )

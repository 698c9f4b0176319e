"""`specedge login`, `specedge whoami`, `specedge logout`: one login, then every command just works.

The hub address and token are stored in the config file (0600 in a 0700 folder);
SPECEDGE_HUB and SPECEDGE_TOKEN override them. `logout` forgets both, so chat is local again
(an embedded hub) until the next login.
"""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from specedge_cli import settings
from specedge_cli.errors import HubBusy, NotLoggedIn
from specedge_cli.remote import protocol as wire
from specedge_cli.remote.client import HubClient

HubOption = Annotated[str | None, typer.Option("--hub", help="Hub URL; default: SPECEDGE_HUB or the stored login.")]
InsecureOption = Annotated[
    bool, typer.Option("--insecure", help="Allow plain http to another machine (the token crosses in clear).")
]


def login(
    hub: HubOption = None,
    token: Annotated[str | None, typer.Option(help="API token; asked for with hidden input when not given.")] = None,
    insecure: InsecureOption = False,
) -> None:
    """Check an API token against a hub and store both for later commands."""
    url = settings.hub_address(hub).url
    if not url:
        raise NotLoggedIn("which hub? run `specedge login --hub https://your-hub.example`")
    token = token or typer.prompt(f"API token for {url}", hide_input=True).strip()
    with HubClient(url, token, insecure=insecure) as client:
        who = client.whoami()
    path = settings.update_config_file(
        {"hub": url, "token": token, "insecure": True} if insecure else {"hub": url, "token": token},
        remove=() if insecure else ("insecure",),
    )
    typer.echo(f"Logged in to {url} as {who.user}. Token stored in {path}")


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

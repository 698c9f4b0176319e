"""`specedge login`, `specedge whoami`, `specedge logout`: one login, then every command just works.

The hub address and token are stored in the config file (0600 in a 0700 folder);
SPECEDGE_HUB and SPECEDGE_TOKEN override them.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from specedge_cli import config
from specedge_cli.errors import NotLoggedIn
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
    url = config.hub_address(hub).url
    if not url:
        raise NotLoggedIn("which hub? run `specedge login --hub https://your-hub.example`")
    token = token or typer.prompt(f"API token for {url}", hide_input=True).strip()
    with HubClient(url, token, insecure=insecure) as client:
        who = client.whoami()
    path = config.update_config_file(
        {"hub": url, "token": token, "insecure": True} if insecure else {"hub": url, "token": token},
        remove=() if insecure else ("insecure",),
    )
    typer.echo(f"Logged in to {url} as {who.user}. Token stored in {path}")


def whoami(
    hub: HubOption = None,
    insecure: InsecureOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Show who the hub thinks you are, and your limits there."""
    address = config.hub_address(hub)
    if not address.url:
        raise NotLoggedIn("no hub configured; run `specedge login --hub URL`")
    with HubClient(address.url, address.token, insecure=insecure or address.insecure) as client:
        who = client.whoami()
    if as_json:
        typer.echo(json.dumps({"hub": address.url, **who.to_json()}))
    else:
        typer.echo(f"user: {who.user}\nhub:  {address.url}\n{_describe_limits(who)}")


def _describe_limits(who: wire.WhoAmIResponse) -> str:
    sessions = who.limits.max_sessions_per_user or "no limit"
    rate = f"{who.limits.tokens_per_minute} tokens/min" if who.limits.tokens_per_minute else "no limit"
    left = "" if who.tokens_left is None else f" ({who.tokens_left} left now)"
    return f"sessions: {who.sessions} open, limit {sessions}\nrate:     {rate}{left}"


def logout() -> None:
    """Forget the stored token (the hub address stays, for the next login)."""
    stored = config.read_config_file()
    if "token" in stored:
        path = config.update_config_file({}, remove=("token", "insecure"))
        typer.echo(f"Logged out of {stored.get('hub', 'the hub')}: removed the token from {path}")
    else:
        typer.echo("No stored token: nothing to do.")
    if config.environment_token():
        typer.echo(
            "Warning: SPECEDGE_TOKEN is still set in your environment and will still be used; unset it.", err=True
        )

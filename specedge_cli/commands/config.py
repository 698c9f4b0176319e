"""`specedge config`: the settings, where each comes from, and setting them in the config file."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from specedge_cli import config, settings

app = typer.Typer(help="Settings: show, set KEY VALUE, unset KEY, path.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)


@app.command()
def show() -> None:
    """Every setting, its value and where it comes from (env, config or default)."""
    stored = config.read_config_file()
    hub = config.hub_address(None)
    out.print(f"{'hub':<12} {hub.url or '(embedded hub)'}", markup=False)
    for key in settings.KEYS:
        value, source = settings.lookup(key, stored=stored)
        shown = "auto" if value is None else repr(value)  # None: chosen when a chat starts
        out.print(f"{settings.key_name(key):<12} {shown:<30} [dim]{source}[/dim]")
    out.print(f"{'login':<12} {'token stored' if stored.get('token') else 'not logged in'}", markup=False)


@app.command("set")
def set_value(
    key: Annotated[str, typer.Argument(help="A setting, e.g. max-tokens.")],
    value: Annotated[str, typer.Argument(help="Its new value.")],
) -> None:
    """Keep a setting in the config file (flags and SPECEDGE_* variables still win)."""
    field = settings.field_of(key)
    parsed = settings.parse(field, value, key)
    stored = "auto" if parsed is None else parsed
    config.update_config_file({settings.key_name(field): stored})
    out.print(f"{settings.key_name(field)} = {stored!r} in {config.config_file()}", markup=False)


@app.command()
def unset(key: Annotated[str, typer.Argument(help="A setting to forget.")]) -> None:
    """Remove a setting from the config file (back to its default)."""
    field = settings.field_of(key)
    config.update_config_file({}, remove=(settings.key_name(field),))
    out.print(f"{settings.key_name(field)} is back to its default", markup=False)


@app.command()
def path() -> None:
    """Where the config file is."""
    print(config.config_file())

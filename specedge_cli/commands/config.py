"""`specedge config`: the settings, where each comes from, and setting them in the config file."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from specedge_cli import paths, settings
from specedge_cli.errors import SettingError
from specedge_cli.models import known_model

app = typer.Typer(help="Settings: show, set KEY VALUE, unset KEY, path.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)

# The stored login is no chat setting, but users reach for `config` to change it too.
HUB_KEY = "hub"


@app.command()
def show() -> None:
    """Every setting, its value and where it comes from (env, config or default)."""
    stored = settings.read_config_file()
    hub = settings.hub_address(None)
    out.print(f"{'hub':<12} {hub.url or '(embedded hub)'}", markup=False)
    for key in settings.KEYS:
        value, source = settings.lookup(key, stored=stored)
        shown = "auto" if value is None else repr(value)  # None: chosen when a chat starts
        out.print(f"{settings.key_name(key):<12} {shown:<30} [dim]{source}[/dim]")
    out.print(f"{'login':<12} {'token stored' if stored.get('token') else 'not logged in'}", markup=False)


@app.command("set")
def set_value(
    key: Annotated[str, typer.Argument(help="A setting, e.g. max-tokens, or hub.")],
    value: Annotated[str, typer.Argument(help="Its new value.")],
) -> None:
    """Keep a setting in the config file (flags and SPECEDGE_* variables still win)."""
    if key == HUB_KEY:
        _set_hub(value)
        return
    field = settings.field_of(key)
    parsed = settings.parse(field, value, key)
    if field == "model" and not known_model(value, paths.models_dir()):
        raise SettingError(
            f"unknown model {value!r}: give a preset (`specedge models list`), a name registered with "
            "`specedge models pull FILE.gguf --name NAME`, or the path of an existing .gguf file"
        )
    stored = "auto" if parsed is None else parsed
    settings.update_config_file({settings.key_name(field): stored})
    out.print(f"{settings.key_name(field)} = {stored!r} in {paths.config_file()}", markup=False)


def _set_hub(url: str) -> None:
    """A hub without a token (one that needs none); a token stored for another hub is dropped."""
    url = settings.normalize_hub_url(url)
    stored = settings.read_config_file()
    same = settings.normalize_hub_url(str(stored.get(HUB_KEY, ""))) == url
    settings.update_config_file({HUB_KEY: url}, remove=() if same else ("token", "insecure"))
    out.print(f"hub = {url!r} in {paths.config_file()} (`specedge login` stores a token for it)", markup=False)


@app.command()
def unset(key: Annotated[str, typer.Argument(help="A setting to forget, or hub (the stored login).")]) -> None:
    """Remove a setting from the config file (back to its default)."""
    if key == HUB_KEY:
        settings.update_config_file({}, remove=settings.LOGIN_KEYS)
        out.print("hub and its token forgotten: chat starts an embedded hub again", markup=False)
        return
    field = settings.field_of(key)
    settings.update_config_file({}, remove=(settings.key_name(field),))
    out.print(f"{settings.key_name(field)} is back to its default", markup=False)


@app.command()
def path() -> None:
    """Where the config file is."""
    print(paths.config_file())

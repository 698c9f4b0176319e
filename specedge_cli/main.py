"""`specedge`: the command root. It wires the command modules and turns known errors into one line."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from specedge_cli.commands import config, logs, models
from specedge_cli.commands.auth import login, logout, whoami
from specedge_cli.commands.bench import bench
from specedge_cli.commands.chat import chat
from specedge_cli.commands.doctor import doctor
from specedge_cli.commands.serve import serve
from specedge_cli.errors import SpecEdgeError, TokenRejected
from specedge_cli.settings import environment_token

app = typer.Typer(
    help="Chat with a large model that lives on a SpecEdge hub, drafting on your own GPU.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
app.command()(chat)
app.command()(serve)
app.command()(bench)
app.command()(login)
app.command()(whoami)
app.command()(logout)
app.add_typer(logs.app, name="logs")
app.add_typer(models.app, name="models")
app.add_typer(config.app, name="config")
app.command()(doctor)


def _print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"specedge {version()}")
        raise typer.Exit()


def version() -> str:
    """The installed package's version (the source tree's when it is not installed)."""
    try:
        return metadata.version("specedge")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """SpecEdge: chat with a hub-hosted model, drafting locally. SPECEDGE_DEBUG=1 shows tracebacks."""


def run() -> None:
    """Entry point: run the app; a known failure prints one line, a traceback only with SPECEDGE_DEBUG=1."""
    try:
        app(prog_name="specedge")
    except SpecEdgeError as exc:
        if os.environ.get("SPECEDGE_DEBUG"):
            raise
        # The message is plain text: escaped, so `specedge[hub]` or `[0, 512)` is not read as markup.
        Console(stderr=True).print(f"[red]Error:[/red] {escape(_message(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


def _message(exc: SpecEdgeError) -> str:
    """The error's line; a refused token that came from SPECEDGE_TOKEN names the variable, since
    `specedge login` cannot help while the variable overrides the stored token."""
    if isinstance(exc, TokenRejected) and environment_token():
        return (
            "the hub did not accept the token in SPECEDGE_TOKEN (it overrides your login); "
            "fix the variable, or unset it to use the token `specedge login` stored"
        )
    return exc.message


if __name__ == "__main__":
    run()

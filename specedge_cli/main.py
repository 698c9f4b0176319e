"""`specedge`: the command root. It wires the command modules and turns known errors into one line."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from specedge_cli.commands import config, logs, models
from specedge_cli.commands.auth import login, logout, whoami
from specedge_cli.commands.bench import bench
from specedge_cli.commands.chat import chat
from specedge_cli.commands.doctor import doctor
from specedge_cli.commands.serve import serve
from specedge_cli.errors import SpecEdgeError

app = typer.Typer(
    help="Chat with a large model that lives on a SpecEdge hub, drafting on your own GPU.",
    no_args_is_help=True,
    add_completion=False,
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


@app.callback()
def main() -> None:
    """SpecEdge: chat with a hub-hosted model, drafting locally. SPECEDGE_DEBUG=1 shows tracebacks."""


def run() -> None:
    """Entry point: run the app; a known failure prints one line, a traceback only with SPECEDGE_DEBUG=1."""
    try:
        app(prog_name="specedge")
    except SpecEdgeError as exc:
        if os.environ.get("SPECEDGE_DEBUG"):
            raise
        Console(stderr=True).print(f"[red]Error:[/red] {exc.message}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    run()

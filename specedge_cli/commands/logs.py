"""`specedge logs`: the saved conversations (list, show, where they are, switch keeping them off/on)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.console import Console

from specedge_cli import paths, settings
from specedge_cli.errors import ConversationNotFound
from specedge_cli.history import History, history_path

app = typer.Typer(help="Saved conversations: list, show, path, off, on.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)


def _history() -> History:
    return History(history_path(paths.data_dir()))


@app.command("list")
def list_conversations(
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="How many, newest first.")] = 20,
) -> None:
    """One line per conversation: id, date, model and the start of its first prompt."""
    for summary in _history().summaries(count):
        model = summary.model.rsplit("/", 1)[-1]
        first = " ".join(summary.first_prompt.split())
        first = first if len(first) <= 60 else first[:59] + "…"
        out.print(f"{summary.id:>4}  {summary.created_at[:16].replace('T', ' ')}  {model}  {first}", markup=False)


@app.command()
def show(
    conversation_id: Annotated[int | None, typer.Argument(metavar="ID", help="Default: the last one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Turns with their token ids, as JSON.")] = False,
) -> None:
    """Print one conversation."""
    history = _history()
    conversation_id = conversation_id or history.last_id()
    if conversation_id is None:
        raise ConversationNotFound("no saved conversations yet; run `specedge chat` first")
    saved = history.load(conversation_id)
    turns = history.turns(conversation_id)
    if as_json:
        print(
            json.dumps(
                {
                    "id": saved.id,
                    "model": saved.model,
                    "hub": saved.hub,
                    "system": saved.system,
                    "turns": [asdict(turn) for turn in turns],
                }
            )
        )
        return
    out.print(f"[dim]conversation {saved.id} · {saved.model} · {saved.hub}[/dim]")
    for turn in turns:
        out.print(f">>> {turn.prompt}", markup=False)
        note = " [dim](stopped)[/dim]" if turn.interrupted else ""
        out.print(
            turn.reply if turn.sent else "[dim](no reply: the chat ended first)[/dim]", markup=not turn.sent, end=""
        )
        out.print(note)


@app.command()
def path() -> None:
    """Where the conversation database is."""
    print(history_path(paths.data_dir()))


@app.command()
def off() -> None:
    """Stop saving new conversations."""
    settings.update_config_file({"logs": False})
    out.print("Conversations will not be saved; `specedge logs on` turns it back on.")


@app.command()
def on() -> None:
    """Save conversations (the default)."""
    settings.update_config_file({"logs": True})
    out.print(f"Conversations are saved in {history_path(paths.data_dir())}.")

"""`hub_server users ...` and `hub_server tokens ...`: the operator's account commands.

They write the same SQLite database a running hub reads (WAL mode), so a new token works and a
revoked one stops working on the next request, without a restart.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from hub_server.accounts import Accounts
from hub_server.config import accounts_path, default_data_dir
from hub_server.errors import AccountError

users_app = typer.Typer(help="Accounts that may use this hub.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens: shown once when created, stored only as hashes.", no_args_is_help=True)

DataDir = Annotated[Path | None, typer.Option(help=f"Where the accounts database lives; default {default_data_dir()}.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON only.")]


def _accounts(data_dir: Path | None) -> Accounts:
    return Accounts(accounts_path(data_dir))


def _run(action):
    """Run an account action; a refusal is one line on stderr and exit code 1."""
    try:
        return action()
    except AccountError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _print(value, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(value) if as_json else text)


@users_app.command("add")
def users_add(name: str, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Add a user."""
    user = _run(lambda: _accounts(data_dir).add_user(name))
    _print(
        asdict(user),
        as_json,
        f"added user {user.name}; create a token with `hub_server tokens create --user {user.name}`",
    )


@users_app.command("list")
def users_list(data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """List users and how many active tokens each has."""
    users = _run(lambda: _accounts(data_dir).users())
    lines = [f"{u.name:<24} {u.active_tokens} token(s)  since {u.created_at}" for u in users] or ["no users yet"]
    _print([asdict(u) for u in users], as_json, "\n".join(lines))


@users_app.command("remove")
def users_remove(name: str, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Remove a user and all of their tokens (effective on their next request)."""
    _run(lambda: _accounts(data_dir).remove_user(name))
    _print({"removed": name}, as_json, f"removed user {name} and their tokens")


@tokens_app.command("create")
def tokens_create(
    user: Annotated[str, typer.Option(help="Whose token.")], data_dir: DataDir = None, as_json: AsJson = False
) -> None:
    """Create a token; it is shown this once and never again."""
    record, token = _run(lambda: _accounts(data_dir).create_token(user))
    _print(
        {"token": token, **asdict(record)},
        as_json,
        f"{token}\n\ntoken {record.token_id} for {record.user}: this is the only time it is shown; "
        f"the user runs `specedge login --hub URL` and pastes it",
    )


@tokens_app.command("list")
def tokens_list(
    user: Annotated[str | None, typer.Option(help="Only this user's tokens.")] = None,
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """List token ids (never the tokens themselves)."""
    records = _run(lambda: _accounts(data_dir).tokens(user))
    lines = [
        f"{t.token_id}  {t.user:<24} created {t.created_at}" + (f"  revoked {t.revoked_at}" if t.revoked_at else "")
        for t in records
    ] or ["no tokens"]
    _print([asdict(t) for t in records], as_json, "\n".join(lines))


@tokens_app.command("revoke")
def tokens_revoke(token_id: str, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Revoke a token by id; the hub refuses it from the next request on."""
    record = _run(lambda: _accounts(data_dir).revoke_token(token_id))
    _print(asdict(record), as_json, f"revoked {record.token_id} of {record.user}")

"""`hub_server users ...` and `hub_server tokens ...`: the operator's account commands.

They write the same SQLite database a running hub reads (WAL mode), so a new token works and a
revoked one stops working on the next request, without a restart.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from hub_server.accounts import ROLES, Accounts, TokenRecord
from hub_server.config import accounts_path, default_data_dir
from hub_server.errors import AccountError, AccountsUnavailable

users_app = typer.Typer(help="Accounts that may use this hub.", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens: shown once when created, stored only as hashes.", no_args_is_help=True)

DataDir = Annotated[Path | None, typer.Option(help=f"Where the accounts database lives; default {default_data_dir()}.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON only.")]


def _accounts(data_dir: Path | None) -> Accounts:
    return Accounts(accounts_path(data_dir))


T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Run an account action; a refusal is one line on stderr and exit code 1."""
    try:
        return action()
    except (AccountError, AccountsUnavailable) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _print(value: object, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(value) if as_json else text)


@users_app.command("add")
def users_add(
    name: str,
    role: Annotated[
        str, typer.Option(help=f"One of {', '.join(ROLES)}; an operator's tokens also read the hub-wide /metrics.")
    ] = "user",
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """Add a user."""
    user = _run(lambda: _accounts(data_dir).add_user(name, role))
    _print(
        asdict(user),
        as_json,
        f"added {user.role} {user.name}; create a token with `hub_server tokens create --user {user.name}`",
    )


@users_app.command("list")
def users_list(data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """List users, their role and how many active tokens each has."""
    users = _run(lambda: _accounts(data_dir).users())
    lines = [f"{u.name:<24} {u.role:<9} {u.active_tokens} token(s)  since {u.created_at}" for u in users] or [
        "no users yet"
    ]
    _print([asdict(u) for u in users], as_json, "\n".join(lines))


@users_app.command("remove")
def users_remove(name: str, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Remove a user and all of their tokens (effective on their next request); a running hub
    closes their sessions within seconds."""
    _run(lambda: _accounts(data_dir).remove_user(name))
    _print(
        {"removed": name},
        as_json,
        f"removed user {name} and their tokens; a running hub closes their sessions within seconds",
    )


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '90m', '45s', '2w' as a duration."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not match or float(match[1]) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration: write e.g. 30d, 12h, 90m (s m h d w)")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def parse_moment(text: str) -> datetime:
    """An ISO date or date and time; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not a date: write e.g. 2027-01-31 or 2027-01-31T18:00:00Z") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _expiry(expires_in: str | None, expires_at: str | None) -> datetime | None:
    if expires_in and expires_at:
        raise typer.BadParameter("give --expires-in or --expires-at, not both")
    if expires_in:
        return datetime.now(timezone.utc) + parse_duration(expires_in)
    return parse_moment(expires_at) if expires_at else None


@tokens_app.command("create")
def tokens_create(
    user: Annotated[str, typer.Option(help="Whose token.")],
    expires_in: Annotated[
        str | None, typer.Option(help="Valid for this long from now: 30d, 12h, 90m, 2w; default: until revoked.")
    ] = None,
    expires_at: Annotated[
        str | None, typer.Option(help="Valid until this moment: 2027-01-31 or 2027-01-31T18:00:00Z (UTC).")
    ] = None,
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """Create a token; it is shown this once and never again."""
    expiry = _expiry(expires_in, expires_at)
    record, token = _run(lambda: _accounts(data_dir).create_token(user, expiry))
    until = f", valid until {record.expires_at}" if record.expires_at else ""
    _print(
        {"token": token, **asdict(record)},
        as_json,
        f"{token}\n\ntoken {record.token_id} for {record.user}{until}: this is the only time it is shown; "
        f"the user runs `specedge login --hub URL` and pastes it",
    )


def _token_line(t: TokenRecord) -> str:
    line = f"{t.token_id}  {t.user:<24} created {t.created_at}"
    if t.expires_at:
        past = datetime.fromisoformat(t.expires_at) <= datetime.now(timezone.utc)
        line += f"  {'expired' if past else 'expires'} {t.expires_at}"
    return line + (f"  revoked {t.revoked_at}" if t.revoked_at else "")


@tokens_app.command("list")
def tokens_list(
    user: Annotated[str | None, typer.Option(help="Only this user's tokens.")] = None,
    data_dir: DataDir = None,
    as_json: AsJson = False,
) -> None:
    """List token ids (never the tokens themselves)."""
    records = _run(lambda: _accounts(data_dir).tokens(user))
    lines = [_token_line(t) for t in records] or ["no tokens"]
    _print([asdict(t) for t in records], as_json, "\n".join(lines))


@tokens_app.command("revoke")
def tokens_revoke(token_id: str, data_dir: DataDir = None, as_json: AsJson = False) -> None:
    """Revoke a token by id; the hub refuses it from the next request on."""
    record = _run(lambda: _accounts(data_dir).revoke_token(token_id))
    _print(asdict(record), as_json, f"revoked {record.token_id} of {record.user}")

"""`hub_server workers`: the engine workers of a running hub, and draining one of them.

They speak to the hub over HTTP (`GET /v1/workers`, `POST /v1/workers/ID/drain` and `/undrain`) with an API
token, like any client; the hub may run on another machine.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer

workers_app = typer.Typer(
    help="The engine workers of a running hub: list them (no command), drain one, or undrain it.",
    invoke_without_command=True,
)

HubUrl = Annotated[str, typer.Option("--hub", help="The hub's URL, e.g. http://127.0.0.1:8000.")]
Token = Annotated[
    str | None,
    typer.Option(envvar="SPECEDGE_TOKEN", show_default=False, help="API token (`hub_server tokens create`)."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON only.")]

COLUMNS = ("worker_id", "state", "device", "node", "pid", "sessions", "kv", "queue_depth", "passes", "restarts")


@workers_app.callback()
def list_workers(ctx: typer.Context, hub: HubUrl = "", token: Token = None, as_json: AsJson = False) -> None:
    """List each worker: id, state, device, node, process id, sessions, KV use, queue depth, passes."""
    if ctx.invoked_subcommand is not None:
        return
    if not hub:
        raise typer.BadParameter("give the hub's URL with --hub", param_hint="--hub")
    workers = _ask(hub, token, "GET", "/v1/workers")["workers"]
    typer.echo(json.dumps(workers) if as_json else _table(workers))


@workers_app.command("drain")
def drain(worker_id: str, hub: HubUrl, token: Token = None, as_json: AsJson = False) -> None:
    """Stop placing new sessions on worker ID; its open sessions finish there."""
    worker = _ask(hub, token, "POST", f"/v1/workers/{worker_id}/drain")
    typer.echo(
        json.dumps(worker)
        if as_json
        else f"worker {worker['worker_id']} is {worker['state']}: {worker['sessions']} open sessions finish there"
    )


@workers_app.command("undrain")
def undrain(worker_id: str, hub: HubUrl, token: Token = None, as_json: AsJson = False) -> None:
    """Place new sessions on worker ID again (after `drain`)."""
    worker = _ask(hub, token, "POST", f"/v1/workers/{worker_id}/undrain")
    typer.echo(json.dumps(worker) if as_json else f"worker {worker['worker_id']} is {worker['state']}")


def _ask(hub: str, token: str | None, method: str, path: str) -> Any:
    """The hub's JSON answer; a refusal or an unreachable hub is one line on stderr and exit code 1."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, hub.rstrip("/") + path, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        typer.echo(f"Error: cannot reach the hub at {hub} ({exc}); is it running?", err=True)
        raise typer.Exit(1) from exc
    if response.status_code == 401:  # the hub's own message tells a chat user to `specedge login`
        typer.echo(
            f"Error: the hub at {hub} did not accept the token ({'none given' if not token else 'unknown or revoked'}): "
            "pass an operator's token with --token (or SPECEDGE_TOKEN); an operator creates one with "
            "`hub_server users add NAME --role operator` and `hub_server tokens create --user NAME`",
            err=True,
        )
        raise typer.Exit(1)
    if response.status_code != 200:
        typer.echo(f"Error: the hub answered {response.status_code}: {_said(response)}", err=True)
        raise typer.Exit(1)
    return response.json()


def _said(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def _table(workers: list[dict]) -> str:
    rows: list[tuple[str, ...]] = [COLUMNS]
    for w in workers:
        blocks = f"{w['kv_blocks_used']}/{w['kv_blocks']} blocks" if w.get("kv_blocks") else ""
        kv = f"{w['sessions']}/{w['kv_slots']} ({w['kv_bytes_used'] / 2**20:.0f} MiB{', ' + blocks if blocks else ''})"
        cells = {**w, "kv": kv, "device": ",".join(w.get("devices") or [w["device"]])}  # a tensor-parallel worker's all
        rows.append(tuple(str(cells[name]) for name in COLUMNS))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

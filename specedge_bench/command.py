"""`hub_server bench`'s body: the hub's CLI declares the flags and hands them here.

Starts a hub here (`--model`) or measures a running one (`--hub`), runs every client count in
turn on one workload, measures the bound, prints a table per run (stderr) and the JSON (stdout),
and draws the plot. Failures reach the operator as one line that says what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import typer

from specedge_bench.bound import probe_bounds, probe_bounds_through_hub
from specedge_bench.config import MODES, BenchConfig, load_prompts
from specedge_bench.errors import BenchRefused, explain
from specedge_bench.local_hub import LocalHub
from specedge_bench.report import plot, table
from specedge_bench.runs import run_bench
from specedge_bench.workload import Workload, prepare_workload
from specedge_cli.errors import HubError, InsecureHub
from specedge_common.launcher import HubStartError


@dataclass(frozen=True)
class BenchOptions:
    """`hub_server bench`'s flags, as given."""

    draft: Path
    model: str | None
    hub: str | None
    token: str | None
    clients: str
    rtt_ms: float
    max_tokens: int
    draft_len: int
    prompts: int
    modes: str
    device: str
    dtype: str
    edge_tps: float
    merge_wait_share: float
    proactive: bool
    server_price_per_hour: float
    edge_price_per_hour: float
    plot_path: Path
    as_json: bool
    workers: str = "1"  # engine workers of the hub started here; a comma list runs each


def bench(options: BenchOptions) -> None:
    """Run the bench as `options` ask; exit 1 with one line on a failure."""
    counts, modes = _parse(options)
    worker_counts = _worker_counts(options)
    runs: list[dict] = []
    workload: Workload | None = None
    local_cores: set[int] | None = None
    try:
        for workers in worker_counts:
            more, workload, local_cores = _run_counts(options, counts, modes, workers, workload)
            runs += more
    except BenchRefused as exc:
        _fail(str(exc), exc)
    except (HubError, InsecureHub) as exc:
        _fail(explain(exc, options.hub or "this machine", options.token if options.hub else None), exc)
    except HubStartError as exc:
        _fail(f"the hub to measure did not start: {exc}", exc)
    if local_cores is not None and workload is not None and options.model is not None and worker_counts == [1]:
        # The hub has stopped: its device and cores are free to measure full passes directly.
        probe_bounds(runs, options.model, options.device, options.dtype, workload, local_cores)
        _say_bounds(options, runs, "measured directly")
    plot(runs, options.plot_path)
    result = runs[0] if len(runs) == 1 else {"runs": runs}
    result["plot"] = str(options.plot_path)
    typer.echo(json.dumps(result, indent=None if options.as_json else 2))


def _parse(options: BenchOptions) -> tuple[list[int], tuple[str, ...]]:
    if (options.model is None) == (options.hub is None):
        raise typer.BadParameter("give --model to start a hub here, or --hub URL to measure a running one")
    counts = [int(part) for part in options.clients.split(",") if part.strip()]
    modes = tuple(part.strip() for part in options.modes.split(",") if part.strip())
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise typer.BadParameter(
            f"unknown mode {', '.join(unknown) or '(none given)'}: choose from {','.join(MODES)}", param_hint="--modes"
        )
    return counts, modes


def _worker_counts(options: BenchOptions) -> list[int]:
    counts = [int(part) for part in options.workers.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        raise typer.BadParameter("give worker counts of 1 or more, like 1,2", param_hint="--workers")
    if options.hub and counts != [1]:
        raise typer.BadParameter("--workers starts hubs here: give it with --model, not --hub", param_hint="--workers")
    return counts


def _run_counts(
    options: BenchOptions, counts: list[int], modes: tuple[str, ...], workers: int, workload: Workload | None
) -> tuple[list[dict], Workload | None, set[int] | None]:
    """Every client count on one workload, with a hub of `workers` engine workers started here
    (each gets the users one worker gets: throughput should grow with the workers); the runs,
    the workload, and the cores of the hub started here (None against a running hub)."""
    serve_args = ("--merge-wait-share", str(options.merge_wait_share), "--workers", str(workers))
    runs: list[dict] = []
    # More than one worker: Ray pins each to a core of its own.
    hub = LocalHub.maybe(
        options.model, options.draft, options.device, max(counts), options.dtype, serve_args, pin_hub=workers == 1
    )
    with hub as local:
        url = options.hub or (local.url if local else "")
        for count in counts:
            config = _config(options, url, count * workers)
            workload = workload or prepare_workload(config, modes)
            runs.append({**run_bench(config, modes, workload), "workers": workers})
            if not options.as_json:
                typer.echo(f"workers={workers} " + table(runs[-1]), err=True)
        if local is None and workload is not None:
            # The bound: full passes of both kinds, made through the hub's API.
            probe_bounds_through_hub(runs, config, workload)
            _say_bounds(options, runs, "measured through the hub's API")
    return runs, workload, local.hub_cores if local else None


def _config(options: BenchOptions, url: str, clients: int) -> BenchConfig:
    return BenchConfig(
        url,
        options.draft,
        clients,
        options.rtt_ms,
        options.max_tokens,
        options.draft_len,
        load_prompts()[: options.prompts],
        options.edge_tps,
        options.token if options.hub else None,
        options.proactive,
        options.server_price_per_hour,
        options.edge_price_per_hour,
    )


def _say_bounds(options: BenchOptions, runs: list[dict], how: str) -> None:
    if not options.as_json:
        for run in runs:
            typer.echo(f"clients={run['config']['clients']} bound, {how}: {run['bound']}", err=True)


def _fail(message: str, exc: BaseException) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1) from exc

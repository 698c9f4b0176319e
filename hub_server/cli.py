"""`hub_server`: the operator's command line."""

from __future__ import annotations

import logging
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from hub_server.accounts import Accounts
from hub_server.admin import tokens_app, users_app
from hub_server.config import (
    ATTENTIONS,
    COMPILE_MODES,
    CPU_MATMULS,
    DEVICES,
    DTYPES,
    LOG_FORMATS,
    SHARE_PREFIXES,
    HubSettings,
    default_data_dir,
    parse_draft_hint,
)
from hub_server.errors import AccountError, AccountsUnavailable
from hub_server.workers_cmd import workers_app
from specedge_common.extras import HUB_INSTALL, missing_hub_modules
from specedge_common.launcher import EMBEDDED_TOKEN_ENV
from specedge_common.net import is_loopback

app = typer.Typer(
    help="SpecEdge verification hub: serves a target model to drafting clients.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
app.add_typer(workers_app, name="workers")


def _print_version(asked: bool) -> None:
    if asked:
        try:
            typer.echo(f"hub_server {metadata.version('specedge')}")
        except metadata.PackageNotFoundError:
            typer.echo("hub_server 0+unknown")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """SpecEdge verification hub."""


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Target model: a .gguf file or a Hugging Face model folder.")],
    host: Annotated[
        str, typer.Option(help="Address to bind; loopback unless you mean to expose the hub.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help=f"One of {', '.join(DEVICES)}.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help=f"One of {', '.join(DTYPES)}; auto is float32 on CPU, bfloat16 on CUDA.")
    ] = "auto",
    max_draft_tokens: Annotated[int, typer.Option(help="Longest draft one verify may carry.")] = 64,
    max_context: Annotated[
        int,
        typer.Option(
            help="Context limit per session (reserves no memory); 0: the model's, cut to what the KV blocks hold."
        ),
    ] = 0,
    max_sessions: Annotated[
        int,
        typer.Option(
            help="Sessions served at once (the session table); KV memory is taken as contexts grow, not reserved."
        ),
    ] = 64,
    kv_memory_gib: Annotated[
        float,
        typer.Option(
            help="KV memory budget in GiB; 0: half the GPU memory free after loading the model, a quarter on a CPU."
        ),
    ] = 0.0,
    draft: Annotated[
        str | None, typer.Option(help="A .gguf draft model on the hub, for the server-only speculative mode.")
    ] = None,
    draft_hint: Annotated[
        str | None,
        typer.Option(
            help="The draft clients should use, published in /v1/info: a `specedge models` preset name, "
            "or OWNER/REPO/FILE.gguf@SHA256 on the Hugging Face Hub."
        ),
    ] = None,
    session_idle_s: Annotated[float, typer.Option(help="Evict sessions idle this many seconds.")] = 600.0,
    max_batch: Annotated[int, typer.Option(help="Sessions verified in one forward pass.")] = 16,
    batch_wait_ms: Annotated[
        float, typer.Option(help="Longest wait, in ms, for a fuller batch when more work is on its way.")
    ] = 2.0,
    merge_wait_share: Annotated[
        float,
        typer.Option(
            help="Hold a batch for users due back within this share of a pass's fixed cost (measured), so they share the pass; 0: never."
        ),
    ] = 1.0,
    threads: Annotated[
        int,
        typer.Option(
            help="torch's threads for a CPU target's passes; 0: chosen per pass, one for verify passes (many small "
            "operators: more threads wait for the slowest at each) and every core for prompts."
        ),
    ] = 0,
    max_pass_tokens: Annotated[
        int,
        typer.Option(
            help="Prompt tokens a step may carry beside its verifies (prompts go in chunks, so a long one never stalls other users); 0: auto, chunks that cost about one verify pass (measured)."
        ),
    ] = 0,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where converted GGUF targets and compiled passes are kept.")
    ] = None,
    compile: Annotated[
        str,
        typer.Option(
            help=f"One of {', '.join(COMPILE_MODES)}: compiled fixed-shape passes (CUDA graphs on a GPU), "
            "compiled at the first start and kept under --cache-dir for the next; auto is on for CUDA only."
        ),
    ] = "auto",
    cpu_matmul: Annotated[
        str,
        typer.Option(
            help=f"One of {', '.join(CPU_MATMULS)}: the library for a CPU target's float32 matrix products; "
            "auto times both at start and takes the faster."
        ),
    ] = "auto",
    attention: Annotated[
        str,
        typer.Option(
            help=f"One of {', '.join(ATTENTIONS)}: how passes attend over the KV blocks. reference: SDPA over "
            "gathered views, on any device; kernel: the hub's own CPU kernel (built at start with the C compiler); "
            "flex: FlexAttention, the whole pass one compiled graph with --compile on; auto: on a CPU the kernel "
            "where a timing at start finds it faster, the reference elsewhere (the start-up log says which)."
        ),
    ] = "auto",
    share_prefixes: Annotated[
        str,
        typer.Option(
            help=f"One of {', '.join(SHARE_PREFIXES)}: whose sessions share the KV of a common prefix (computed once); "
            "account keeps it within one account, since across accounts a prompt's speed tells whether another "
            "user sent the same prefix."
        ),
    ] = "account",
    data_dir: Annotated[
        Path | None, typer.Option(help=f"Accounts database folder; default {default_data_dir()}.")
    ] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve without tokens; loopback addresses only.")] = False,
    max_sessions_per_user: Annotated[int, typer.Option(help="Open sessions per user; 0: no per-user cap.")] = 0,
    tokens_per_minute: Annotated[int, typer.Option(help="Tokens each user may send per minute; 0: unlimited.")] = 0,
    max_queue_depth: Annotated[
        int, typer.Option(help="Feeds and verifies in flight at once; more answer 429; 0: no cap.")
    ] = 0,
    log_format: Annotated[str, typer.Option(help=f"One of {', '.join(LOG_FORMATS)}.")] = "text",
    shutdown_timeout: Annotated[
        float,
        typer.Option(help="On SIGTERM, seconds in-flight requests get to finish; cutting any exits with status 1."),
    ] = 30.0,
    request_timeout_s: Annotated[
        float,
        typer.Option(help="A request whose headers and body have not all arrived in this many seconds is closed."),
    ] = 30.0,
    max_connections: Annotated[
        int, typer.Option(help="Open connections at most; one more is answered 503 and closed.")
    ] = 1024,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM), passed to uvicorn.")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate chain (PEM), passed to uvicorn.")] = None,
    workers: Annotated[
        int,
        typer.Option(
            help="Engine workers on --device, each with the target and its own KV pool; more than one run on Ray."
        ),
    ] = 1,
    devices: Annotated[
        str | None,
        typer.Option(
            help="One worker per device (per --tensor-parallel devices), comma separated: cuda:0,cuda:1 or cpu,cpu "
            "(instead of --workers)."
        ),
    ] = None,
    tensor_parallel: Annotated[
        int,
        typer.Option(
            help="Devices of one node each worker spans (tensor parallelism: each holds 1/N of every layer's "
            "attention heads, KV memory and MLP); more than one runs on Ray."
        ),
    ] = 1,
    api_servers: Annotated[
        int,
        typer.Option(
            help="Processes serving HTTP in front of the engine process (any of them serves any session); "
            "0: one per 4 cores."
        ),
    ] = 0,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Join a Ray cluster (auto, or the head's HOST:PORT) and place workers on any node's free devices."
        ),
    ] = None,
) -> None:
    """Run the hub."""
    if not Path(model).expanduser().exists():
        raise typer.BadParameter(f"{model} does not exist; pass a .gguf file or a model folder", param_hint="--model")
    try:
        settings = HubSettings(
            model=model,
            host=host,
            port=port,
            device=device,
            dtype=dtype,
            max_draft_tokens=max_draft_tokens,
            max_context=max_context,
            kv_memory_gib=kv_memory_gib,
            max_sessions=max_sessions,
            max_batch=max_batch,
            draft=draft,
            draft_hint=parse_draft_hint(draft_hint) if draft_hint else None,
            session_idle_s=session_idle_s,
            batch_wait_ms=batch_wait_ms,
            merge_wait_share=merge_wait_share,
            max_pass_tokens=max_pass_tokens,
            threads=threads,
            cache_dir=cache_dir,
            compile=compile,
            cpu_matmul=cpu_matmul,
            attention=attention,
            share_prefixes=share_prefixes,
            data_dir=data_dir,
            auth=not no_auth,
            embedded_token=os.environ.pop(EMBEDDED_TOKEN_ENV, None) or None,
            max_sessions_per_user=max_sessions_per_user,
            tokens_per_minute=tokens_per_minute,
            max_queue_depth=max_queue_depth,
            log_format=log_format,
            shutdown_timeout_s=shutdown_timeout,
            request_timeout_s=request_timeout_s,
            max_connections=max_connections,
            ssl_keyfile=ssl_keyfile,
            ssl_certfile=ssl_certfile,
            workers=workers,
            devices=tuple(d.strip() for d in devices.split(",") if d.strip()) if devices else (),
            ray_address=ray_address,
            tensor_parallel=tensor_parallel,
            api_servers=api_servers,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    # Before anything loads: a damaged or unreachable accounts database is one line and status 1.
    has_tokens = _check_accounts(settings)
    _run_hub(settings, has_tokens)


def _check_accounts(settings: HubSettings) -> bool:
    """Open the accounts database as the hub will (integrity checked); whether it holds any token."""
    if not settings.auth or settings.embedded_token:
        return True
    try:
        accounts = Accounts(settings.accounts_path)
        try:
            return bool(accounts.tokens())
        finally:
            accounts.close()
    except (AccountError, AccountsUnavailable) as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _run_hub(settings: HubSettings, has_tokens: bool) -> None:
    """Serve until SIGTERM or Ctrl+C; exit 1 when the shutdown timeout cut replies short, 3 when
    the port is taken."""
    from hub_server import front_ends
    from hub_server.logging_setup import configure_logging

    configure_logging(settings.log_format)
    _warn_about_exposure(settings, has_tokens)
    code = front_ends.run(settings)
    if code:
        raise typer.Exit(code)
    logging.getLogger("hub_server").info("hub stopped")


def _warn_about_exposure(settings: HubSettings, has_tokens: bool) -> None:
    log = logging.getLogger("hub_server")
    if not is_loopback(settings.host):
        log.warning(
            "binding to %s: the hub is reachable from other machines%s",
            settings.host,
            "" if settings.ssl_certfile else "; serve it over TLS (--ssl-certfile or a proxy; docs/operators.md)",
        )
    if not has_tokens:
        log.warning(
            "no API tokens exist yet: create one with `hub_server users add NAME` and "
            "`hub_server tokens create --user NAME`"
        )


@app.command()
def bench(
    draft: Annotated[
        Path,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="Draft .gguf the simulated users (and the hub's speculative mode) draft with.",
        ),
    ],
    model: Annotated[str | None, typer.Option(help="Target to start a hub with (omit with --hub).")] = None,
    hub: Annotated[
        str | None, typer.Option(help="A running hub to measure instead (started with the same --draft).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="SPECEDGE_TOKEN",
            show_default=False,
            help="An operator's API token for --hub: the bench reads its /metrics "
            "(`hub_server users add NAME --role operator`, then `hub_server tokens create --user NAME`).",
        ),
    ] = None,
    clients: Annotated[str, typer.Option(help="Concurrent users; a comma list (1,2,4,8) runs each and plots.")] = "1",
    rtt_ms: Annotated[float, typer.Option(help="Emulated network round trip, ms.")] = 14.0,
    max_tokens: Annotated[int, typer.Option(help="Tokens per reply.")] = 64,
    draft_len: Annotated[int, typer.Option(help="Draft tokens per verify.")] = 8,
    prompts: Annotated[int, typer.Option(help="How many prompts of the shipped set each user answers.")] = 6,
    modes: Annotated[
        str, typer.Option(help="Comma list of specedge,server_only_spec,autoregressive.")
    ] = "specedge,server_only_spec,autoregressive",
    device: Annotated[str, typer.Option(help="Device of a hub started here.")] = "auto",
    dtype: Annotated[str, typer.Option(help=f"Dtype of a hub started here: one of {', '.join(DTYPES)}.")] = "auto",
    edge_tps: Annotated[
        float,
        typer.Option(
            help="Draft speed of each simulated user's own device, tokens/s; 0 measures the draft model here on one thread."
        ),
    ] = 0.0,
    merge_wait_share: Annotated[float, typer.Option(help="--merge-wait-share of a hub started here.")] = 1.0,
    proactive: Annotated[
        bool, typer.Option(help="Simulated users draft the next round while a verify is out, as `specedge chat` does.")
    ] = True,
    server_price_per_hour: Annotated[
        float, typer.Option(help="$ per hour of the hub's busy time, for cost per token (the paper's A100-40GB).")
    ] = 4.05,
    edge_price_per_hour: Annotated[
        float, typer.Option(help="$ per hour of a user's device drafting (the paper's RTX 4090).")
    ] = 0.35,
    plot_path: Annotated[Path, typer.Option("--plot", help="Where to draw the PNG plot.")] = Path("hub-bench.png"),
    workers: Annotated[
        str,
        typer.Option(
            help="Engine workers of the hub started here; a comma list (1,2) runs each, with --clients users per worker."
        ),
    ] = "1",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Measure server throughput, latency and cost: SpecEdge against server-only baselines."""
    # The bench is a client of the hub (package specedge_bench): imported only when it runs, so
    # the hub's own modules never load the client's.
    from specedge_bench.command import BenchOptions
    from specedge_bench.command import bench as run

    run(
        BenchOptions(
            draft=draft,
            model=model,
            hub=hub,
            token=token,
            clients=clients,
            rtt_ms=rtt_ms,
            max_tokens=max_tokens,
            draft_len=draft_len,
            prompts=prompts,
            modes=modes,
            device=device,
            dtype=dtype,
            edge_tps=edge_tps,
            merge_wait_share=merge_wait_share,
            proactive=proactive,
            server_price_per_hour=server_price_per_hour,
            edge_price_per_hour=edge_price_per_hour,
            plot_path=plot_path,
            as_json=as_json,
            workers=workers,
        )
    )


def run() -> None:
    """Entry point: the hub's packages come with the `hub` extra; without them, one line says so."""
    missing = missing_hub_modules()
    if missing:
        sys.stderr.write(f"Error: hub_server needs the hub's packages ({', '.join(missing)}): run `{HUB_INSTALL}`\n")
        sys.exit(1)
    app(prog_name="hub_server")


if __name__ == "__main__":
    run()

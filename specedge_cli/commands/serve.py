"""`specedge serve`: an OpenAI-compatible server on loopback, like `ollama serve`, decoding
edge-assisted (the local draft, the configured hub or an embedded one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.draft_choice import choose_draft
from specedge_cli.drafting.chat_template import ChatTemplate, template_for
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.errors import SpecEdgeError
from specedge_cli.models import DEFAULT_MODEL
from specedge_cli.remote.connect import HubConnection
from specedge_cli.serve.slots import EdgeModel, Slot, SlotPool
from specedge_cli.settings import chat_settings, hub_address
from specedge_cli.waiting import open_hub
from specedge_common.net import is_loopback

if TYPE_CHECKING:
    from specedge_cli.serve.http import ApiServer, ServeLimits

DEFAULT_PORT = 11435  # one above ollama's 11434, so both can run
err = Console(stderr=True, highlight=False)


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; loopback unless --api-key is set.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = DEFAULT_PORT,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help=f"Draft model: a .gguf path or a preset name (default: {DEFAULT_MODEL})."),
    ] = None,
    hub: Annotated[
        str | None, typer.Option(help="Hub URL; default: SPECEDGE_HUB, your login, or an embedded hub.")
    ] = None,
    parallel: Annotated[
        int, typer.Option(min=1, max=32, help="Requests decoded at once (one drafting context each); more wait.")
    ] = 1,
    queue: Annotated[
        int, typer.Option(min=0, help="Requests that may wait for a drafting context; more get 503.")
    ] = 64,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="SPECEDGE_API_KEY", help="Require this key (Authorization: Bearer KEY) on /v1 routes."),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-tokens", "-n", min=1, help="Most tokens in a reply a request does not limit (default: 256)."
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", "-t", min=1, help="llama.cpp threads per drafting context.")
    ] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Never download a model; use what is on disk.")] = False,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plain http to a hub on another machine (a network you trust).")
    ] = False,
    idle_timeout: Annotated[
        int, typer.Option(min=1, help="Seconds a kept-alive connection may sit idle before it is closed.")
    ] = 15,
    request_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds a request's line, headers and body have to arrive.")
    ] = 30.0,
    max_connections: Annotated[
        int, typer.Option(min=1, help="Connections open at once; more are answered 503 and closed.")
    ] = 512,
) -> None:
    """Serve the hub's model through an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/responses).

    Fields a request leaves out (temperature, seed, max_tokens) take your `specedge config` settings.
    """
    # uvicorn and starlette take ~0.1 s to import, which no other command should pay
    from specedge_cli.serve.http import ServeLimits

    if not is_loopback(host) and not api_key:
        raise SpecEdgeError(
            f"refusing to listen on {host} without --api-key: anyone who can reach it could use your hub"
        )
    chosen = chat_settings(max_tokens=max_tokens, threads=threads, offline=offline or None)
    address = hub_address(hub)
    # Without a model named, with a hub: one whose vocabulary is its target's (draft_choice).
    resolved = choose_draft(model, address, insecure, chosen.offline, err)
    with open_hub(address, resolved.path, insecure, err) as (connection, wait_for_hub):
        engines = [DraftEngine(resolved.path, n_threads=chosen.threads or None) for _ in range(parallel)]
        wait_for_hub()  # a loading hub is waited for; a conversion shows its progress
        edge = _edge_model(
            connection,
            engines,
            template_for(engines[0].vocab, resolved),
            DecodeSettings.of_chat(chosen, hub_elsewhere=connection.embedded is None),
            queue,
        )
        limits = ServeLimits(
            idle_timeout_s=idle_timeout, request_timeout_s=request_timeout, max_connections=max_connections
        )
        with _listening(host, port, edge, api_key, limits) as server:
            err.print(
                f"specedge serve: http://{host}:{port}/v1 · model {edge.model_id} · hub {connection.url} · "
                f"{parallel} drafting context{'s' if parallel > 1 else ''}; Ctrl+C stops"
            )
            with contextlib.suppress(KeyboardInterrupt):
                server.serve_forever()
        for slot in edge.pool.slots:
            slot.conversation.close()


def _edge_model(
    connection: HubConnection,
    engines: list[DraftEngine],
    template: ChatTemplate,
    settings: DecodeSettings,
    max_waiting: int,
) -> EdgeModel:
    """The pool of drafting contexts; the first opens a hub session now, so a refused draft fails at start."""
    fingerprint = engines[0].vocab.fingerprint()
    conversations = [
        Conversation(engine, connection.client, template, settings, vocab_fingerprint=fingerprint) for engine in engines
    ]
    conversations[0].open()
    conversations[0].decoder.prepare_grammars()  # the hub's session opening did the same on its side
    info = connection.client.info()
    add_bos = engines[0].vocab.metadata("tokenizer.ggml.add_bos_token") != "false"
    return EdgeModel(info.model, SlotPool([Slot(c) for c in conversations], max_waiting), settings, add_bos)


@contextlib.contextmanager
def _listening(host: str, port: int, edge: EdgeModel, api_key: str | None, limits: ServeLimits) -> Iterator[ApiServer]:
    from specedge_cli.serve.http import ApiServer

    try:
        server = ApiServer((host, port), edge, api_key, limits)
    except OSError as exc:
        raise SpecEdgeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another with --port") from exc
    try:
        yield server
    finally:
        server.server_close()

"""`hub_server`: the operator's command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from hub_server.config import DEVICES, DTYPES, HubSettings, is_loopback

app = typer.Typer(help="SpecEdge verification hub: serves a target model to drafting clients.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """SpecEdge verification hub."""


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Target model: a .gguf file or a Hugging Face model folder.")],
    host: Annotated[str, typer.Option(help="Address to bind; loopback unless you mean to expose the hub.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[str, typer.Option(help=f"One of {', '.join(DEVICES)}.")] = "auto",
    dtype: Annotated[str, typer.Option(help=f"One of {', '.join(DTYPES)}; auto is float32 on CPU, bfloat16 on CUDA.")] = "auto",
    max_draft_tokens: Annotated[int, typer.Option(help="Longest draft one verify may carry.")] = 64,
    max_context: Annotated[int, typer.Option(help="Context limit per session; 0 uses the model's.")] = 0,
    max_sessions: Annotated[int, typer.Option(help="Sessions served at once.")] = 64,
    draft: Annotated[Optional[str], typer.Option(help="A .gguf draft model on the hub, for the server-only speculative mode.")] = None,
    session_idle_s: Annotated[float, typer.Option(help="Evict sessions idle this many seconds.")] = 600.0,
    max_batch: Annotated[int, typer.Option(help="Sessions verified in one forward pass.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="Longest wait for a fuller batch, in ms.")] = 2.0,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where converted GGUF targets are kept.")] = None,
) -> None:
    """Run the hub."""
    import uvicorn

    from hub_server.app import create_app
    from hub_server.runner import ModelRunner

    if not Path(model).expanduser().exists():
        raise typer.BadParameter(f"{model} does not exist; pass a .gguf file or a model folder", param_hint="--model")
    try:
        settings = HubSettings(model=model, host=host, port=port, device=device, dtype=dtype,
                               max_draft_tokens=max_draft_tokens, max_context=max_context,
                               max_sessions=max_sessions, max_batch=max_batch, draft=draft, session_idle_s=session_idle_s,
                               batch_wait_ms=batch_wait_ms, cache_dir=cache_dir)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not is_loopback(host):
        logging.getLogger("hub_server").warning("binding to %s: the hub is reachable from other machines", host)
    uvicorn.run(create_app(settings, ModelRunner), host=host, port=port, log_level="warning")


if __name__ == "__main__":
    app()

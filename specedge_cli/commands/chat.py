"""`specedge chat`: talk to the target model, drafting locally and verifying on a hub."""

from __future__ import annotations

import codecs
import contextlib
import json
import sys
from typing import Annotated, Callable, Iterator, Optional

import typer
from rich.console import Console

from specedge_cli import config
from specedge_cli.decoding import Conversation, DecodeSettings, Reply
from specedge_cli.drafting.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.models import DEFAULT_MODEL, ResolvedModel, resolve_model
from specedge_cli.remote.client import HubClient
from specedge_cli.remote.embedded import EmbeddedHub

err = Console(stderr=True)


def chat(
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this one prompt and exit.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --prompt: print one JSON object.")] = False,
    hub: Annotated[Optional[str], typer.Option(help="Hub URL; default: SPECEDGE_HUB, your login, or an embedded hub.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Draft model: a .gguf path or a preset name.")] = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens in one reply.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 decodes greedily.")] = 0.0,
    seed: Annotated[int, typer.Option(min=0, help="Sampling seed for temperature > 0.")] = 0,
    draft_len: Annotated[int, typer.Option(min=1, max=64, help="Tokens drafted per verify.")] = 8,
    system: Annotated[str, typer.Option(help="System prompt.")] = "",
    threads: Annotated[Optional[int], typer.Option(min=1, help="llama.cpp threads for drafting.")] = None,
) -> None:
    """Chat with the target model; with --prompt, answer once and exit."""
    if as_json and prompt is None:
        raise typer.BadParameter("--json needs --prompt", param_hint="--json")
    resolved = resolve_model(model, config.models_dir())
    settings = DecodeSettings(max_tokens=max_tokens, temperature=temperature, seed=seed, draft_len=draft_len)
    with _hub(hub, resolved) as (client, hub_url, wait_for_hub):
        engine = DraftEngine(resolved.path, n_threads=threads)  # loads while an embedded hub starts
        wait_for_hub()
        conversation = Conversation(engine, client, _template(engine, resolved), settings, system)
        try:
            if prompt is not None:
                _answer_once(conversation, prompt, as_json, hub_url)
            else:
                _interactive(conversation)
        finally:
            conversation.close()


@contextlib.contextmanager
def _hub(flag_url: str | None, resolved: ResolvedModel) -> Iterator[tuple[HubClient, str, Callable[[], None]]]:
    """The hub client, its URL, and a function that waits until the hub is ready."""
    address = config.hub_address(flag_url)
    if address.url:
        with HubClient(address.url, address.token, insecure=address.insecure) as client:
            yield client, address.url, lambda: None
        return
    # No hub anywhere: serve the draft's own GGUF as the target, so the pipeline runs anywhere.
    embedded = EmbeddedHub(resolved.path, config.data_dir() / "embedded-hub.log")
    with embedded:
        err.print(f"[dim]No hub configured: started an embedded hub at {embedded.url} "
                  f"(target {resolved.path.name}); use --hub or `specedge login` for a real one.[/dim]")
        with HubClient(embedded.url, embedded.token) as client:
            yield client, embedded.url, embedded.wait_ready


def _template(engine: DraftEngine, resolved: ResolvedModel) -> ChatTemplate:
    source = engine.metadata("tokenizer.chat_template") or BUILTIN_TEMPLATES[resolved.chat_template or "plain"]
    bos = engine.detokenize([engine.bos_token_id], special=True).decode("utf-8", "replace")
    add_bos = engine.metadata("tokenizer.ggml.add_bos_token") != "false"
    return ChatTemplate(source, bos_token=bos if add_bos else "", eos_token="")


class _Streamer:
    """Prints reply text as tokens are accepted, holding back incomplete UTF-8 sequences."""

    def __init__(self, conversation: Conversation):
        self._conversation = conversation
        self._tokens: list[int] = []
        self._printed = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def __call__(self, tokens: list[int]) -> None:
        stops = self._conversation.stop_token_ids
        self._tokens += [t for t in tokens if t not in stops]
        data = self._conversation.engine.detokenize(self._tokens)
        sys.stdout.write(self._decoder.decode(data[self._printed:]))
        sys.stdout.flush()
        self._printed = len(data)


def _answer_once(conversation: Conversation, prompt: str, as_json: bool, hub_url: str) -> None:
    if as_json:
        reply = conversation.ask(prompt)
        print(json.dumps(_reply_json(reply, conversation, hub_url)))
        return
    reply = conversation.ask(prompt, on_tokens=_Streamer(conversation))
    print()
    _print_figures(reply)


def _interactive(conversation: Conversation) -> None:
    err.print("[dim]Type a message; /bye or Ctrl+D to leave.[/dim]")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return
        if line.strip() == "/bye":
            return
        if not line.strip():
            continue
        reply = conversation.ask(line, on_tokens=_Streamer(conversation))
        print()
        _print_figures(reply)


def _print_figures(reply: Reply) -> None:
    stats = reply.stats
    err.print(
        f"[dim][ {stats.tokens_per_verify:.2f} tok/verify | accepted {stats.accepted_tokens}/{stats.draft_tokens} "
        f"| TTFT {stats.ttft_ms:.0f} ms | ITL {stats.itl_ms:.1f} ms | {stats.tokens_per_s:.1f} t/s ][/dim]"
    )


def _reply_json(reply: Reply, conversation: Conversation, hub_url: str) -> dict:
    return {
        "text": reply.text, "token_ids": reply.token_ids, "prompt_token_ids": reply.prompt_token_ids,
        "model": conversation.engine.path.name, "hub": hub_url, "stats": reply.stats.to_json(),
    }

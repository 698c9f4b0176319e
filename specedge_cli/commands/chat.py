"""`specedge chat`: talk to the target model, drafting locally and verifying on a hub."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, TextIO

import typer
from rich.console import Console

from specedge_cli import paths, settings
from specedge_cli.conversation import Conversation, Reply
from specedge_cli.decoding import DecodeSettings
from specedge_cli.draft_choice import choose_draft
from specedge_cli.drafting.chat_template import template_for
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.errors import ModelFileError
from specedge_cli.history import ConversationLog, History, SavedConversation, history_path
from specedge_cli.models import DEFAULT_MODEL, ResolvedModel, smallest_instruct_preset
from specedge_cli.remote.connect import HubConnection
from specedge_cli.remote.embedded import Revival
from specedge_cli.remote.session import Reconnecting, ReconnectNotice
from specedge_cli.rendering import ReplyView
from specedge_cli.repl import Repl, note_finish, print_figures
from specedge_cli.settings import chat_settings
from specedge_cli.terminal import keys_unechoed
from specedge_cli.waiting import open_hub

err = Console(stderr=True)


def chat(
    text: Annotated[
        str | None, typer.Argument(metavar="[PROMPT]", help="Answer this one prompt and exit (like --prompt).")
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option("--prompt", "-p", help="Answer this one prompt and exit; - reads it from stdin."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With a prompt: print one JSON object.")] = False,
    hub: Annotated[
        str | None, typer.Option(help="Hub URL; default: SPECEDGE_HUB, your login, or an embedded hub.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help=f"Draft model: a .gguf path or a preset name (default: {DEFAULT_MODEL})."),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", "-n", min=1, help="Most tokens in one reply (default: 256).")
    ] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="0 decodes greedily (default: 0).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Sampling seed for temperature > 0 (default: 0).")] = None,
    draft_len: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=64,
            help="Draft depth per verify; 0 follows the measured draft speed and round trip, up to 16 (default: 0).",
        ),
    ] = None,
    tree_budget: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=64,
            help="Draft a tree of up to this many nodes per verify instead of a chain (default: 0, a chain).",
        ),
    ] = None,
    proactive: Annotated[
        bool | None,
        typer.Option(
            "--proactive/--no-proactive",
            help="Draft the next round while a verify is in flight (default: on with a hub elsewhere, off with an embedded hub).",
        ),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", "-t", min=1, help="llama.cpp threads for drafting.")
    ] = None,
    resume_last: Annotated[
        bool, typer.Option("--continue", "-c", help="Continue the last saved conversation.")
    ] = False,
    conversation_id: Annotated[
        int | None,
        typer.Option("--conversation", help="Continue the saved conversation with this id (`specedge logs list`)."),
    ] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Never download a model; use what is on disk.")] = False,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow plain http to a hub on another machine (a network you trust).")
    ] = False,
) -> None:
    """Chat with the target model; given a prompt, answer once and exit.

    Piped input is the prompt, or with a prompt, context put before it: `cat notes | specedge chat "summarize"`.

    Every setting but --hub, --prompt and --json also comes from SPECEDGE_<NAME> or `specedge config set`.
    """
    prompt = one_shot_prompt(text, prompt, sys.stdin)
    if prompt is not None and not prompt.strip():
        raise typer.BadParameter("the prompt is empty (so was stdin, if piped); give one", param_hint="PROMPT")
    if as_json and prompt is None:
        raise typer.BadParameter("--json needs a prompt", param_hint="--json")
    chosen = chat_settings(
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        draft_len=draft_len,
        tree_budget=tree_budget,
        proactive=proactive,
        system=system,
        threads=threads,
        offline=offline or None,
    )
    history = History(history_path(paths.data_dir())) if chosen.logs or resume_last or conversation_id else None
    saved = _saved_conversation(history, resume_last, conversation_id)
    address = settings.hub_address(hub)
    # Without a model named, with a hub: one whose vocabulary is its target's (draft_choice).
    resolved = choose_draft(model or (saved.model if saved else None), address, insecure, chosen.offline, err)
    _note_base_model(resolved)
    decode = DecodeSettings.of_chat(chosen, hub_elsewhere=bool(address.url))
    with _leaving_on_hangup(), open_hub(address, resolved.path, insecure, err) as (connection, wait_for_hub):
        engine = DraftEngine(resolved.path, n_threads=chosen.threads or None)  # loads while an embedded hub starts
        wait_for_hub()
        hub_url = connection.url
        conversation = Conversation(
            engine,
            connection.client,
            template_for(engine.vocab, resolved),
            decode,
            saved.system if saved else chosen.system,
            on_reconnect=_on_outage(connection),
        )
        model_name = resolved.preset.name if resolved.preset else str(resolved.path.resolve())
        _keep(conversation, history if chosen.logs else None, saved, model_name, hub_url)
        try:
            if prompt is not None:
                _answer_once(conversation, prompt, as_json, hub_url)
            else:
                Repl(conversation, hub_url, auto_proactive=bool(address.url)).run()
        finally:
            conversation.close()


def _note_base_model(resolved: ResolvedModel) -> None:
    if resolved.preset and resolved.preset.base:
        err.print(
            f"[dim]{resolved.preset.name} is a pretrained base model: it continues your text rather than "
            "answering it, so it runs as plain completion (the default because it runs anywhere). For answers, "
            f"chat with an instruct model: --model {smallest_instruct_preset().name}.[/dim]"
        )


def one_shot_prompt(text: str | None, option: str | None, stdin: TextIO) -> str | None:
    """The prompt of a one-shot chat, or None for the REPL.

    `-p -` reads the prompt from stdin; otherwise piped stdin is the prompt when none is given,
    and context before the given one when one is (how `llm` and `ollama run` treat pipes).
    """
    if text is not None and option is not None:
        raise typer.BadParameter("give the prompt once: as an argument or with --prompt", param_hint="--prompt")
    given = text if text is not None else option
    if given == "-":
        return stdin.read().strip()
    if stdin is None or stdin.isatty():
        return given
    piped = stdin.read().strip()
    if given is None:
        return piped
    return f"{piped}\n\n{given}" if piped else given


def _saved_conversation(
    history: History | None, resume_last: bool, conversation_id: int | None
) -> SavedConversation | None:
    if history is None or not (resume_last or conversation_id):
        return None
    conversation_id = conversation_id or history.last_id()
    if conversation_id is None:
        err.print("[dim]No saved conversation yet: starting a new one.[/dim]")
        return None
    return history.load(conversation_id)


def _keep(
    conversation: Conversation, history: History | None, saved: SavedConversation | None, model: str, hub_url: str
) -> None:
    """Take up the saved conversation, and write new turns to the log (unless logs are off)."""
    fingerprint = conversation.vocab_fingerprint()
    if saved:
        if saved.vocab_fingerprint != fingerprint:
            raise ModelFileError(
                f"conversation {saved.id} was held with {saved.model}, whose vocabulary differs "
                f"from {conversation.engine.path.name}; run with --model {saved.model}"
            )
        conversation.restore(saved.turns)
        err.print(f"[dim]Continuing conversation {saved.id} ({len(saved.turns)} turns).[/dim]")
    if history is not None:
        conversation.log = ConversationLog(
            history, model, hub_url, conversation.system, fingerprint, saved.id if saved else None
        )


@contextlib.contextmanager
def _leaving_on_hangup() -> Iterator[None]:
    """SIGTERM, and SIGHUP (its terminal closed), end the chat as /bye does: what it is in unwinds,
    so an embedded hub (in a session of its own, out of the terminal's reach) is stopped with it."""

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    hangups = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {hangup: signal.signal(hangup, leave) for hangup in hangups}
    try:
        yield
    finally:
        for hangup, handler in previous.items():
            signal.signal(hangup, handler)


def _on_outage(connection: HubConnection) -> Callable[[Reconnecting], None]:
    """What the chat does while its hub is away: says so; an embedded hub that ended is started again."""
    notice = ReconnectNotice()
    if connection.embedded is None:
        return notice
    return Revival(connection.embedded, notice)


def _answer_once(conversation: Conversation, prompt: str, as_json: bool, hub_url: str) -> None:
    """One reply on stdout (only the reply: figures and notes go to stderr); Ctrl+C exits 130."""
    if as_json:
        reply = conversation.ask(prompt)
        print(json.dumps(_reply_json(reply, conversation, hub_url)))
    else:
        view = ReplyView.of(conversation)
        with keys_unechoed():  # typing during the reply must not land in it
            reply = conversation.ask(prompt, on_tokens=view)
        view.finish()
        print_figures(reply)
        note_finish(reply, conversation)
    if reply.interrupted:
        raise typer.Exit(130)


def _reply_json(reply: Reply, conversation: Conversation, hub_url: str) -> dict:
    return {
        "text": reply.text,
        "token_ids": reply.token_ids,
        "prompt_token_ids": reply.prompt_token_ids,
        "finish_reason": reply.finish_reason,
        "model": conversation.engine.path.name,
        "hub": hub_url,
        "stats": reply.stats.to_json(),
    }

"""The interactive side of `specedge chat`: prompts, slash commands, streaming and figures.

Ctrl+C while a reply is generated stops it (what was accepted is kept) and returns to the
prompt; Ctrl+C at the prompt clears the line, a second one in a row leaves with 130; Ctrl+D
leaves with 0.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import fields, replace

import typer
from rich.console import Console
from rich.markup import escape

from specedge_cli import settings
from specedge_cli.conversation import Conversation, Reply
from specedge_cli.decoding import LENGTH, DecodeSettings
from specedge_cli.errors import HubBusy, HubError, HubRejected, HubUnreachable, SettingError
from specedge_cli.history import ConversationLog
from specedge_cli.rendering import ReplyView
from specedge_cli.terminal import keys_unechoed

CONTEXT_TOO_LONG = "context_too_long"  # the hub's code for a conversation past the model's context
err = Console(stderr=True, highlight=False, soft_wrap=True)  # a message wraps where the terminal does, never mid-copy

HELP = """Available commands:
  /set temperature T   0 decodes greedily
  /set max-tokens N    most tokens in one reply
  /set seed N          sampling seed for temperature > 0
  /set draft-len N     draft depth per verify (0: automatic)
  /set tree-budget N   draft trees of up to N nodes (0: chains)
  /set proactive on|off|auto   draft ahead while a verify is out
  /set system TEXT     set the system prompt (starts a new conversation)
  /set verbose [off]   more figures after each reply
  /show                model, hub, its target model and settings
  /clear               start a new conversation
  /regen               answer the last prompt again
  /bye                 leave (or Ctrl+D)
  /?                   this help

Use \"\"\" to begin and end a multi-line message."""


def figures_line(reply: Reply, verbose: bool = False) -> str:
    """`[ draft 41.2 t/s | accepted 78% | 3.4 tok/verify | RTT 14 ms | 23.5 t/s ]`"""
    s = reply.stats
    parts = [
        f"draft {s.draft_tokens_per_s:.1f} t/s",
        f"accepted {s.acceptance:.0%}",
        f"{s.tokens_per_verify:.1f} tok/verify",
        f"RTT {s.median_round_trip_ms:.0f} ms",
        f"{s.tokens_per_s:.1f} t/s",
    ]
    if verbose:
        parts += [
            f"TTFT {s.ttft_ms:.0f} ms",
            f"ITL {s.itl_ms:.1f} ms",
            f"{s.verify_rounds} verifies",
            f"{s.emitted_tokens} tokens",
            f"depth {s.mean_depth:.1f}",
        ]
        if s.proactive_drafts:
            parts.append(
                f"ahead {s.proactive_hits}/{s.proactive_drafts} hit, saved {s.proactive_saved_s * 1000:.0f} ms"
            )
    return "[ " + " | ".join(parts) + " ]"


def print_figures(reply: Reply, verbose: bool = False) -> None:
    err.print(f"[dim]{figures_line(reply, verbose)}[/dim]", markup=True, soft_wrap=True)


def note_finish(
    reply: Reply, conversation: Conversation, how_to_raise: str = "--max-tokens N", how_to_start: str = ""
) -> None:
    """One dim line when the token limit or the end of the model's context cut the reply, so it
    does not pass for a complete one; `how_to_start` says how to start a new conversation, if it can."""
    if reply.finish_reason != LENGTH:
        return
    limit = conversation.settings.max_tokens
    if len(reply.token_ids) < limit:  # the hub's context ended first
        note = f"cut at the end of the context, {conversation.decoder.context_limit} tokens"
        note += f"; {how_to_start} starts a new conversation" if how_to_start else ""
    else:
        note = f"cut at the limit of {limit} tokens; {how_to_raise} for longer replies"
    err.print(f"({note})", style="dim", markup=False, highlight=False)


# The chat settings `/set` changes in a running chat: those the decode loop reads.
DECODE_FIELDS = {f.name for f in fields(DecodeSettings)} & set(settings.KEYS)
SET_KEYS = [settings.key_name(key) for key in settings.KEYS if key in DECODE_FIELDS]


class Repl:
    def __init__(self, conversation: Conversation, hub_url: str, auto_proactive: bool = True):
        self.conversation = conversation
        self.hub_url = hub_url
        self.auto_proactive = auto_proactive  # what `proactive auto` means with this hub
        self.verbose = False
        self._interrupts = 0  # Ctrl+C in a row at the prompt

    def run(self) -> None:
        _line_editing()
        err.print("[dim]Type a message; /? for help, /bye or Ctrl+D to leave.[/dim]", markup=True)
        while True:
            text = self._read()
            if text is None or text.strip() == "/bye":
                return
            if text.strip().startswith("/"):
                self._command(text.strip())
            elif text.strip():
                self._reply(functools.partial(self.conversation.ask, text))

    # --- input ------------------------------------------------------------------------------
    def _read(self) -> str | None:
        """One message (several lines between \"\"\" markers); None on Ctrl+D."""
        while True:
            try:
                line = input(">>> ")
                text = self._rest_of_block(line) if line.lstrip().startswith('"""') else line
                self._interrupts = 0
                return text
            except EOFError:
                print()
                return None
            except KeyboardInterrupt:
                self._on_prompt_interrupt()

    @staticmethod
    def _rest_of_block(first: str) -> str:
        lines = [first.lstrip()[3:]]
        while not lines[-1].rstrip().endswith('"""'):
            lines.append(input("... "))
        lines[-1] = lines[-1].rstrip()[:-3]
        return "\n".join(lines).strip("\n")

    def _on_prompt_interrupt(self) -> None:
        print()
        self._interrupts += 1
        if self._interrupts >= 2:
            raise typer.Exit(130)
        err.print("[dim]Press Ctrl+C again or Ctrl+D to leave.[/dim]", markup=True)

    # --- replies ----------------------------------------------------------------------------
    def _reply(self, ask: Callable[[ReplyView], Reply | None]) -> None:
        view = ReplyView.of(self.conversation)
        try:
            with keys_unechoed():  # typing during the reply must not land in it; it waits for the prompt
                reply = ask(view)
        except KeyboardInterrupt:  # before decoding began (opening the session)
            view.finish()
            return
        except (HubUnreachable, HubBusy) as exc:  # the conversation is kept: try again later
            view.finish()
            err.print(f"[red]Error:[/red] {escape(exc.message)}", markup=True)
            return
        except HubRejected as exc:
            if exc.code != CONTEXT_TOO_LONG:
                raise
            view.finish()  # the prompt was dropped; the conversation goes on, or /clear starts one
            err.print(f"[red]Error:[/red] {escape(exc.message)} (/clear)", markup=True)
            return
        if reply is None:
            err.print("Nothing to regenerate yet.")
            return
        view.finish()
        if reply.interrupted:
            err.print("[dim](stopped)[/dim]", markup=True)
        print_figures(reply, self.verbose)
        note_finish(reply, self.conversation, "/set max-tokens N", "/clear")

    # --- slash commands ----------------------------------------------------------------------
    def _command(self, line: str) -> None:
        name, _, argument = line.partition(" ")
        if name in ("/?", "/help"):
            print(HELP)
        elif name == "/clear":
            self._new_conversation(self.conversation.system)
            err.print("Cleared: a new conversation.")
        elif name == "/regen":
            self._reply(self.conversation.regenerate)
        elif name == "/set":
            self._set(*argument.strip().partition(" ")[::2])
        elif name == "/show":
            self._show()
        else:
            err.print(f"Unknown command {name!r}; type /? for help.")

    def _set(self, key: str, value: str) -> None:
        """Change a setting for the rest of this chat, read by the same parser as flags and config."""
        value = value.strip()
        if key == "system":
            self._new_conversation(value)
            err.print("System prompt set; a new conversation started.")
            return
        if key == "verbose":
            self.verbose = value.lower() not in ("off", "false", "0", "no")
            err.print("Set verbose.")
            return
        try:
            field = settings.field_of(key) if key else ""
            if field not in DECODE_FIELDS:
                err.print(f"Usage: /set {' | '.join(SET_KEYS)} VALUE, or /set verbose [off]; see /?")
                return
            parsed = settings.parse(field, value, f"/set {key}")
        except SettingError as exc:
            err.print(exc.message.split("; fix it")[0] + "; see /?")
            return
        if field == "proactive" and parsed is None:
            parsed = self.auto_proactive
        self.conversation.change_settings(replace(self.conversation.settings, **{field: parsed}))
        err.print(f"Set {key}.")

    def _new_conversation(self, system: str) -> None:
        self.conversation.reset(system)
        if isinstance(self.conversation.log, ConversationLog):
            self.conversation.log.new_conversation(system)

    def _show(self) -> None:
        c, s = self.conversation, self.conversation.settings
        log = c.log if isinstance(c.log, ConversationLog) else None
        saved = f"{log.conversation_id}" if log and log.conversation_id else ("new" if log else "not kept (logs off)")
        print(
            f"model        {c.engine.path}\nhub          {self.hub_url}\ntarget       {self._target()}\n"
            f"temperature  {s.temperature:g}\nmax-tokens   {s.max_tokens}\nseed         {s.seed}\n"
            f"draft-len    {s.draft_len or f'auto (now {c.planner.depth})'}\n"
            f"proactive    {'on' if s.proactive else 'off'}\nsystem       {c.system or '(none)'}\n"
            f"verbose      {'on' if self.verbose else 'off'}\nconversation {saved} ({len(c.turns)} turns)"
        )

    def _target(self) -> str:
        try:
            return self.conversation.hub.info().model
        except HubError as exc:
            return f"(unknown: {exc.message})"


def _line_editing() -> None:
    """Arrow keys and history at the prompt, where the terminal has them."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (input() uses it once imported)
        except ImportError:
            pass

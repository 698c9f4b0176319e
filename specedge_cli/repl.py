"""The interactive side of `specedge chat`: prompts, slash commands, streaming and figures.

Ctrl+C while a reply is generated stops it (what was accepted is kept) and returns to the
prompt; Ctrl+C at the prompt clears the line, a second one in a row leaves with 130; Ctrl+D
leaves with 0.
"""

from __future__ import annotations

import codecs
import sys
from dataclasses import replace

import typer
from rich.console import Console

from specedge_cli.decoding import Conversation, Reply
from specedge_cli.errors import HubBusy, HubUnreachable

err = Console(stderr=True, highlight=False)

HELP = """Available commands:
  /set temperature T   0 decodes greedily
  /set max-tokens N    most tokens in one reply
  /set system TEXT     set the system prompt (starts a new conversation)
  /set verbose [off]   more figures after each reply
  /show                model, hub and settings
  /clear               start a new conversation
  /regen               answer the last prompt again
  /bye                 leave (or Ctrl+D)
  /?                   this help

Use \"\"\" to begin and end a multi-line message."""


class Streamer:
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
        sys.stdout.write(self._decoder.decode(data[self._printed :]))
        sys.stdout.flush()
        self._printed = len(data)


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


class Repl:
    def __init__(self, conversation: Conversation, hub_url: str):
        self.conversation = conversation
        self.hub_url = hub_url
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
                self._reply(lambda on_tokens, text=text: self.conversation.ask(text, on_tokens))

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
    def _reply(self, ask) -> None:
        try:
            reply = ask(Streamer(self.conversation))
        except KeyboardInterrupt:  # before decoding began (opening the session)
            print()
            return
        except (HubUnreachable, HubBusy) as exc:  # the conversation is kept: try again later
            print()
            err.print(f"[red]Error:[/red] {exc.message}", markup=True)
            return
        print()
        if reply is None:
            err.print("Nothing to regenerate yet.")
            return
        if reply.interrupted:
            err.print("[dim](stopped)[/dim]", markup=True)
        print_figures(reply, self.verbose)

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
        settings = self.conversation.settings
        try:
            if key == "temperature":
                self.conversation.change_settings(replace(settings, temperature=_at_least(float(value), 0.0)))
            elif key == "max-tokens":
                self.conversation.change_settings(replace(settings, max_tokens=int(_at_least(int(value), 1))))
            elif key == "system":
                self._new_conversation(value.strip())
                err.print("System prompt set; a new conversation started.")
                return
            elif key == "verbose":
                self.verbose = value.strip().lower() not in ("off", "false", "0", "no")
            else:
                err.print("Usage: /set temperature T | max-tokens N | system TEXT | verbose [off]")
                return
        except ValueError:
            err.print(f"{value!r} is not a valid {key}; see /?")
            return
        err.print(f"Set {key}.")

    def _new_conversation(self, system: str) -> None:
        self.conversation.reset(system)
        if self.conversation.log is not None:
            self.conversation.log.new_conversation(system)

    def _show(self) -> None:
        c, s = self.conversation, self.conversation.settings
        log = c.log
        saved = f"{log.conversation_id}" if log and log.conversation_id else ("new" if log else "not kept (logs off)")
        print(
            f"model        {c.engine.path}\nhub          {self.hub_url}\n"
            f"temperature  {s.temperature:g}\nmax-tokens   {s.max_tokens}\nseed         {s.seed}\n"
            f"draft-len    {s.draft_len or f'auto (now {c.planner.depth})'}\n"
            f"proactive    {'on' if s.proactive else 'off'}\nsystem       {c.system or '(none)'}\n"
            f"verbose      {'on' if self.verbose else 'off'}\nconversation {saved} ({len(c.turns)} turns)"
        )


def _at_least(value, low):
    if value < low:
        raise ValueError(value)
    return value


def _line_editing() -> None:
    """Arrow keys and history at the prompt, where the terminal has them."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (input() uses it once imported)
        except ImportError:
            pass

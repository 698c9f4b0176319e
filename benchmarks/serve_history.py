"""What a chat sent back whole costs `specedge serve` to lay out: at once, and turn by turn.

    .venv/bin/python benchmarks/serve_history.py [--model PRESET_OR_GGUF] [--exchanges 500 2000 20000]

A request to `/v1/chat/completions` carries the whole conversation; a drafting context that does
not hold it rebuilds its token history from the text. Turn by turn (`Conversation.add_exchange`,
as `specedge chat` lays out each new turn) renders the chat template over every message so far
for each turn: quadratic. `serve/layout.py` renders it once: linear. Short messages ("user 17",
"assistant 17") under the model's own chat template; the turn-by-turn layout is timed only up to
2,000 exchanges. No hub is involved: nothing here reaches one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from specedge_cli import paths
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import template_for
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.models import DEFAULT_MODEL, resolve_model
from specedge_cli.remote.client import HubClient
from specedge_cli.serve.layout import take_up_exchanges

TURN_BY_TURN_UP_TO = 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--exchanges", type=int, nargs="+", default=[500, 2000, 20000])
    args = parser.parse_args()
    resolved = resolve_model(args.model, paths.models_dir(), offline=True)
    engine = DraftEngine(resolved.path, n_ctx=512, n_threads=1)
    template = template_for(engine.vocab, resolved)
    with HubClient("http://127.0.0.1:9") as unused_hub:

        def conversation() -> Conversation:
            return Conversation(engine, unused_hub, template, DecodeSettings(), vocab_fingerprint="unused")

        print(f"model {Path(resolved.path).name}; seconds to lay out N exchanges and the next prompt")
        print(f"{'exchanges':>9} {'tokens':>9} {'at once':>8} {'turn by turn':>13}")
        for count in args.exchanges:
            exchanges = [(f"user {i}", f"assistant {i}") for i in range(count)]
            at_once = conversation()
            started = time.perf_counter()
            take_up_exchanges(at_once, exchanges, "and now?")
            once_s = time.perf_counter() - started
            by_turn = "-"
            if count <= TURN_BY_TURN_UP_TO:
                started = time.perf_counter()
                one_by_one = conversation()
                for user, reply in exchanges:
                    one_by_one.add_exchange(user, reply)
                by_turn = f"{time.perf_counter() - started:.2f}"
                assert one_by_one.history == at_once.history
            print(f"{count:>9,} {len(at_once.history):>9,} {once_s:>8.2f} {by_turn:>13}")


if __name__ == "__main__":
    main()

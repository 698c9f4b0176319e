"""Tokens per verify with a JSON schema against the same prompts unconstrained, through a real hub.

    .venv/bin/python benchmarks/grammar_acceptance.py --target T.gguf --draft D.gguf [--max-tokens 96]
        [--temperature 0] [--depth 0] [--hub URL]

Asks the ten JSON questions of tests/test_grammar_qwen.py through a hub on loopback (or --hub), each
once free and once under its schema (`response_format: json_schema` as `specedge serve` compiles
it), and prints tokens per verify of each. A grammar only removes drafts the target cannot take,
and the draft drafts under it too, so acceptance under a schema should be at least as high.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specedge_bench.local_hub import LocalHub
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import template_for
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.models import resolve_model
from specedge_cli.remote.client import HubClient
from specedge_common.grammar import json_schema_grammar
from tests.test_grammar_qwen import ASKS, SCHEMAS


def answer(engine, client, template, settings: DecodeSettings, prompt: str):
    conversation = Conversation(engine, client, template, settings)
    reply = conversation.ask(prompt)
    conversation.close()
    return reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True, type=Path)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--depth", type=int, default=0, help="a chain this long (0: chosen from timings)")
    parser.add_argument("--hub", default="", help="a hub already serving the target (else one is started)")
    args = parser.parse_args()
    engine = DraftEngine(args.draft, n_ctx=2048)
    template = template_for(engine.vocab, resolve_model(str(args.draft), args.draft.parent))
    base = DecodeSettings(max_tokens=args.max_tokens, temperature=args.temperature, seed=3, draft_len=args.depth)
    started = LocalHub.maybe(None if args.hub else args.target, args.draft, "auto", max_batch=1, dtype="float32")
    totals = {"free": [0, 0], "schema": [0, 0]}  # tokens, verifies
    with started as hub, HubClient(args.hub or hub.url) as client:  # type: ignore[union-attr]
        for name, schema in SCHEMAS.items():
            row = {}
            for kind, grammar in (("free", ""), ("schema", json_schema_grammar(schema))):
                settings = DecodeSettings(**{**vars(base), "grammar": grammar})
                reply = answer(engine, client, template, settings, ASKS[name])
                totals[kind][0] += len(reply.token_ids)
                totals[kind][1] += reply.stats.verify_rounds
                row[kind] = (len(reply.token_ids), reply.stats.verify_rounds)
            print(
                f"{name:<10} free {row['free'][0]:3d} tokens / {row['free'][1]:2d} verifies"
                f"   schema {row['schema'][0]:3d} tokens / {row['schema'][1]:2d} verifies"
            )
    per_verify = {kind: tokens / verifies for kind, (tokens, verifies) in totals.items()}
    print(f"tokens per verify: free {per_verify['free']:.2f}, under the schemas {per_verify['schema']:.2f}")
    print(json.dumps({"tokens_per_verify": per_verify, "totals": totals}))


if __name__ == "__main__":
    main()

"""Chain against tree drafts through a real hub: tokens per verify at equal draft nodes.

    .venv/bin/python benchmarks/draft_shapes.py --target T.gguf --draft D.gguf [--nodes 8 16] [--max-tokens 64]

Starts a hub on loopback (the target), drafts with llama.cpp (the draft), answers the shipped
bench prompts greedily with each draft shape, and prints tokens per verify and the hub's mean
busy time per verify for each shape. Every shape's output is checked to be identical (lossless).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx

from hub_server.bench import _scrape, load_prompts
from hub_server.local_hub import LocalHub
from specedge_cli.decoding import Conversation, DecodeSettings
from specedge_cli.drafting.chat_template import BUILTIN_TEMPLATES, ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote.client import HubClient


def shapes(nodes: int) -> dict[str, DecodeSettings]:
    return {
        f"chain{nodes}": DecodeSettings(max_tokens=0, draft_len=nodes),
        f"tree{nodes}-w2": DecodeSettings(max_tokens=0, draft_len=nodes, tree_budget=nodes, tree_width=2),
        f"tree{nodes}-w3": DecodeSettings(max_tokens=0, draft_len=nodes, tree_budget=nodes, tree_width=3),
    }


def run_shape(engine, client, template, settings, prompts) -> dict:
    with httpx.Client(base_url=client.base_url) as http:
        before = _scrape(http)
        replies = _answer(engine, client, template, settings, prompts)
        after = _scrape(http)
    rounds = sum(r.stats.verify_rounds for r in replies)
    busy = after["specedge_device_busy_seconds_total"] - before["specedge_device_busy_seconds_total"]
    return {
        "tokens_per_verify": sum(len(r.token_ids) for r in replies) / rounds,
        "hub_ms_per_verify": 1000 * busy / rounds,
        "tokens": [r.token_ids for r in replies],
    }


def _answer(engine, client, template, settings, prompts):
    replies = []
    for prompt in prompts:
        conversation = Conversation(engine, client, template, settings)
        replies.append(conversation.ask(prompt))
        conversation.close()
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True, type=Path)
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    prompts = load_prompts()
    results = {}
    with LocalHub.maybe(args.target, args.draft, "auto", max_batch=1) as hub, HubClient(hub.url) as client:
        engine = DraftEngine(args.draft, n_threads=1)
        bos = engine.detokenize([engine.bos_token_id], special=True).decode()
        template = ChatTemplate("{{ bos_token }}{{ messages[-1].content }}", bos_token=bos, eos_token="")
        for nodes in args.nodes:
            for name, settings in shapes(nodes).items():
                settings = DecodeSettings(max_tokens=args.max_tokens, draft_len=settings.draft_len,
                                          tree_budget=settings.tree_budget, tree_width=settings.tree_width)
                results[name] = run_shape(engine, client, template, settings, prompts)
    reference = next(iter(results.values()))["tokens"]
    lossless = all(r["tokens"] == reference for r in results.values())
    for name, r in results.items():
        print(f"{name:<12} {r['tokens_per_verify']:6.2f} tok/verify   hub {r['hub_ms_per_verify']:7.1f} ms/verify")
    print(f"identical output across shapes: {lossless}")
    print(json.dumps({name: {k: v for k, v in r.items() if k != "tokens"} for name, r in results.items()}))


if __name__ == "__main__":
    main()

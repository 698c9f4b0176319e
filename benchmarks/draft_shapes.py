"""Chain against tree drafts, with and without proactive drafting, through a real hub.

    .venv/bin/python benchmarks/draft_shapes.py --target T.gguf --draft D.gguf [--nodes 8 16] [--max-tokens 64]
        [--temperature 0] [--prompts N] [--depth D] [--device cpu|cuda]

Starts a hub on loopback (the target), drafts with llama.cpp (the draft), answers the shipped
bench prompts with each draft shape, and prints for each: tokens per verify, the hub's mean busy
time per verify (equal node counts cost the hub about the same), ITL, and how often the
proactive draft's guess came true. Every shape's output is checked to be identical (lossless).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from specedge_bench.config import load_prompts
from specedge_bench.local_hub import LocalHub
from specedge_bench.metrics import MetricsPage
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote.client import HubClient
from specedge_common.metric_names import DEVICE_BUSY_SECONDS


def chains(depth: int) -> dict[str, DecodeSettings]:
    """A chain of `depth` tokens, drafted only after each reply and drafted proactively."""
    return {
        f"chain{depth}-plain": DecodeSettings(draft_len=depth, proactive=False),
        f"chain{depth}": DecodeSettings(draft_len=depth),
    }


def shapes(nodes: int) -> dict[str, DecodeSettings]:
    """Equal hub cost on a CPU: every shape sends at most `nodes` draft tokens per verify."""
    return chains(nodes) | {
        f"tree{nodes}-w{width}": DecodeSettings(draft_len=nodes, tree_budget=nodes, tree_width=width)
        for width in (2, 4)
    }


def level_shapes(depth: int, budgets: list[int]) -> dict[str, DecodeSettings]:
    """Equal draft decodes: a chain of `depth` tokens and trees of `depth` levels, `budgets` nodes."""
    return chains(depth) | {
        f"tree{budget}-d{depth}-w4": DecodeSettings(draft_len=depth, tree_budget=budget, tree_width=4)
        for budget in budgets
    }


def run_shape(engine, client, template, settings, prompts) -> dict:
    tally = replace(engine.acceptance.branching)
    before = MetricsPage.parse(client.metrics())
    replies = _answer(engine, client, template, settings, prompts)
    busy = MetricsPage.parse(client.metrics()).since(before).value(DEVICE_BUSY_SECONDS)
    drafts = engine.acceptance.branching.drafts - tally.drafts
    rounds = sum(r.stats.verify_rounds for r in replies)
    ahead = sum(r.stats.proactive_drafts for r in replies)
    return {
        "tokens_per_verify": sum(len(r.token_ids) for r in replies) / rounds,
        "hub_ms_per_verify": 1000 * busy / rounds,
        "itl_ms": sum(r.stats.itl_ms for r in replies) / len(replies),
        "proactive_hit_rate": sum(r.stats.proactive_hits for r in replies) / ahead if ahead else 0.0,
        "draft_wait_ms_per_verify": 1000 * sum(r.stats.draft_wait_s for r in replies) / rounds,
        # Drafts that sent a second choice somewhere, and drafts where the target took one.
        "branched": (engine.acceptance.branching.branched - tally.branched) / drafts if drafts else 0.0,
        "branch_taken": (engine.acceptance.branching.taken - tally.taken) / drafts if drafts else 0.0,
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
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--prompts", type=int, default=0, help="use the first N shipped prompts (0: all)")
    parser.add_argument(
        "--depth", type=int, default=0, help="trees of this many levels with --nodes nodes, against a chain this deep"
    )
    parser.add_argument("--device", default="auto", help="the hub's device")
    args = parser.parse_args()
    prompts = load_prompts()[: args.prompts or None]
    results = {}
    with (
        LocalHub.maybe(args.target, args.draft, args.device, max_batch=1, dtype="float32") as hub,
        HubClient(hub.url) as client,
    ):
        engine = DraftEngine(args.draft, n_threads=1)
        bos = engine.vocab.detokenize([engine.vocab.bos_token_id], special=True).decode()
        template = ChatTemplate("{{ bos_token }}{{ messages[-1].content }}", bos_token=bos, eos_token="")
        chosen = (
            level_shapes(args.depth, args.nodes)
            if args.depth
            else {name: settings for nodes in args.nodes for name, settings in shapes(nodes).items()}
        )
        for name, settings in chosen.items():
            settings = replace(settings, max_tokens=args.max_tokens, temperature=args.temperature, seed=7)
            results[name] = run_shape(engine, client, template, settings, prompts)
    reference = next(iter(results.values()))["tokens"]
    lossless = all(r["tokens"] == reference for r in results.values())
    for name, r in results.items():
        print(
            f"{name:<14} {r['tokens_per_verify']:6.2f} tok/verify   hub {r['hub_ms_per_verify']:7.1f} ms/verify   "
            f"ITL {r['itl_ms']:6.1f} ms   draft wait {r['draft_wait_ms_per_verify']:5.1f} ms/verify   "
            f"proactive hits {r['proactive_hit_rate']:.0%}   branched {r['branched']:.0%}, taken {r['branch_taken']:.0%}"
        )
    print(f"identical output across shapes: {lossless}")
    print(json.dumps({name: {k: v for k, v in r.items() if k != "tokens"} for name, r in results.items()}))


if __name__ == "__main__":
    main()

"""One user's inter-token latency: edge drafting through the hub against the hub's own speculative mode.

    .venv/bin/python benchmarks/edge_itl.py --target T.gguf --draft D.gguf [--rtt-ms 14] [--max-tokens 64] [--prompts N]

Starts a hub on loopback pinned to half the cores (the edge drafts on the other half), emulates
the link by sleeping half the round trip before and after every request, and answers the
shipped bench prompts greedily, one user at a time:
  edge (auto, proactive)   the real client: adaptive depth, proactive drafting
  edge chain8              the real client with a fixed 8-token chain, no proactive drafting
  server-only spec k=K     the hub drafts with its own copy of the draft and verifies (streamed)
ITL is measured the same way for all: (time of the last token - time of the first) / (tokens
after the first emission). Every output is checked against the others (lossless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

from specedge_bench.config import BenchConfig, load_prompts
from specedge_bench.local_hub import LocalHub
from specedge_bench.users import ClientRecord, SimulatedUser
from specedge_cli.conversation import Conversation
from specedge_cli.decoding import DecodeSettings
from specedge_cli.drafting.chat_template import ChatTemplate
from specedge_cli.drafting.engine import DraftEngine
from specedge_cli.remote.client import HubClient


class SlowLink:
    """A HubClient behind an emulated round-trip time."""

    def __init__(self, client: HubClient, rtt_ms: float):
        self._client, self._half_s = client, rtt_ms / 2000

    def __getattr__(self, name):
        return getattr(self._client, name)

    def _slow(self, call, *args, **kwargs):
        time.sleep(self._half_s)
        result = call(*args, **kwargs)
        time.sleep(self._half_s)
        return result

    def open_session(self, request):
        return self._slow(self._client.open_session, request)

    def feed(self, session_id, tokens):
        return self._slow(self._client.feed, session_id, tokens)

    def verify(self, session_id, tokens, draft, parents=None):
        return self._slow(self._client.verify, session_id, tokens=tokens, draft=draft, parents=parents)


class Emissions:
    """Times and sizes of what reached the user."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.sizes: list[int] = []

    def __call__(self, tokens: list[int]) -> None:
        self.times.append(time.perf_counter())
        self.sizes.append(len(tokens))

    def itl_ms(self) -> float:
        after_first = sum(self.sizes[1:])
        return 1000 * (self.times[-1] - self.times[0]) / after_first if after_first else 0.0


def edge(engine, link, template, settings, prompts) -> dict:
    itl, tokens, rounds, emitted, ahead, hits = [], [], 0, 0, 0, 0
    for prompt in prompts:
        conversation = Conversation(engine, link, template, settings)
        emissions = Emissions()
        reply = conversation.ask(prompt, on_tokens=emissions)
        conversation.close()
        itl.append(emissions.itl_ms())
        tokens.append(reply.token_ids)
        rounds += reply.stats.verify_rounds
        emitted += len(reply.token_ids)
        ahead += reply.stats.proactive_drafts
        hits += reply.stats.proactive_hits
    return {
        "itl_ms": statistics.fmean(itl),
        "tokens_per_verify": emitted / rounds,
        "proactive_hit_rate": hits / ahead if ahead else 0.0,
        "tokens": tokens,
    }


def server_only(engine, client: HubClient, args: argparse.Namespace, prompt_tokens, draft_len: int) -> dict:
    """The hub's own speculative decoding, one prompt at a time, as the bench's simulated user
    asks for it (streamed, behind the same emulated round trip)."""
    config = BenchConfig(client.base_url, args.draft, 1, args.rtt_ms, args.max_tokens, draft_len, ())
    user = SimulatedUser(0, config, None, client.info(), frozenset(engine.vocab.stop_token_ids()))
    itl, tokens = [], []
    for prompt in prompt_tokens:
        user.record = ClientRecord()
        tokens.append(user.answer(client, "server_only_spec", prompt))
        # Its per-token ITL after the first chunk, averaged: (last - first emission) / tokens after the first.
        itl.append(statistics.fmean(user.record.step_itl_ms) if user.record.step_itl_ms else 0.0)
    return {"itl_ms": statistics.fmean(itl), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True, type=Path)
    parser.add_argument("--rtt-ms", type=float, default=14.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=0, help="use the first N shipped prompts (0: all)")
    parser.add_argument("--server-draft-len", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()
    prompts = load_prompts()[: args.prompts or None]
    results = {}
    with LocalHub.maybe(args.target, args.draft, "auto", max_batch=1) as hub, HubClient(hub.url) as client:
        engine = DraftEngine(args.draft, n_threads=len(os.sched_getaffinity(0)))  # the cores the hub left us
        bos = engine.vocab.detokenize([engine.vocab.bos_token_id], special=True).decode()
        template = ChatTemplate("{{ bos_token }}{{ messages[-1].content }}", bos_token=bos, eos_token="")
        link = SlowLink(client, args.rtt_ms)
        auto = DecodeSettings(max_tokens=args.max_tokens)
        edge(engine, link, template, auto, prompts[:1])  # warm-up: caches, first timings
        results["edge (auto, proactive)"] = edge(engine, link, template, auto, prompts)
        results["edge chain8"] = edge(engine, link, template, replace(auto, draft_len=8, proactive=False), prompts)
        prompt_tokens = [engine.vocab.tokenize(bos + p, add_bos=False) for p in prompts]
        for k in args.server_draft_len:
            results[f"server-only spec k={k}"] = server_only(engine, client, args, prompt_tokens, k)
    reference = results["edge (auto, proactive)"]["tokens"]
    best_server = min((r["itl_ms"] for name, r in results.items() if name.startswith("server")), default=0.0)
    for name, r in results.items():
        extra = (
            f"   {r['tokens_per_verify']:.2f} tok/verify   proactive hits {r['proactive_hit_rate']:.0%}"
            if "tokens_per_verify" in r
            else ""
        )
        print(f"{name:<24} ITL {r['itl_ms']:6.1f} ms{extra}")
    edge_itl = results["edge (auto, proactive)"]["itl_ms"]
    print(f"identical output: {all(r['tokens'] == reference for r in results.values())}")
    print(f"ITL edge / best server-only speculative: {edge_itl / best_server:.3f}")
    print(
        json.dumps(
            {
                "rtt_ms": args.rtt_ms,
                "itl_vs_server_only_spec": edge_itl / best_server,
                "modes": {n: {k: v for k, v in r.items() if k != "tokens"} for n, r in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()

"""What every run of one bench shares: the prompts, the target's own replies and the edges."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from hub_server.engine.drafter import HubDrafter
from specedge_bench.config import MODES, BenchConfig
from specedge_bench.edges import EmulatedEdges
from specedge_bench.errors import BenchRefused
from specedge_bench.users import SimulatedUser, connect, run_all
from specedge_cli.remote import protocol as wire


@dataclass
class Workload:
    """The prompts, their target replies and the edges, shared by every run of one bench."""

    prompt_tokens: list[list[int]]
    replies: dict[tuple[int, ...], list[int]]  # the target's own greedy reply to each prompt
    edges: EmulatedEdges
    stop_ids: frozenset[int]


def hub_info(config: BenchConfig) -> wire.HubInfo:
    """The hub's /v1/info; a refusal (no token, a revoked one) raises the client's HubError."""
    with connect(config) as client:
        return client.info()


def check_hub(info: wire.HubInfo, drafter: HubDrafter, modes: tuple[str, ...]) -> None:
    """Refuse, before any run, a draft whose vocabulary is not the target's (its drafts would be
    another model's token ids: lossless still, but every figure meaningless) and a mode the hub
    does not serve."""
    if drafter.vocab_fingerprint() != info.vocab_fingerprint:
        raise BenchRefused(
            f"the draft {drafter.name} has another vocabulary than the hub's target "
            f"{info.model}: pass the --draft that goes with that target"
        )
    if "server_only_spec" in modes and "speculative" not in info.modes:
        raise BenchRefused(
            f"the hub serving {info.model} has no draft model of its own, so it cannot run "
            "server_only_spec: pass --modes specedge,autoregressive, or start it with --draft"
        )


def prepare_workload(config: BenchConfig, modes: tuple[str, ...] = MODES) -> Workload:
    """Check that the hub can run `modes` with this draft, ask it for each prompt's reply
    (autoregressive, untimed) and draft along every reply."""
    info = hub_info(config)  # before loading the draft: a hub that refuses says so at once
    drafter = HubDrafter(config.draft, n_threads=1)
    check_hub(info, drafter, modes)
    prompt_tokens = [drafter.tokenize(p) for p in config.prompts]
    stop_ids = drafter.stop_token_ids()
    reference = SimulatedUser(0, config, None, info, stop_ids)
    run_all([partial(reference.run, "autoregressive", [p]) for p in prompt_tokens])
    edges = EmulatedEdges(drafter, config.edge_tps)
    edges.prepare([list(p) + r[:i] for p, r in reference.replies.items() for i in range(len(r))], config.draft_len)
    return Workload(prompt_tokens, reference.replies, edges, stop_ids)

"""What one bench run is asked to measure, and the prompts it ships with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

MODES = ("specedge", "server_only_spec", "autoregressive")

# The paper's prices (SpecEdge, arXiv 2505.17052): a server A100-40GB and an edge RTX 4090.
SERVER_PRICE_PER_HOUR = 4.05
EDGE_PRICE_PER_HOUR = 0.35


@dataclass(frozen=True)
class BenchConfig:
    hub_url: str
    draft: Path
    clients: int
    rtt_ms: float
    max_tokens: int
    draft_len: int
    prompts: tuple[str, ...]
    edge_tps: float = 0.0  # each emulated edge's draft speed; 0: the speed measured here
    token: str | None = None  # API token for a hub that needs one
    proactive: bool = True  # edges draft ahead while a verify is out, as `specedge chat` does
    server_price_per_hour: float = SERVER_PRICE_PER_HOUR  # $ per hour of hub busy time
    edge_price_per_hour: float = EDGE_PRICE_PER_HOUR  # $ per hour of an edge device's drafting


def load_prompts() -> tuple[str, ...]:
    """The shipped bench prompts, in order."""
    text = resources.files("specedge_bench").joinpath("bench_prompts.json").read_text()
    return tuple(item["prompt"] for item in json.loads(text))

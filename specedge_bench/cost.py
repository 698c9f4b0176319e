"""What a mode's tokens cost: the paper's cost efficiency.

Cost efficiency = tokens / (server $/s x server time + edge $/s x edge busy time) (SpecEdge,
arXiv 2505.17052). Server time here is the hub's busy time, the same seconds server throughput
divides by (a shared hub serves others while idle); edge busy time is each SpecEdge user's
device drafting, drafts made ahead and thrown away included. Server-only modes use no edge.
"""

from __future__ import annotations

from typing import Any


def mode_cost(tokens: int, server_s: float, edge_s: float, server_per_hour: float, edge_per_hour: float) -> dict:
    """Dollars, tokens per dollar and dollars per million tokens of one mode's run."""
    server_usd = server_s * server_per_hour / 3600
    edge_usd = edge_s * edge_per_hour / 3600
    total = server_usd + edge_usd
    return {
        "server_s": round(server_s, 3),
        "edge_busy_s": round(edge_s, 3),
        "server_usd": server_usd,
        "edge_usd": edge_usd,
        "tokens_per_dollar": round(tokens / total, 1) if total else 0.0,
        "usd_per_million_tokens": round(1e6 * total / tokens, 4) if tokens else 0.0,
    }


def cost_ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """SpecEdge's tokens per dollar against each baseline that ran (the paper's 1.91x is against
    server-only speculative decoding)."""
    spec = results.get("specedge")
    ratios: dict[str, float] = {}
    if not spec:
        return ratios
    for mode in ("server_only_spec", "autoregressive"):
        other = results.get(mode)
        if other and other["cost"]["tokens_per_dollar"]:
            ratio = spec["cost"]["tokens_per_dollar"] / other["cost"]["tokens_per_dollar"]
            ratios[f"cost_efficiency_vs_{mode}"] = round(ratio, 3)
    return ratios

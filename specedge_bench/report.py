"""What the operator reads: a table per run on stderr, and a PNG plot over the client counts."""

from __future__ import annotations

from pathlib import Path

from specedge_bench.config import MODES


def table(run: dict) -> str:
    """One run's figures, a line per mode, then proactive drafting, cost, ratios and the bound."""
    config = run["config"]
    rows = [
        f"clients={config['clients']} rtt={config['rtt_ms']:g}ms target={config['target']} "
        f"draft={config['draft']} edge={config['edge_tps']:g} t/s",
        f"{'mode':<18}{'server t/s':>11}{'wall t/s':>10}{'tok/verify':>11}{'ITL ms':>9}{'ITL p95':>9}"
        f"{'TTFT ms':>9}{'busy':>7}{'$/Mtok':>9}  lossless",
    ]
    for mode, m in run["modes"].items():
        rows.append(
            f"{mode:<18}{m['server_throughput']:>11.1f}{m['wall_throughput']:>10.1f}{m['tokens_per_verify']:>11.2f}"
            f"{m['itl_ms_mean']:>9.1f}{m['itl_ms_p95']:>9.1f}{m['ttft_ms_mean']:>9.0f}{m['hub_busy_fraction']:>7.0%}"
            f"{m['cost']['usd_per_million_tokens']:>9.2f}  {m['lossless']}"
        )
    ahead = run["modes"].get("specedge", {})
    if ahead.get("proactive_drafts"):
        rows.append(
            f"specedge drafts made ahead while a verify was out: {ahead['proactive_drafts']:g}, "
            f"sent {ahead['proactive_hit_rate']:.0%}"
        )
    rows.append(
        f"cost: server ${config['server_price_per_hour']:g}/h of hub busy time, "
        f"edge ${config['edge_price_per_hour']:g}/h of drafting"
    )
    rows.append(f"ratios: {run['ratios']}  bound: {run['bound']}")
    return "\n".join(rows)


def plot(runs: list[dict], path: Path) -> None:
    """Server throughput and mean ITL by client count, a line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [run["config"]["clients"] for run in runs]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        if mode in runs[0]["modes"]:
            left.plot(clients, [r["modes"][mode]["server_throughput"] for r in runs], marker="o", label=mode)
            right.plot(clients, [r["modes"][mode]["itl_ms_mean"] for r in runs], marker="o", label=mode)
    left.set(xlabel="clients", ylabel="server throughput (tokens / hub-busy s)", title="Throughput")
    right.set(xlabel="clients", ylabel="mean ITL (ms)", title="Inter-token latency")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    first = runs[0]["config"]
    figure.suptitle(f"{first['target']} / {first['draft']}, RTT {first['rtt_ms']:g} ms")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

"""Draw the Grafana dashboard (docs/grafana-dashboard.json) from a real run's scraped /metrics pages.

    .venv/bin/python benchmarks/soak.py --minutes 10 --scrape-to scrapes.jsonl
    .venv/bin/python benchmarks/dashboard.py scrapes.jsonl --out docs/grafana-dashboard.png

Grafana itself is not installable here (no Debian package, no offline image), so this draws what
Grafana would: every panel of the dashboard JSON at its grid position, with its title, unit and
legends, each target's PromQL expression evaluated over the recorded pages. It evaluates only the
forms the dashboard uses (`name`, `rate(name[1m])`, `sum [by (labels)] (...)`,
`histogram_quantile(q, ...)`, `a / b`), the way Prometheus does (a rate from the first and last
samples inside its window, without Prometheus's extrapolation to the window's edges; quantiles
interpolated within a bucket); an expression outside them is an error, never skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
Vector = dict[Labels, float]


def load_scrapes(path: Path) -> list[tuple[float, dict[str, Vector]]]:
    """[(seconds since start, {series name: {labels: value}})] of every recorded page."""
    scrapes = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        series: dict[str, Vector] = defaultdict(dict)
        for family in text_string_to_metric_families(record["page"]):
            for sample in family.samples:
                series[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
        scrapes.append((record["t"], dict(series)))
    return scrapes


# --- a small PromQL: only what the dashboard uses ------------------------------------------
TOKEN = re.compile(r"\s*(\d+\.\d+|\d+|[A-Za-z_:][A-Za-z0-9_:]*|\[\d+[smh]\]|[(),/])")


def tokens(expr: str) -> list[str]:
    out, at = [], 0
    while at < len(expr.rstrip()):
        match = TOKEN.match(expr, at)
        if not match:
            raise ValueError(f"cannot read {expr[at:]!r} in {expr!r}")
        out.append(match.group(1))
        at = match.end()
    return out


class Evaluator:
    """Evaluates one expression at scrape `index` of `scrapes`."""

    def __init__(self, scrapes: list[tuple[float, dict[str, Vector]]]):
        self.scrapes = scrapes

    def at(self, expr: str, index: int) -> Vector:
        parts = tokens(expr)
        value, rest = self._expr(parts, index)
        if rest:
            raise ValueError(f"unexpected {rest} in {expr!r}")
        return value

    def _expr(self, parts: list[str], index: int) -> tuple[Vector, list[str]]:
        left, rest = self._term(parts, index)
        while rest and rest[0] == "/":
            right, rest = self._term(rest[1:], index)
            left = {labels: left[labels] / right[labels] for labels in left if right.get(labels)}
        return left, rest

    def _term(self, parts: list[str], index: int) -> tuple[Vector, list[str]]:
        head, rest = parts[0], parts[1:]
        if head == "(":
            value, rest = self._expr(rest, index)
            return value, _expect(rest, ")")
        if head == "rate":
            name, window, rest = rest[1], rest[2], _expect(rest[3:], ")")
            return self._rate(name, _seconds(window), index), rest
        if head == "sum":
            by: list[str] = []
            if rest[0] == "by":
                close = rest.index(")")
                by, rest = [p for p in rest[2:close] if p != ","], rest[close + 1 :]
            value, rest = self._term(rest, index)
            return _sum_by(value, by), rest
        if head == "histogram_quantile":
            quantile = float(rest[1])
            value, rest = self._expr(_expect(rest[2:], ","), index)
            return _quantiles(quantile, value), _expect(rest, ")")
        return dict(self.scrapes[index][1].get(head, {})), rest

    def _rate(self, name: str, window_s: float, index: int) -> Vector:
        now_t, now = self.scrapes[index][0], self.scrapes[index][1].get(name, {})
        # The first sample inside the window (as Prometheus, but without extrapolating to its edges).
        inside = [i for i in range(index) if self.scrapes[i][0] >= now_t - window_s]
        if not inside:
            return {}
        then_t, then = self.scrapes[inside[0]][0], self.scrapes[inside[0]][1].get(name, {})
        return {labels: max(0.0, value - then.get(labels, 0.0)) / (now_t - then_t) for labels, value in now.items()}


def _expect(parts: list[str], token: str) -> list[str]:
    if not parts or parts[0] != token:
        raise ValueError(f"expected {token!r}, found {parts[:1]}")
    return parts[1:]


def _seconds(window: str) -> float:
    return float(window[1:-2]) * {"s": 1, "m": 60, "h": 3600}[window[-2]]


def _sum_by(vector: Vector, by: list[str]) -> Vector:
    sums: Vector = defaultdict(float)
    for labels, value in vector.items():
        sums[tuple((k, v) for k, v in labels if k in by)] += value
    return dict(sums)


def _quantiles(quantile: float, buckets: Vector) -> Vector:
    """Prometheus's histogram_quantile: linear within the bucket the rank falls in."""
    groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, count in buckets.items():
        le = dict(labels)["le"]
        groups[tuple((k, v) for k, v in labels if k != "le")].append((float(le), count))
    out = {}
    for labels, pairs in groups.items():
        pairs.sort()
        total = pairs[-1][1]
        if total <= 0:
            continue
        rank, lower_bound, lower_count = quantile * total, 0.0, 0.0
        for bound, count in pairs:
            if count >= rank:
                if math.isinf(bound):
                    out[labels] = lower_bound
                else:
                    share = (rank - lower_count) / (count - lower_count) if count > lower_count else 0
                    out[labels] = lower_bound + (bound - lower_bound) * share
                break
            lower_bound, lower_count = bound, count
    return out


# --- drawing -------------------------------------------------------------------------------
def _legend(template: str, labels: Labels) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: dict(labels).get(m.group(1), ""), template)


def _unit_formatter(unit: str):
    from matplotlib.ticker import FuncFormatter

    def fmt(value, _):
        if unit == "s":
            return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"
        if unit == "bytes":
            return f"{value / 2**20:.4g} MiB"
        if unit == "percentunit":
            return f"{value:.0%}"
        if unit == "reqps":
            return f"{value:.3g}/s"
        return f"{value:.3g}"

    return FuncFormatter(fmt)


def draw(dashboard: dict, scrapes: list, out: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    figure = plt.figure(figsize=(24, rows * 0.62 + 1.2), facecolor="#111217")
    evaluator = Evaluator(scrapes)
    minutes = [t / 60 for t, _ in scrapes]
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        left, width = grid["x"] / 24 + 0.012, grid["w"] / 24 - 0.03
        bottom = 1 - (grid["y"] + grid["h"]) / (rows + 2) + 0.03
        axes = figure.add_axes([left + 0.02, bottom, width - 0.02, grid["h"] / (rows + 2) - 0.07], facecolor="#181b1f")
        for target in panel["targets"]:
            series: dict[Labels, list[float]] = defaultdict(lambda: [math.nan] * len(scrapes))
            for index in range(len(scrapes)):
                for labels, value in evaluator.at(target["expr"], index).items():
                    series[labels][index] = value
            for labels, values in sorted(series.items()):
                axes.plot(minutes, values, linewidth=1.4, label=_legend(target["legendFormat"], labels))
        axes.set_title(panel["title"], color="#d8d9da", fontsize=11, loc="left")
        axes.yaxis.set_major_formatter(_unit_formatter(panel["fieldConfig"]["defaults"]["unit"]))
        axes.tick_params(colors="#9fa7b3", labelsize=8)
        axes.grid(color="#2c3235", linewidth=0.6)
        for spine in axes.spines.values():
            spine.set_color("#2c3235")
        axes.set_xlabel("minutes into the run", color="#9fa7b3", fontsize=8)
        if axes.lines:
            axes.legend(fontsize=7, facecolor="#181b1f", edgecolor="#2c3235", labelcolor="#d8d9da", loc="upper left")
    figure.text(0.012, 0.995, dashboard["title"], color="#d8d9da", fontsize=16, va="top")
    figure.text(0.012, 0.005, caption, color="#9fa7b3", fontsize=9, va="bottom")
    figure.savefig(out, dpi=70, facecolor=figure.get_facecolor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scrapes", type=Path, help="JSON lines from `benchmarks/soak.py --scrape-to`")
    parser.add_argument("--dashboard", type=Path, default=Path(__file__).parent.parent / "docs/grafana-dashboard.json")
    parser.add_argument("--out", type=Path, default=Path("grafana-dashboard.png"))
    parser.add_argument("--caption", default="")
    args = parser.parse_args()
    scrapes = load_scrapes(args.scrapes)
    caption = args.caption or (
        f"{args.dashboard.name} drawn by benchmarks/dashboard.py from {len(scrapes)} scrapes of the hub's /metrics "
        f"over {scrapes[-1][0] / 60:.1f} min of a real run (not Grafana's own renderer)"
    )
    draw(json.loads(args.dashboard.read_text()), scrapes, args.out, caption)
    print(args.out)


if __name__ == "__main__":
    main()

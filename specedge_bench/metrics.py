"""The one reader of a hub's `/metrics` page (Prometheus text), for the bench, the benchmarks
and the tests.

The page is parsed with prometheus_client's own text parser; series are looked up by the sample
names in `specedge_common.metric_names`. A lookup sums over every label it is not given, so a
hub whose series are labelled per worker (`worker="<id>"`) reads as one hub unless a worker is
asked for. A series the page lacks reads 0 (a hub of an older version).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from specedge_common import metric_names as names

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class MetricsPage:
    """One reading of `/metrics`: every sample's value by (sample name, labels)."""

    samples: Mapping[tuple[str, Labels], float]

    @classmethod
    def parse(cls, text: str) -> MetricsPage:
        samples: dict[tuple[str, Labels], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                samples[key] = samples.get(key, 0.0) + float(sample.value)
        return cls(samples)

    def has(self, name: str) -> bool:
        """Whether the page has a sample of this name (with any labels)."""
        return any(sample == name for sample, _ in self.samples)

    def value(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
        wanted = set(labels.items())
        return sum(value for sample, found, value in self._items() if sample == name and wanted <= found)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """`name`'s values by the value of `label` (summed over its other labels)."""
        table: dict[str, float] = {}
        for sample, found, value in self._items():
            key = dict(found).get(label)
            if sample == name and key is not None:
                table[key] = table.get(key, 0.0) + value
        return table

    def since(self, earlier: MetricsPage) -> MetricsPage:
        """What grew between `earlier` and this reading (for counters; a gauge's difference means nothing)."""
        return MetricsPage({key: value - earlier.samples.get(key, 0.0) for key, value in self.samples.items()})

    def _items(self) -> Iterator[tuple[str, Labels, float]]:
        for (sample, labels), value in self.samples.items():
            yield sample, labels, value


def per_worker(page: MetricsPage, name: str) -> dict[str, float]:
    """`name`'s values by worker; a hub of one worker labels nothing, and reads as worker ''."""
    return page.by_label(name, "worker") or {"": page.value(name)}


def worker_mean(page: MetricsPage, name: str) -> float:
    """A per-worker gauge (a fitted cost, say) as one figure: its mean over the workers. Summing
    it, as `value` does, would count a hub of two workers' cost per token twice."""
    values = per_worker(page, name)
    return sum(values.values()) / len(values)


def hub_busy_s(page: MetricsPage) -> float:
    """The hub's busy seconds: its device's forward passes plus its own drafting (server-only speculative)."""
    return page.value(names.DEVICE_BUSY_SECONDS) + page.value(names.HUB_DRAFT_SECONDS)


def pass_ms_by_sessions(grown: MetricsPage) -> dict[int, list[float]]:
    """{sessions in a pass: [passes, mean device ms]} from what grew over a run (`MetricsPage.since`)."""
    passes = grown.by_label(names.VERIFY_PASSES, "sessions")
    seconds = grown.by_label(names.VERIFY_PASS_SECONDS, "sessions")
    table = {
        int(size): [count, round(1000 * seconds.get(size, 0.0) / count, 2)] for size, count in passes.items() if count
    }
    return dict(sorted(table.items()))

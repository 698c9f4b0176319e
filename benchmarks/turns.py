"""Timing several ways of doing one thing in turns, in one process (the only fair comparison on
a machine whose speed drifts from minute to minute)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def medians_in_turns(ways: dict[str, Callable[[], object]], passes: int) -> dict[str, float]:
    """Each way's median seconds over `passes` calls, the ways called in turns."""
    spent: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(passes):
        for name, way in ways.items():
            started = time.perf_counter()
            way()
            spent[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in spent.items()}

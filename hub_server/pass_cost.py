"""What a verify pass costs the device: a fixed part plus a part per token, fitted as passes run.

On a GPU nearly all of a small pass is fixed (kernel launches); on a CPU a pass costs its tokens
plus reading the weights. The runner feeds every verify pass in; the scheduler reads the fixed
part (how long a batch may wait for a user due back), and the accounting reads the part per
token (what the context a verify carried, a new prompt, cost inside its pass).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# The fit splits passes only while their token counts vary by this share of their mean (standard
# deviation): a saturated hub runs passes of nearly one size, whose times say nothing of the split
# (timing noise alone would set the slope, and a slope of 0 would make the whole pass fixed).
MIN_RELATIVE_SPREAD = 0.25


class PassCostFit:
    """A pass's device time as fixed + per_token x tokens, fitted by least squares to the passes
    timed so far; older passes fade, so the fit follows the device. The split is the last one
    the passes determined: passes all of one size keep it as it was."""

    def __init__(self, fade: float = 0.99):
        self.fade = fade
        self._sums = [0.0] * 5  # weight, sum x, sum y, sum x^2, sum x*y
        self._split: tuple[float, float] | None = None
        self._lock = threading.Lock()

    def add(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._sums = [
                self.fade * total + term
                for total, term in zip(self._sums, (1.0, tokens, seconds, tokens * tokens, tokens * seconds))
            ]
            self._split = self._solve() or self._split

    def fixed_s(self) -> float | None:
        """The part of a pass's time that does not grow with its tokens; None until passes of
        different sizes have been timed."""
        fit = self._fit()
        return None if fit is None else fit[0]

    def per_token_s(self) -> float | None:
        """What each token adds to a pass; None until passes of different sizes have been timed."""
        fit = self._fit()
        return None if fit is None else fit[1]

    def _fit(self) -> tuple[float, float] | None:
        with self._lock:
            return self._split

    def _solve(self) -> tuple[float, float] | None:
        """The split the passes so far determine, if they do."""
        n, x, y, xx, xy = self._sums
        if n == 0:
            return None
        spread = xx / n - (x / n) ** 2
        if spread <= max(1e-9 * max(1.0, xx / n), (MIN_RELATIVE_SPREAD * x / n) ** 2):
            return None
        slope = max(0.0, (xy / n - (x / n) * (y / n)) / spread)
        fixed = min(max(y / n - slope * x / n, 0.0), y / n)
        return fixed, (y / n - fixed) / (x / n) if x else 0.0


class RowCosts:
    """What one call costs by the rows it computes, measured at the row counts seen (each an
    average that follows the device) and interpolated between them: the vocabulary projection's
    cost is far from linear in its rows on a CPU (one row reads the weight as a vector product;
    two to sixteen cost about the same, twice one; past that it grows with the rows)."""

    def __init__(self, fade: float = 0.2):
        self.fade = fade
        self._seconds: dict[int, float] = {}
        self._lock = threading.Lock()

    def add(self, rows: int, seconds: float) -> None:
        with self._lock:
            known = self._seconds.get(rows)
            self._seconds[rows] = seconds if known is None else known + self.fade * (seconds - known)

    def known(self) -> bool:
        return len(self._seconds) >= 2

    def seconds(self, rows: float) -> float:
        """The expected cost of computing `rows` rows (fewer than one: the chance of a call of one)."""
        return self.curve()(rows)

    def curve(self) -> Callable[[float], float]:
        """`seconds` over the costs measured so far, for many questions in a row (one lock, one sort)."""
        with self._lock:
            points = sorted(self._seconds.items())

        def seconds(rows: float) -> float:
            if rows <= 0:
                return 0.0
            if rows < 1:
                return rows * self._at(points, 1.0)
            return self._at(points, rows)

        return seconds

    @staticmethod
    def _at(points: list[tuple[int, float]], rows: float) -> float:
        below = [p for p in points if p[0] <= rows]
        above = [p for p in points if p[0] >= rows]
        if below and above:
            (x0, y0), (x1, y1) = below[-1], above[0]
        elif len(points) >= 2:  # beyond what was measured: the line through the nearest two
            (x0, y0), (x1, y1) = points[-2:] if not above else points[:2]
        else:
            return points[0][1] if points else 0.0
        if x1 == x0:
            return y0
        return max(0.0, y0 + (y1 - y0) * (rows - x0) / (x1 - x0))

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
# Reads enter the fit only where they vary apart from the tokens: at most this share of their
# variance explained by the tokens' (1 - correlation squared), or the two cannot be told apart.
APART = 0.05


class PassCostFit:
    """A pass's device time as fixed + per_token x tokens (+ per_read x reads, where the runner
    says how many positions the pass's queries attended), fitted by least squares to the passes
    timed so far; older passes fade, so the fit follows the device. The split is the last one
    the passes determined: passes all of one size keep it as it was.

    Reads matter where contexts vary: a pass of a few sessions deep in long contexts costs more
    than a fuller one of fresh sessions, and a fit on tokens alone would take that for a larger
    fixed part, or (contexts growing while passes fill, as a hub saturates) a smaller one. Where
    the reads do not vary apart from the tokens, the fit is on tokens alone."""

    def __init__(self, fade: float = 0.99):
        self.fade = fade
        self._sums = [0.0] * 9  # weight; sums of tokens, reads, seconds; of t*t, t*r, r*r, t*s, r*s
        self._split: tuple[float, float] | None = None
        self._lock = threading.Lock()

    def add(self, tokens: int, seconds: float, reads: int = 0) -> None:
        terms = (
            1.0,
            tokens,
            reads,
            seconds,
            tokens * tokens,
            tokens * reads,
            reads * reads,
            tokens * seconds,
            reads * seconds,
        )
        with self._lock:
            self._sums = [self.fade * total + term for total, term in zip(self._sums, terms)]
            self._split = self._solve() or self._split

    def fixed_s(self) -> float | None:
        """The part of a pass's time that does not grow with its tokens or what they read; None
        until passes of different sizes have been timed."""
        fit = self._fit()
        return None if fit is None else fit[0]

    def per_token_s(self) -> float | None:
        """What each token adds to a pass, its reads at the contexts seen included; None until
        passes of different sizes have been timed."""
        fit = self._fit()
        return None if fit is None else fit[1]

    def _fit(self) -> tuple[float, float] | None:
        with self._lock:
            return self._split

    def _solve(self) -> tuple[float, float] | None:
        """The split the passes so far determine, if they do: (fixed, per token)."""
        n, t, r, y, tt, tr, rr, ty, ry = self._sums
        if n == 0:
            return None
        t, r, y = t / n, r / n, y / n  # means
        var_t, cov_tr, var_r = tt / n - t * t, tr / n - t * r, rr / n - r * r
        cov_ty, cov_ry = ty / n - t * y, ry / n - r * y
        if var_t <= max(1e-9 * max(1.0, tt / n), (MIN_RELATIVE_SPREAD * t) ** 2):
            return None
        fixed = None
        det = var_t * var_r - cov_tr * cov_tr
        if var_r > 0 and det > APART * var_t * var_r:  # reads that vary apart from the tokens
            per_token = (cov_ty * var_r - cov_ry * cov_tr) / det
            per_read = (cov_ry * var_t - cov_ty * cov_tr) / det
            if per_token >= 0 and per_read >= 0:
                fixed = y - per_token * t - per_read * r
        if fixed is None:  # tokens alone
            fixed = y - max(0.0, cov_ty / var_t) * t
        fixed = min(max(fixed, 0.0), y)
        return fixed, (y - fixed) / t if t else 0.0


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

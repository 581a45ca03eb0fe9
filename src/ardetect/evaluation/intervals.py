"""Bootstrap intervals over queries, and the paired comparison that decides a bar.

Every metric of the harness is a mean over queries of a per-query value (a hit, an
inverse rank, a box that is right or wrong), so its uncertainty is the spread of that
mean when the queries are drawn again: a percentile bootstrap over queries
(``scipy.stats.bootstrap``). Two methods scored on the same queries are compared
*paired*: each resample draws the same queries for both, and the interval is that of
the difference of their means, which is much tighter than two separate intervals when
the methods agree on which queries are hard.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

N_RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided bootstrap interval."""

    value: float
    low: float
    high: float

    def excludes_zero_above(self) -> bool:
        """True when the whole interval lies above zero (a difference that is positive)."""
        return self.low > 0.0

    def fmt(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _check(values: np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name}: need a non-empty 1-d array of per-query values, got shape {list(v.shape)}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name}: per-query values must be finite (got {int((~np.isfinite(v)).sum())} that are not)")
    return v


def mean_interval(
    values: Sequence[float] | np.ndarray, seed: int = 0, n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
    name: str = "values",
) -> Interval:
    """The mean of per-query ``values`` and its percentile bootstrap interval over queries; ``name`` (what the values
    are, e.g. "ARD/recall@5") names them in an error."""
    v = _check(values, name)
    if v.size == 1 or np.all(v == v[0]):  # every resample has the same mean
        return Interval(float(v.mean()), float(v.mean()), float(v.mean()))
    res = stats.bootstrap(
        (v,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method="percentile", vectorized=True,
        rng=np.random.default_rng(seed),
    )
    ci = res.confidence_interval
    return Interval(float(v.mean()), float(ci.low), float(ci.high))


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, scale: float = 1.0, seed: int = 0,
    n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, names: tuple[str, str] = ("a", "b"),
) -> Interval:
    """mean(a) - scale * mean(b) over the same queries (``a[i]`` and ``b[i]`` belong to query i),
    with its paired percentile bootstrap interval: each resample draws the same queries for both."""
    x, y = _check(a, names[0]), _check(b, names[1])
    if x.shape != y.shape:
        raise ValueError(f"paired_difference: {names[0]} has {x.size} queries and {names[1]} has {y.size}; a paired "
                         "comparison needs the same queries")
    return mean_interval(x - scale * y, seed=seed, n_resamples=n_resamples, confidence=confidence)

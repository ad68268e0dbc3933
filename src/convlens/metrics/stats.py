"""Means with 95 % confidence intervals, for tables of per-image metric values.

The interval is Student's t: ``mean +- t_{0.975, n-1} * s / sqrt(n)`` with ``s``
the sample standard deviation. NaN values (an image without a mask for a
localisation metric) are left out and ``n`` counts the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class MeanCI:
    """A mean with its confidence interval; ``low``/``high`` are NaN when ``n < 2``."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def format(self, digits: int = 3) -> str:
        if self.n == 0:
            return "-"
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> MeanCI:
    """Mean and t-interval of ``values``, NaNs skipped."""
    from scipy.stats import t

    data = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(data)
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0)
    mean = sum(data) / n
    if n < 2:
        return MeanCI(mean, math.nan, math.nan, n)
    std = math.sqrt(sum((v - mean) ** 2 for v in data) / (n - 1))
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, n)

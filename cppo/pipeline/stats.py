"""Statistics over seeds: the mean and the half-width of its 95% Student-t interval.

With n seeds whose values have mean m and sample standard deviation sd, the interval is
m +- t_{0.975, n-1} sd / sqrt(n). With one seed there is no interval (NaN).
"""

from __future__ import annotations

import math

# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (standard tables).
T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip


def t975(df: int) -> float:
    if df < 1:
        return math.nan
    return T975[df - 1] if df <= len(T975) else 1.96


def seed_stat(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t half-width of per-seed values, NaN ignored (half-width NaN for n < 2)."""
    vals = [v for v in values if not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan
    mean = sum(vals) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)

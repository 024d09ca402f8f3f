"""benchmarks/seed_spread.py: the interval and power arithmetic against hand-computed cases."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_spread.py"
spec = importlib.util.spec_from_file_location("seed_spread", PATH)
seed_spread = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_spread)


def test_wilson_interval_by_hand():
    # 0 of 8: the upper end is z^2 / (n + z^2)
    lo, hi = seed_spread.wilson(0, 8)
    assert lo == 0.0 and hi == pytest.approx(1.96**2 / (8 + 1.96**2))
    # 3 of 10: centre (0.3 + 0.19208) / 1.38416, half-width 1.96 sqrt(0.021 + 0.009604) / 1.38416
    lo, hi = seed_spread.wilson(3, 10)
    centre, half = 0.49208 / 1.38416, 1.96 * math.sqrt(0.021 + 0.009604) / 1.38416
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert (lo, hi) == pytest.approx((0.1078, 0.6032), abs=1e-4)  # published tables


def test_welch_and_separable_by_hand():
    a, b = [1.0, 2.0, 3.0], [0.0, 0.0, 3.0]
    diff, hw = seed_spread.welch(a, b)
    # variances 1 and 3, n = 3: se^2 = 4/3; df = (4/3)^2 / ((1/3)^2/2 + 1^2/2) = 3.2 -> 3
    assert diff == pytest.approx(1.0)
    assert hw == pytest.approx(3.182 * math.sqrt(4 / 3))
    assert seed_spread.pooled_sd([a, b]) == pytest.approx(math.sqrt(2.0))
    d50, d80 = seed_spread.separable(1.0, 3)
    assert d50 == pytest.approx(2.776 * math.sqrt(2 / 3))  # t_{0.975, 4}
    assert d80 == pytest.approx(2.802 * math.sqrt(2 / 3))

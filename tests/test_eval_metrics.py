"""Avg@k, unbiased pass@k and the bootstrap interval against hand-computed values."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.metrics import (
    avg_at_k,
    bootstrap_ci,
    mean_over_benchmarks,
    pass_at_k,
    pass_at_k_single,
    pass_at_ks,
)

TABLE = [
    [True, False, False, True],
    [True, True, True, True],
    [False, False, False, False],
]


def test_avg_at_k_by_hand():
    assert avg_at_k(TABLE) == pytest.approx((2 / 4 + 4 / 4 + 0 / 4) / 3)
    assert avg_at_k([[True] * 16] * 30) == 1.0
    assert avg_at_k([[False] * 16] * 30) == 0.0
    # 30 problems x 16 samples with 3 correct samples in total.
    grid = [[False] * 16 for _ in range(30)]
    grid[0][0] = grid[0][5] = grid[7][15] = True
    assert avg_at_k(grid) == pytest.approx((2 / 16 + 1 / 16) / 30)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 1 / 4),
        (4, 1, 2, 1 - 3 / 6),  # 1 - C(3,2)/C(4,2)
        (4, 2, 2, 1 - 1 / 6),  # 1 - C(2,2)/C(4,2)
        (4, 3, 2, 1.0),  # fewer wrong samples than k
        (16, 0, 16, 0.0),
        (16, 16, 1, 1.0),
        (16, 1, 4, 1 - 1365 / 1820),  # 1 - C(15,4)/C(16,4) = 4/16
        (16, 5, 4, 1 - math.comb(11, 4) / math.comb(16, 4)),
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    ],
)
def test_pass_at_k_by_hand(n, c, k, expected):
    assert pass_at_k_single(n, c, k) == pytest.approx(expected)


def _pass_at_k_by_enumeration(samples: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(samples)), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=9), st.data())
def test_pass_at_k_is_the_subset_probability(samples, data):
    k = data.draw(st.integers(1, len(samples)))
    assert pass_at_k_single(len(samples), sum(samples), k) == pytest.approx(
        _pass_at_k_by_enumeration(samples, k)
    )


def test_pass_at_one_equals_avg_and_keys():
    assert pass_at_k(TABLE, 1) == pytest.approx(avg_at_k(TABLE))
    assert pass_at_k(TABLE, 4) == pytest.approx((1 + 1 + 0) / 3)
    assert set(pass_at_ks(TABLE)) == {"1", "4"}
    assert set(pass_at_ks([[True] * 16])) == {"1", "4", "16"}
    assert set(pass_at_ks([[True] * 8])) == {"1", "4", "8"}


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k_single(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k_single(4, 1, 5)
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], []])


def test_bootstrap_ci_basic_properties():
    lo, hi = bootstrap_ci(TABLE, n_boot=2000)
    assert 0.0 <= lo <= avg_at_k(TABLE) <= hi <= 1.0
    assert bootstrap_ci(TABLE, n_boot=2000) == (lo, hi)  # seeded
    assert bootstrap_ci([[True, False]] * 10) == (0.5, 0.5)  # no between-problem spread


def test_bootstrap_ci_width_matches_the_normal_approximation():
    rng = random.Random(1)
    acc = [rng.random() for _ in range(200)]
    grid = [[rng.random() < p for _ in range(16)] for p in acc]
    per_problem = np.array([sum(s) / 16 for s in grid])
    half_width = 1.96 * per_problem.std(ddof=0) / math.sqrt(len(grid))
    lo, hi = bootstrap_ci(grid, n_boot=20_000)
    assert (hi - lo) / 2 == pytest.approx(half_width, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(per_problem.mean(), abs=0.01)


def test_mean_over_benchmarks_is_unweighted():
    assert mean_over_benchmarks({"aime24": 0.3, "aime25": 0.2, "aime26": 0.1}) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        mean_over_benchmarks({})

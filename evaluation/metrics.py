"""Avg@k, unbiased pass@k, bootstrap confidence intervals, and the cross-benchmark mean.

Inputs are per-problem lists of booleans (one entry per sample). Avg@k is the paper's metric:
the mean accuracy over the k samples of a problem, then the mean over problems.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_PASS_KS = (1, 4, 16)


def _per_problem_accuracy(correct: Sequence[Sequence[bool]]) -> np.ndarray:
    if len(correct) == 0:
        raise ValueError("no problems")
    acc = []
    for i, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"problem {i} has no samples")
        acc.append(sum(bool(s) for s in samples) / len(samples))
    return np.asarray(acc, dtype=np.float64)


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over problems of the fraction of correct samples (a value in [0, 1])."""
    return float(_per_problem_accuracy(correct).mean())


def pass_at_k_single(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct.

    1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean over problems of the unbiased pass@k estimate."""
    values = [pass_at_k_single(len(s), sum(bool(x) for x in s), k) for s in correct]
    if not values:
        raise ValueError("no problems")
    return float(np.mean(values))


def pass_at_ks(
    correct: Sequence[Sequence[bool]], ks: Sequence[int] = DEFAULT_PASS_KS
) -> dict[str, float]:
    """pass@k for each k in ``ks`` that the sample count allows, plus k = samples per problem."""
    n_min = min(len(s) for s in correct)
    wanted = sorted({k for k in ks if k <= n_min} | {n_min})
    return {str(k): pass_at_k(correct, k) for k in wanted}


def bootstrap_ci(
    correct: Sequence[Sequence[bool]],
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of Avg@k, resampling problems with replacement.

    Problems (not samples) are the unit: the k samples of one problem are correlated.
    """
    acc = _per_problem_accuracy(correct)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(acc), size=(n_boot, len(acc)))
    means = acc[draws].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def mean_over_benchmarks(values: Mapping[str, float]) -> float:
    """Unweighted mean across benchmarks (the paper's "AIME24/25/26 Avg@16")."""
    if not values:
        raise ValueError("no benchmarks")
    return float(sum(values.values()) / len(values))

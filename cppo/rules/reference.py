"""Plain-Python reference implementations of the rules, written for reading, not speed.

Each function works on one response at a time with python lists and floats (IEEE double), a
direct transcription of the paper's definitions; the tests compare the vectorised torch code
against them. ``cppo_reference`` is Algorithm 1 line by line. Arithmetic is written in the same
operation order as the vectorised code, so on float64 (or float32 upcast) inputs the two agree
exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "is_outward",
    "linear_quantile",
    "position_weights",
    "cppo_reference",
    "cppo_batch_reference",
    "dppo_reference",
    "grpo_keep_reference",
    "trm_keep_reference",
    "minpro_weights_reference",
]


def is_outward(advantage: float, log_ratio: float) -> bool:
    """A (rho - 1) > 0, written on the sign of log rho (rho > 1 iff log rho > 0)."""
    return (advantage > 0 and log_ratio > 0) or (advantage < 0 and log_ratio < 0)


def linear_quantile(values: Sequence[float], q: float) -> float:
    """torch.quantile's default 'linear' quantile of a non-empty list."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = math.ceil(pos)
    frac = pos - lo
    return v[lo] + frac * (v[hi] - v[lo])


def position_weights(
    length: int,
    w_min: float,
    ranks: Sequence[int] | None = None,
    horizon: int | None = None,
) -> list[float]:
    """w_t = 1 - (1 - w_min)(t - 1)/(T - 1) for t = 1..length, T = ``horizon`` (the padded
    convention) or the response's own length; with ``ranks`` the (0-based) position used
    for token j is ranks[j] (the shuffled-weights ablation)."""
    if ranks is None:
        ranks = list(range(length))
    T = length if horizon is None else horizon
    if T == 1:
        return [1.0] * length
    return [1.0 - (1.0 - w_min) * r / (T - 1) for r in ranks[:length]]


def cppo_reference(
    divergence: Sequence[float],
    log_ratio: Sequence[float],
    advantages: Sequence[float],
    *,
    delta: float,
    delta_b: float,
    w_min: float,
    adaptive_delta_b: bool = False,
    position_weight: bool = True,
    prefix_budget: bool = True,
    soft: bool = False,
    ranks: Sequence[int] | None = None,
    quantile: float = 0.9,
    max_factor: float = 2.0,
    horizon: int | None = None,
) -> tuple[list[float], float, list[str]]:
    """Algorithm 1 for one response (its real tokens only).

    Returns (weights, delta_b_eff, kinds): the per-token weight (1.0 keep / 0.0 mask for the
    hard rule, g(x_t) for outward terms under the soft gate), the effective delta_b and, per
    token, "" (untouched), "token" (w_t D_t > delta) or "prefix" (rejected by the budget only).
    """
    T = len(divergence)
    if T == 0:
        return [], delta_b, []
    w = position_weights(T, w_min, ranks, horizon) if position_weight else [1.0] * T
    if adaptive_delta_b:
        p = linear_quantile(divergence, quantile)
        db = min(max(p, delta_b), max_factor * delta_b)
    else:
        db = delta_b

    S = 0.0  # S_{t-1}: sum of w_j D_j over all earlier tokens (kept or not)
    W = 0.0  # W_{t-1}: sum of w_j over earlier tokens
    weights: list[float] = []
    kinds: list[str] = []
    for t in range(T):
        Z = w[t] * divergence[t]
        outward = is_outward(advantages[t], log_ratio[t])
        if soft:
            x = Z / delta
            if prefix_budget:
                x = max(x, (S + Z) / (delta + db * W))
            g = 1.0 / x if x > 1.0 else 1.0
            weight = g if outward else 1.0
            rejected = outward and x > 1.0
        else:
            c = min(delta, delta + db * W - S) if prefix_budget else delta
            keep = (not outward) or c >= Z
            weight = 1.0 if keep else 0.0
            rejected = not keep
        weights.append(weight)
        kinds.append(("token" if delta < Z else "prefix") if rejected else "")
        S = S + Z
        W = W + w[t]
    return weights, db, kinds


def cppo_batch_reference(
    divergence: Sequence[Sequence[float]],
    log_ratio: Sequence[Sequence[float]],
    advantages: Sequence[Sequence[float]],
    lengths: Sequence[int],
    ranks: Sequence[Sequence[int]] | None = None,
    **kwargs: object,
) -> tuple[list[list[float]], list[float], list[list[str]]]:
    """``cppo_reference`` on each row, truncated to its length; padding gets weight 0."""
    all_w, all_db, all_k = [], [], []
    for b, n in enumerate(lengths):
        w, db, k = cppo_reference(
            list(divergence[b][:n]),
            list(log_ratio[b][:n]),
            list(advantages[b][:n]),
            ranks=None if ranks is None else list(ranks[b][:n]),
            **kwargs,  # type: ignore[arg-type]
        )
        pad = len(divergence[b]) - n
        all_w.append(w + [0.0] * pad)
        all_db.append(db)
        all_k.append(k + [""] * pad)
    return all_w, all_db, all_k


def dppo_reference(
    divergence: Sequence[float],
    log_ratio: Sequence[float],
    advantages: Sequence[float],
    *,
    delta: float,
) -> list[bool]:
    """Eq. 3: keep iff inward or D_t <= delta."""
    return [
        (not is_outward(a, r)) or d <= delta
        for d, r, a in zip(divergence, log_ratio, advantages, strict=True)
    ]


def grpo_keep_reference(
    ratio: Sequence[float],
    advantages: Sequence[float],
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> list[bool]:
    """Where the clipped PPO loss passes gradient, from its case analysis.

    A > 0: gradient iff rho <= 1 + eps_high (the max picks the unclipped branch);
    A < 0: gradient iff rho >= 1 - eps_low, and with a dual clip also rho <= c;
    A = 0: no gradient either way, counted as kept (inward).
    """
    out = []
    for r, a in zip(ratio, advantages, strict=True):
        if a > 0:
            keep = r <= 1.0 + eps_high
        elif a < 0:
            keep = r >= 1.0 - eps_low and (dual_clip is None or r <= dual_clip)
        else:
            keep = True
        out.append(keep)
    return out


def trm_keep_reference(kl: Sequence[float], *, reduce: str, threshold: float) -> bool:
    """TRM: keep the whole response iff max (or mean) per-token KL <= threshold."""
    if not kl:
        return True
    score = max(kl) if reduce == "max" else sum(kl) / len(kl)
    return score <= threshold


def minpro_weights_reference(
    log_ratio: Sequence[float],
    *,
    eps_low: float | None,
    eps_high: float | None,
    include_current: bool = True,
    cap_prefix_min_at_one: bool = False,
) -> list[float]:
    """w_t = clip(min_{i<t} rho_i * rho_t, 1 - eps_low, 1 + eps_high), m_1 = 1."""
    weights = []
    prefix_min = 1.0  # empty prefix
    seen = False
    for lr in log_ratio:
        rho = math.exp(lr)
        m = min(prefix_min, 1.0) if cap_prefix_min_at_one else prefix_min
        w = m * rho if include_current else m
        if eps_low is not None:
            w = max(w, 1.0 - eps_low)
        if eps_high is not None:
            w = min(w, 1.0 + eps_high)
        weights.append(w)
        prefix_min = rho if not seen else min(prefix_min, rho)
        seen = True
    return weights


# --- rules beyond the paper: per response, (per-token loss value, d(loss)/d(log pi_t)) --------
# Each returns, for every token of one response, the value of its per-token loss and the
# derivative of the response's summed per-token loss with respect to that token's log pi,
# written out by hand from the rule's equation (see the rule modules' docstrings).


def _clip_value(a: float, s: float, eps_low: float, eps_high: float) -> float:
    return max(-a * s, -a * min(max(s, 1.0 - eps_low), 1.0 + eps_high))


def gspo_reference(
    log_ratio: Sequence[float], advantages: Sequence[float], *, eps_low: float, eps_high: float
) -> tuple[list[float], list[float]]:
    """GSPO-token: every token sees s = exp(mean log rho); gradient -A s where it is not clipped."""
    s = math.exp(sum(log_ratio) / len(log_ratio)) if log_ratio else 1.0
    values, grads = [], []
    for a in advantages:
        values.append(_clip_value(a, s, eps_low, eps_high))
        clipped = (a > 0 and s > 1.0 + eps_high) or (a < 0 and s < 1.0 - eps_low)
        grads.append(0.0 if clipped else -a * s)
    return values, grads


def gmpo_reference(
    log_ratio: Sequence[float], advantages: Sequence[float], *, eps_low: float, eps_high: float
) -> tuple[list[float], list[float]]:
    """GMPO: L = -mean(A) exp(mean of the sign-aware clipped log-ratios) on every token; the
    row's sum is n L, so d/d log pi_t = -mean(A) r [log rho_t not clipped]."""
    n = len(log_ratio)
    if n == 0:
        return [], []
    logs, passes = [], []
    for lr, a in zip(log_ratio, advantages, strict=True):
        c = min(max(lr, -eps_low), eps_high)
        if a > 0:
            logs.append(min(lr, c))
            passes.append(lr <= eps_high)
        elif a < 0:
            logs.append(max(lr, c))
            passes.append(lr >= -eps_low)
        else:
            logs.append(0.0)
            passes.append(True)
    r = math.exp(sum(logs) / n)
    abar = sum(advantages) / n
    # the sign makes a token's log-ratio constant (no gradient) only where it is clipped; a
    # zero advantage contributes a constant 0
    grads = [-abar * r if p and a != 0 else 0.0 for p, a in zip(passes, advantages, strict=True)]
    return [-abar * r] * n, grads


def sapo_reference(
    log_ratio: Sequence[float], advantages: Sequence[float], *, tau_pos: float, tau_neg: float
) -> tuple[list[float], list[float]]:
    """SAPO: L = -(4/tau) sigmoid(tau (rho - 1)) A, dL/d log pi = -4 s (1 - s) rho A."""
    values, grads = [], []
    for lr, a in zip(log_ratio, advantages, strict=True):
        rho = math.exp(lr)
        tau = tau_pos if a > 0 else tau_neg
        s = 1.0 / (1.0 + math.exp(-tau * (rho - 1.0)))
        values.append(-(4.0 / tau) * s * a)
        grads.append(-4.0 * s * (1.0 - s) * rho * a)
    return values, grads


def tis_reference(
    log_ratio: Sequence[float], advantages: Sequence[float], *, cap: float
) -> tuple[list[float], list[float]]:
    """TIS: L = -min(rho, C) A and dL/d log pi = -min(rho, C) A."""
    w = [min(math.exp(lr), cap) for lr in log_ratio]
    values = [-wi * a for wi, a in zip(w, advantages, strict=True)]
    return values, list(values)


def icepop_reference(
    log_ratio: Sequence[float], advantages: Sequence[float], *, low: float, high: float
) -> tuple[list[float], list[float]]:
    """IcePop: L = -[low <= rho <= high] rho A, and the same expression as its derivative."""
    values = []
    for lr, a in zip(log_ratio, advantages, strict=True):
        rho = math.exp(lr)
        values.append(-rho * a if low <= rho <= high else 0.0)
    return values, list(values)


def opsm_reference(
    log_ratio: Sequence[float],
    advantages: Sequence[float],
    *,
    threshold: float,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> tuple[list[float], list[float]]:
    """OPSM: the clipped PPO loss, zero on negative-advantage tokens of a response whose mean
    log(mu / pi) exceeds the threshold."""
    n = len(log_ratio)
    drift = -sum(log_ratio) / n if n else 0.0
    ratios = [math.exp(lr) for lr in log_ratio]
    keep = grpo_keep_reference(
        ratios, advantages, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
    )
    values, grads = [], []
    for rho, a, k in zip(ratios, advantages, keep, strict=True):
        if a < 0 and drift > threshold:
            values.append(0.0)
            grads.append(0.0)
            continue
        v = _clip_value(a, rho, eps_low, eps_high)
        if dual_clip is not None and a < 0:
            v = min(v, -a * dual_clip)
        values.append(v)
        grads.append(-rho * a if k else 0.0)
    return values, grads


def m2po_masked_reference(squares: Sequence[float], tau: float) -> list[bool]:
    """The M2PO loop: while the mean of the unmasked values exceeds tau, mask the largest
    (the earliest of equal values is kept longest, as a stable sort orders them)."""
    masked = [False] * len(squares)
    while True:
        rest = [v for v, m in zip(squares, masked, strict=True) if not m]
        if not rest or sum(rest) / len(rest) <= tau:
            return masked
        top = max(v for v, m in zip(squares, masked, strict=True) if not m)
        last = max(
            i for i, (v, m) in enumerate(zip(squares, masked, strict=True)) if not m and v == top
        )
        masked[last] = True

"""CPPO: position-weighted token threshold plus a cumulative prefix budget (Eq. 8-10, Alg. 1).

For one response of length T (positions t = 1..T over its real tokens):

* position weight  w_t = 1 - (1 - w_min) (t - 1) / (T - 1)   (w_1 = 1; T = 1 gives w_1 = 1)
  where T is the response's own length (``position_horizon: response``, the paper's Eq. 9 and
  UniRL's ``unirl/algorithms/cppo.py``, the default) or the padded response width
  (``position_horizon: padded``, verl PR #6731: "keys the schedule on the fixed padded length";
  T = the rule's ``horizon``, which the trainer sets to max_completion_length, else the
  tensor's width). With the padded horizon a short response only sees weights near 1.
* Z_t = w_t D_t,  S_t = sum_{j<=t} Z_j,  W_t = sum_{j<=t} w_j,  S_0 = W_0 = 0
* effective threshold  c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1})
* keep the term iff it is inward (A_t (rho_t - 1) <= 0) or Z_t <= c_t.

S accumulates Z of every real token (masked or not, inward or not).

Batched form used here (no Python loop over responses or positions): positions come from a
cumulative count of real tokens, w and Z are zero on padding, S and W are cumulative sums
along the response axis and S_{t-1}, W_{t-1} are those sums shifted right by one token.
All mask arithmetic runs in float64 whatever the input dtype, in the same operation order as
the plain-Python transcription in :mod:`cppo.rules.reference`, so both agree bit for bit.

Adaptive delta_b (per response): delta_b_eff = clamp(P_q(D_1..D_T), delta_b, f delta_b) with
q = 0.9 and f = ``delta_b_max_factor`` = 2 by default (UniRL and the paper; verl PR #6731
raised it to 5 in its commit "tune hyperparameter"). P_q is the *linear* quantile of the response's real-token D
values, the default of ``torch.quantile`` (and of the official code, which calls it per
response): sort ascending v_0 <= ... <= v_{n-1}, pos = q (n - 1), lo = floor(pos),
hi = ceil(pos), P = v_lo + (pos - lo) (v_hi - v_lo). It is computed for all responses at once
with one ``topk`` over the batch (padding filled with -inf), taking only the largest
max_b(n_b - lo_b) values per row instead of a full sort.

Soft gate (App. C): x_t = max(w_t D_t / delta, S_t / (delta + delta_b W_{t-1})); outward terms
get weight g(x_t) = min(1, 1 / x_t), inward terms weight 1.

Ablations: ``position_weight=False`` (w_t = 1), ``prefix_budget=False`` (only w_t D_t <= delta),
shuffled weights (the multiset {w_t} randomly permuted within each response, seeded), hard
mask vs soft gate, any divergence (the caller computes D per ``cfg["divergence"]``).

Diagnostics split of the masked (hard) / down-weighted (soft) outward tokens:
``mask/token_fraction`` counts those with w_t D_t > delta (the token threshold alone rejects
them, whatever the budget), ``mask/prefix_fraction`` the rest (w_t D_t <= delta, rejected only
because the prefix budget was exhausted). Both are fractions of all response tokens, so they
add up to ``mask/fraction``; ``cppo/prefix_share`` = prefix-masked / masked (Fig. 7).
``cppo/delta_b_eff`` is the mean effective delta_b over non-empty responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cppo.rules.base import (
    RuleBatch,
    RuleOutput,
    base_metrics,
    masked_mean,
    masked_surrogate_loss,
    ratio_from_log_ratio,
)
from cppo.rules.registry import RATIO_CAP, Param, RuleConfigError, register_rule

__all__ = [
    "CPPOGate",
    "cppo_gate",
    "cppo_mask",
    "cppo_soft_weight",
    "masked_quantile",
    "shuffled_ranks",
    "cppo_rule",
]

_DT = torch.float64
# Divergence given as NaN/inf is treated as this (finite, so the budget arithmetic stays
# finite): the term is rejected and the prefix budget is exhausted from there on.
_BIG = 1e30


def masked_quantile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """Per-row linear-interpolation quantile of ``values[b, mask[b]]``, ``[B]`` (NaN if empty).

    Same definition as ``torch.quantile(..., interpolation="linear")`` on each row's masked
    values, batched over rows of different lengths without a Python loop.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    mask = mask.bool()
    B, T = values.shape
    n = mask.sum(-1, dtype=torch.int32).long()
    pos = q * (n - 1).clamp(min=0).to(values.dtype)
    lo = pos.floor()
    hi = pos.ceil()
    frac = pos - lo
    lo_i, hi_i = lo.long(), hi.long()
    out = torch.full((B,), float("nan"), dtype=values.dtype, device=values.device)
    if B == 0 or T == 0:
        return out
    need = int((n - lo_i).max())  # values needed from the top of each row
    if need <= 0:
        return out
    filled = values.masked_fill(~mask, float("-inf"))
    top = torch.topk(filled, k=min(need, T), dim=-1, largest=True, sorted=True).values
    # ascending index i of a row with n values is index n - 1 - i from the top
    idx_lo = (n - 1 - lo_i).clamp(min=0).unsqueeze(-1)
    idx_hi = (n - 1 - hi_i).clamp(min=0).unsqueeze(-1)
    v_lo = top.gather(-1, idx_lo).squeeze(-1)
    v_hi = top.gather(-1, idx_hi).squeeze(-1)
    res = v_lo + frac * (v_hi - v_lo)
    return torch.where(n > 0, res, out)


def shuffled_ranks(response_mask: Tensor, seed: int) -> Tensor:
    """A seeded random permutation of 0..n_b-1 over the real tokens of each response.

    Padding positions get ranks >= n_b (ignored). Deterministic for a given seed, mask shape
    and device.
    """
    mask = response_mask.bool()
    B, T = mask.shape
    gen = torch.Generator(device=mask.device).manual_seed(int(seed))
    keys = torch.rand((B, T), generator=gen, dtype=_DT, device=mask.device)
    keys = keys.masked_fill(~mask, 2.0)  # padding sorts after every real token
    order = keys.argsort(dim=-1)
    ar = torch.arange(T, device=mask.device).expand(B, T)
    return torch.empty_like(order).scatter_(-1, order, ar)


@dataclass
class CPPOGate:
    """Everything the CPPO gate computes for a batch (all ``[B, T]`` unless noted).

    keep: bool, term contributes gradient (padding False). weight: float64 gate value (1/0 for
    the hard mask, g(x) for outward terms under the soft gate, 0 on padding). outward: bool.
    token_violation / prefix_violation: outward terms masked (hard) or down-weighted (soft)
    with w_t D_t > delta, resp. only through the prefix budget. position_weight: w_t used.
    delta_b_eff: ``[B]`` effective delta_b per response.
    """

    keep: Tensor
    weight: Tensor
    outward: Tensor
    token_violation: Tensor
    prefix_violation: Tensor
    position_weight: Tensor
    delta_b_eff: Tensor


def cppo_gate(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    delta: float,
    delta_b: float | Tensor,
    w_min: float,
    adaptive_delta_b: bool = False,
    position_weight: bool = True,
    prefix_budget: bool = True,
    soft: bool = False,
    shuffle_seed: int | None = None,
    delta_b_quantile: float = 0.9,
    delta_b_max_factor: float = 2.0,
    horizon: int | None = None,
) -> CPPOGate:
    """Vectorised Algorithm 1 (hard mask or soft gate) with all diagnostics.

    ``delta_b`` may be a float or a ``[B]`` tensor (per-response budget; with
    ``adaptive_delta_b`` it is the lower clamp of each response's quantile).
    ``shuffle_seed`` not None permutes the position weights within each response.
    ``horizon`` not None is the T of the position weights for every response (the padded
    convention); None uses each response's own length.
    """
    return _cppo_core(
        divergence,
        log_ratio,
        advantages,
        response_mask,
        delta=delta,
        delta_b=delta_b,
        w_min=w_min,
        adaptive_delta_b=adaptive_delta_b,
        position_weight=position_weight,
        prefix_budget=prefix_budget,
        soft=soft,
        shuffle_seed=shuffle_seed,
        delta_b_quantile=delta_b_quantile,
        delta_b_max_factor=delta_b_max_factor,
        horizon=horizon,
        diagnostics=True,
    )


def _cppo_core(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    delta: float,
    delta_b: float | Tensor,
    w_min: float,
    adaptive_delta_b: bool,
    position_weight: bool,
    prefix_budget: bool,
    soft: bool,
    shuffle_seed: int | None,
    delta_b_quantile: float,
    delta_b_max_factor: float,
    horizon: int | None,
    diagnostics: bool,
) -> CPPOGate:
    # Written with in-place ops on few float64 buffers: at B=64, T=8192 every extra
    # temporary costs about as much as the cumulative sums themselves.
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}")
    if not 0.0 < w_min <= 1.0:
        raise ValueError(f"w_min must be in (0, 1], got {w_min}")
    with torch.no_grad():
        m = response_mask.bool()
        if divergence.shape != m.shape or log_ratio.shape != m.shape or m.dim() != 2:
            raise ValueError(
                f"divergence {tuple(divergence.shape)}, log_ratio {tuple(log_ratio.shape)} and "
                f"response_mask {tuple(m.shape)} must share one [B, T] shape"
            )
        B, T = m.shape
        dev = m.device
        pad = ~m
        n = m.sum(-1, dtype=torch.int32).long()
        if horizon is not None and B and int(n.max()) > horizon:
            raise ValueError(
                f"position horizon {horizon} is shorter than a response ({int(n.max())} tokens)"
            )

        # outward test needs signs only: no cast of the log-ratio or advantages
        lr = log_ratio.detach()
        adv = advantages.detach()
        if adv.dim() == 1:
            adv = adv.unsqueeze(-1)
        outward = ((adv > 0) & (lr > 0)) | ((adv < 0) & (lr < 0))
        outward &= m

        D = divergence.detach().to(_DT, copy=True)
        D.nan_to_num_(nan=_BIG, posinf=_BIG, neginf=0.0)

        if isinstance(delta_b, Tensor):
            db = delta_b.detach().to(_DT).reshape(-1).expand(B)
        else:
            db = torch.full((B,), float(delta_b), dtype=_DT, device=dev)
        if adaptive_delta_b:
            p = masked_quantile(D, m, delta_b_quantile)
            p = torch.where(n > 0, p, db)
            db = torch.clamp(p, min=db, max=delta_b_max_factor * db)

        if position_weight:
            if shuffle_seed is None:
                w = torch.cumsum(m, dim=-1, dtype=_DT).sub_(1.0)  # t - 1
            else:
                w = shuffled_ranks(m, shuffle_seed).to(_DT)
            length = n if horizon is None else torch.full_like(n, horizon)
            denom = (length - 1).clamp_(min=1).to(_DT).unsqueeze(-1)
            # 1 - (1 - w_min) (t - 1) / (T - 1), in the reference's operation order
            w.mul_(1.0 - w_min).div_(denom).neg_().add_(1.0).masked_fill_(pad, 0.0)
        else:
            w = m.to(_DT)
        Z = D.mul_(w)  # padding: w = 0 and D finite, so Z = 0

        # S_{t-1}, W_{t-1} are the cumulative sums shifted right by one token; rather than
        # materialising shifted copies, column 0 (S_0 = W_0 = 0, so c_1 = delta) is handled
        # apart and columns 1.. are compared against the unshifted sums' columns 0..T-2.
        if prefix_budget:
            S = torch.cumsum(Z, dim=-1)
            W = torch.cumsum(w, dim=-1)
            # delta + delta_b W_{t-1} for t >= 2, in place over W
            budget = W[:, :-1].mul_(db.unsqueeze(-1)).add_(delta)

        token_over = delta < Z if (diagnostics or soft or not prefix_budget) else None
        if soft:
            x = Z / delta
            if prefix_budget:
                # x_t = max(w_t D_t / delta, S_t / (delta + delta_b W_{t-1})); at t = 1 the
                # second term is Z_1 / delta, the first one already.
                torch.maximum(x[:, 1:], S[:, 1:] / budget, out=x[:, 1:])
            reduced = outward & (x > 1.0)
            # g(x) = min(1, 1/x) on outward terms, 1 on inward ones, 0 on padding
            weight = torch.where(reduced, x.reciprocal_(), m.to(_DT))
            keep = m & (weight > 0)
        else:
            if prefix_budget:
                feasible = torch.empty((B, T), dtype=torch.bool, device=dev)
                torch.le(Z[:, :1], delta, out=feasible[:, :1])
                c = budget.sub_(S[:, :-1]).clamp_(max=delta)
                torch.le(Z[:, 1:], c, out=feasible[:, 1:])
            else:
                feasible = ~token_over
            keep = feasible | ~outward
            keep &= m
            weight = keep.to(_DT) if diagnostics else None
            reduced = outward & ~feasible if diagnostics else None
        if diagnostics:
            token_violation = reduced & token_over
            prefix_violation = reduced & ~token_over
        else:
            token_violation = prefix_violation = None
    return CPPOGate(
        keep=keep,
        weight=weight,
        outward=outward,
        token_violation=token_violation,
        prefix_violation=prefix_violation,
        position_weight=w,
        delta_b_eff=db,
    )


def cppo_mask(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    delta: float,
    delta_b: float | Tensor,
    w_min: float,
    adaptive_delta_b: bool = False,
    position_weight: bool = True,
    prefix_budget: bool = True,
    shuffle_seed: int | None = None,
    delta_b_quantile: float = 0.9,
    delta_b_max_factor: float = 2.0,
    horizon: int | None = None,
) -> Tensor:
    """CPPO hard keep-mask, BoolTensor ``[B, T]`` (True = term kept; padding False).

    Args:
        divergence: D_t ``[B, T]`` (any estimator from :mod:`cppo.divergence`).
        log_ratio: log pi(y_t) - log mu(y_t), ``[B, T]``.
        advantages: ``[B]`` or ``[B, T]``.
        response_mask: bool ``[B, T]``, responses left-aligned.
        delta, delta_b, w_min: the paper's thresholds (Table 3).
        adaptive_delta_b: per-response delta_b = clamp(P90(D), delta_b, 2 delta_b).
        position_weight / prefix_budget: ablation switches (False = "w/o ...").
        shuffle_seed: if given, the "shuffled weights" ablation with this seed.
        delta_b_quantile / delta_b_max_factor: the 0.9 and 2 of the adaptive rule.
        horizon: T of the position weights (padded convention); None = each response's length.
    """
    return _cppo_core(
        divergence,
        log_ratio,
        advantages,
        response_mask,
        delta=delta,
        delta_b=delta_b,
        w_min=w_min,
        adaptive_delta_b=adaptive_delta_b,
        position_weight=position_weight,
        prefix_budget=prefix_budget,
        soft=False,
        shuffle_seed=shuffle_seed,
        delta_b_quantile=delta_b_quantile,
        delta_b_max_factor=delta_b_max_factor,
        horizon=horizon,
        diagnostics=False,
    ).keep


def cppo_soft_weight(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    **kwargs: Any,
) -> Tensor:
    """Soft-gate weights ``[B, T]`` (float64): g(x_t) on outward terms, 1 inward, 0 padding.

    Keyword arguments as for :func:`cppo_mask`.
    """
    return cppo_gate(divergence, log_ratio, advantages, response_mask, soft=True, **kwargs).weight


def _check_cfg(cfg: dict[str, Any]) -> None:
    if cfg["delta_b_max_factor"] < 1.0:
        raise RuleConfigError(
            f"rule 'cppo': config key 'delta_b_max_factor' must be >= 1; got "
            f"{cfg['delta_b_max_factor']}"
        )


@register_rule(
    "cppo",
    divergence="topk_tv",
    params={
        "delta": Param(0.15, float, check=lambda x: x > 0, requirement="> 0"),
        "delta_b": Param(0.02, float, check=lambda x: x >= 0, requirement=">= 0"),
        "w_min": Param(0.8, float, check=lambda x: 0 < x <= 1, requirement="0 < w_min <= 1"),
        "adaptive_delta_b": Param(True, bool),
        "delta_b_quantile": Param(0.9, float, check=lambda x: 0 <= x <= 1, requirement="[0, 1]"),
        "delta_b_max_factor": Param(2.0, float),
        "position_weight": Param(True, bool),
        "position_horizon": Param("response", str, choices=("response", "padded")),
        "prefix_budget": Param(True, bool),
        "shuffle_weights": Param(False, bool),
        "gate": Param("hard", str, choices=("hard", "soft")),
        "ratio_cap": RATIO_CAP,
    },
    check=_check_cfg,
)
def cppo_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """CPPO: masked ratio-advantage surrogate -keep_t rho_t A_t (or soft-gated weights).

    Defaults: delta 0.15, delta_b 0.02 adaptive (the Base-model setting of Table 3; the
    instruct 1.7B run used a fixed 0.015), w_min 0.8, Top-K TV with K = 20, hard mask,
    position horizon = the response's length, clamp factor 2, no ratio cap (UniRL's
    conventions; verl PR #6731: padded horizon, factor 5, ratio cap 20, Binary TV).
    Shuffled weights use ``batch.seed``: vary it per step.
    """
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    div = batch.divergence_2d()
    gate = cppo_gate(
        div,
        lr,
        adv,
        mask,
        delta=cfg["delta"],
        delta_b=cfg["delta_b"],
        w_min=cfg["w_min"],
        adaptive_delta_b=cfg["adaptive_delta_b"],
        position_weight=cfg["position_weight"],
        prefix_budget=cfg["prefix_budget"],
        soft=cfg["gate"] == "soft",
        shuffle_seed=batch.seed if cfg["shuffle_weights"] else None,
        delta_b_quantile=cfg["delta_b_quantile"],
        delta_b_max_factor=cfg["delta_b_max_factor"],
        horizon=(cfg["horizon"] or mask.shape[-1]) if cfg["position_horizon"] == "padded" else None,
    )
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    loss = masked_surrogate_loss(ratio, adv, gate.weight, mask, cfg["ratio_cap"])

    metrics = base_metrics(mask, ratio, gate.keep, div, gate.outward, cfg["ratio_cap"])
    reduced = gate.token_violation | gate.prefix_violation
    n_reduced = int(reduced.sum())
    metrics["mask/fraction"] = masked_mean(reduced.to(_DT), mask)
    metrics["mask/token_fraction"] = masked_mean(gate.token_violation.to(_DT), mask)
    metrics["mask/prefix_fraction"] = masked_mean(gate.prefix_violation.to(_DT), mask)
    metrics["cppo/prefix_share"] = (
        int(gate.prefix_violation.sum()) / n_reduced if n_reduced else 0.0
    )
    nonempty = mask.any(-1)
    metrics["cppo/delta_b_eff"] = (
        float(gate.delta_b_eff[nonempty].mean()) if bool(nonempty.any()) else float(cfg["delta_b"])
    )
    if cfg["gate"] == "soft":
        metrics["cppo/gate_mean"] = masked_mean(gate.weight, mask)
    return RuleOutput(
        per_token_loss=loss,
        keep=gate.keep,
        weight=gate.weight.to(loss.dtype),
        metrics=metrics,
    )

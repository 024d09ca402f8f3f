"""CPPO: a position-weighted token threshold plus a cumulative prefix budget (Eq. 8-10), as a
hard keep-mask (Algorithm 1) or a soft gate (App. C), for a ``[B, T]`` batch of left-aligned
responses with no Python loop over responses or positions.

Sources: the CPPO paper; UniRL's ``unirl/algorithms/cppo.py`` (the official code, whose
conventions are the defaults); verl PR #6731 (padded position horizon, clamp factor 5, ratio
cap 20). :mod:`cppo.rules.reference` transcribes Algorithm 1 in plain Python; the code here
runs in float64 with the same operation order, so the two agree bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cppo.rules.base import (
    RuleBatch,
    RuleOutput,
    base_metrics,
    masked_surrogate_loss,
    outward_mask,
    ratio_from_log_ratio,
)
from cppo.rules.ops import count_share, masked_mean, masked_quantile, selected_mean, shuffled_ranks
from cppo.rules.registry import RATIO_CAP, Param, RuleConfigError, register_rule

__all__ = [
    "CPPOGate",
    "CPPOParams",
    "algorithm1",
    "cppo_gate",
    "cppo_mask",
    "cppo_soft_weight",
    "masked_quantile",
    "shuffled_ranks",
    "cppo_rule",
]

_DT = torch.float64


def algorithm1(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    p: CPPOParams,
    diagnostics: bool = True,
) -> CPPOGate:
    """Algorithm 1 on a batch: term t is kept iff inward (A_t (rho_t - 1) <= 0) or Z_t <= c_t,
    Z_t = w_t D_t, c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1}), where S_t and W_t sum
    Z and w over every real token up to t (kept or not, inward or not), S_0 = W_0 = 0.

    ``p.soft``: the soft gate instead of the keep decision. Without ``diagnostics``
    (cppo_mask) the float weight and the token/prefix split are not computed.
    """
    # in place on few float64 buffers: at B=64, T=8192 each [B, T] temporary costs 4 MiB
    with torch.no_grad():
        m, n = _mask_and_lengths(divergence, log_ratio, response_mask, p.horizon)
        outward = _outward(log_ratio, advantages) & m  # A_t (rho_t - 1) > 0
        D = _finite_divergence(divergence)
        w = position_weights(m, n, p)  # w_t
        delta_b = effective_delta_b(D, m, n, p)  # [B]
        Z = D.mul_(w)  # Z_t = w_t D_t (0 on padding), over D's buffer
        S = budget = None
        if p.prefix_budget:
            S = prefix_sums(Z)  # S[:, :-1] = S_{t-1}, S[:, 1:] = S_t
            W_prev = prefix_sums(w)[:, :-1]  # W_{t-1}
            budget = W_prev.mul_(delta_b.unsqueeze(-1)).add_(p.delta)  # delta + delta_b W_{t-1}
            budget[:, :1] = p.delta  # t = 1: exactly delta, also for delta_b = inf
        if p.soft:
            weight, reduced = soft_gate(Z, S, budget, outward, m, p.delta)
            keep = m & (weight > 0)
        else:
            # c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1}), in place over the budget
            c = budget.sub_(S[:, :-1]).clamp_(max=p.delta) if budget is not None else p.delta
            feasible = c >= Z  # the reference's test
            keep = (feasible | ~outward) & m
            weight = keep.to(_DT) if diagnostics else None
            reduced = outward & ~feasible if diagnostics else None
        token_violation, prefix_violation = (
            split_violations(reduced, Z, p.delta) if diagnostics else (None, None)
        )
    return CPPOGate(
        keep=keep,
        weight=weight,
        outward=outward,
        token_violation=token_violation,
        prefix_violation=prefix_violation,
        position_weight=w,
        delta_b_eff=delta_b,
    )


@dataclass(frozen=True)
class CPPOParams:
    """The thresholds and switches of Algorithm 1 (values: the paper's Table 3).

    delta: the token threshold. delta_b: budget gained per unit of position weight, a float or
    a ``[B]`` tensor (one per response; with ``adaptive_delta_b`` the lower clamp). w_min: the
    last position's weight. adaptive_delta_b, delta_b_quantile (q), delta_b_max_factor (f):
    delta_b per response = clamp(P_q(D), delta_b, f delta_b). position_weight / prefix_budget:
    the "w/o ..." ablations when False. soft: the soft gate (App. C) instead of the hard mask.
    shuffle_seed: the "shuffled weights" ablation. horizon: the T of the position weights for
    every response (verl's padded convention); None: each response's own length.
    """

    delta: float
    delta_b: float | Tensor
    w_min: float
    adaptive_delta_b: bool = False
    position_weight: bool = True
    prefix_budget: bool = True
    soft: bool = False
    shuffle_seed: int | None = None
    delta_b_quantile: float = 0.9
    delta_b_max_factor: float = 2.0
    horizon: int | None = None

    def __post_init__(self) -> None:
        if self.delta <= 0:
            raise ValueError(f"delta must be > 0, got {self.delta}")
        if not 0.0 < self.w_min <= 1.0:
            raise ValueError(f"w_min must be in (0, 1], got {self.w_min}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, seed: int, width: int) -> CPPOParams:
        """From the rule's resolved config; ``seed`` shuffles the weights when
        ``shuffle_weights`` is set, ``width`` (the padded T) is the horizon unless ``horizon``."""
        padded = cfg["position_horizon"] == "padded"
        return cls(
            delta=cfg["delta"],
            delta_b=cfg["delta_b"],
            w_min=cfg["w_min"],
            adaptive_delta_b=cfg["adaptive_delta_b"],
            position_weight=cfg["position_weight"],
            prefix_budget=cfg["prefix_budget"],
            soft=cfg["gate"] == "soft",
            shuffle_seed=seed if cfg["shuffle_weights"] else None,
            delta_b_quantile=cfg["delta_b_quantile"],
            delta_b_max_factor=cfg["delta_b_max_factor"],
            horizon=(cfg["horizon"] or width) if padded else None,
        )


@dataclass
class CPPOGate:
    """Everything the CPPO gate computes for a batch (all ``[B, T]`` unless noted).

    keep: bool, term contributes gradient (padding False). weight: float64 gate value (1/0 for
    the hard mask, g(x) for outward terms under the soft gate, 0 on padding). outward: bool.
    token_violation / prefix_violation: outward terms masked (hard) or down-weighted (soft)
    with w_t D_t > delta, resp. only through the prefix budget. position_weight: w_t used.
    delta_b_eff: ``[B]`` effective delta_b per response. cppo_mask leaves weight and the
    violations None.
    """

    keep: Tensor
    weight: Tensor | None
    outward: Tensor
    token_violation: Tensor | None
    prefix_violation: Tensor | None
    position_weight: Tensor
    delta_b_eff: Tensor


# ---------------------------------------------------------------------------------------------
# the terms of Algorithm 1
# ---------------------------------------------------------------------------------------------

# Divergence given as NaN/inf is treated as this (finite, so the budget arithmetic stays
# finite): the term is rejected and the prefix budget is exhausted from there on.
_BIG = 1e30


def _mask_and_lengths(
    divergence: Tensor, log_ratio: Tensor, response_mask: Tensor, horizon: int | None
) -> tuple[Tensor, Tensor]:
    """The bool mask and the response lengths ``[B]``, after checking shapes and horizon."""
    m = response_mask.bool()
    if divergence.shape != m.shape or log_ratio.shape != m.shape or m.dim() != 2:
        raise ValueError(
            f"divergence {tuple(divergence.shape)}, log_ratio {tuple(log_ratio.shape)} and "
            f"response_mask {tuple(m.shape)} must share one [B, T] shape"
        )
    n = m.sum(-1, dtype=torch.int32).long()
    if horizon is not None and m.shape[0] and int(n.max()) > horizon:
        raise ValueError(
            f"position horizon {horizon} is shorter than a response ({int(n.max())} tokens)"
        )
    return m, n


def _outward(log_ratio: Tensor, advantages: Tensor) -> Tensor:
    """A_t (rho_t - 1) > 0 from signs only (no cast); ``[B]`` advantages broadcast per row."""
    adv = advantages.detach()
    return outward_mask(log_ratio.detach(), adv.unsqueeze(-1) if adv.dim() == 1 else adv)


def _finite_divergence(divergence: Tensor) -> Tensor:
    """D as a fresh float64 buffer (Z is later computed in place over it), NaN/inf -> _BIG."""
    D = divergence.detach().to(_DT, copy=True)
    return D.nan_to_num_(nan=_BIG, posinf=_BIG, neginf=0.0)


def position_weights(m: Tensor, n: Tensor, p: CPPOParams) -> Tensor:
    """w_t = 1 - (1 - w_min) (t - 1) / (T - 1) on real tokens (w_1 = 1; T = 1 gives w_1 = 1),
    0 on padding; all ones when ``p.position_weight`` is False.

    T is the response's own length (the paper's Eq. 9 and UniRL, the default) or ``p.horizon``
    (verl PR #6731 "keys the schedule on the fixed padded length": a short response then sees
    weights near 1 only). With ``p.shuffle_seed`` the multiset {w_t} is permuted within each
    response (the shuffled-weights ablation).
    """
    if not p.position_weight:
        return m.to(_DT)
    if p.shuffle_seed is None:
        w = torch.cumsum(m, dim=-1, dtype=_DT).sub_(1.0)  # t - 1
    else:
        w = shuffled_ranks(m, p.shuffle_seed).to(_DT)
    length = n if p.horizon is None else torch.full_like(n, p.horizon)
    denom = (length - 1).clamp_(min=1).to(_DT).unsqueeze(-1)
    # 1 - (1 - w_min) (t - 1) / (T - 1), in the reference's operation order
    return w.mul_(1.0 - p.w_min).div_(denom).neg_().add_(1.0).masked_fill_(~m, 0.0)


def effective_delta_b(D: Tensor, m: Tensor, n: Tensor, p: CPPOParams) -> Tensor:
    """delta_b per response ``[B]``; adaptive: clamp(P_q(D_1..D_T), delta_b, f delta_b).

    q = 0.9 and f = 2 by default (UniRL and the paper; verl PR #6731 raised f to 5 in its commit
    "tune hyperparameter"). P_q is the linear quantile of the response's real-token D values,
    the default of ``torch.quantile``, which the official code calls per response.
    """
    if isinstance(p.delta_b, Tensor):
        db = p.delta_b.detach().to(_DT).reshape(-1).expand(m.shape[0])
    else:
        db = torch.full((m.shape[0],), float(p.delta_b), dtype=_DT, device=m.device)
    if not p.adaptive_delta_b:
        return db
    q = masked_quantile(D, m, p.delta_b_quantile)
    q = torch.where(n > 0, q, db)
    return torch.clamp(q, min=db, max=p.delta_b_max_factor * db)


def prefix_sums(x: Tensor) -> Tensor:
    """``[B, T + 1]``, column t = x_1 + ... + x_t (column 0: the empty sum 0).

    [:, :-1] are the exclusive sums S_{t-1} / W_{t-1} and [:, 1:] the inclusive ones, as views
    of one buffer (no shifted copy); the sums are ``torch.cumsum``'s, the reference's order.
    """
    out = x.new_empty(x.shape[0], x.shape[1] + 1)
    out[:, 0] = 0.0
    torch.cumsum(x, dim=-1, out=out[:, 1:])
    return out


def soft_gate(
    Z: Tensor,
    S: Tensor | None,
    budget: Tensor | None,
    outward: Tensor,
    m: Tensor,
    delta: float,
) -> tuple[Tensor, Tensor]:
    """The soft gate of App. C: (weight, down-weighted outward terms).

    x_t = max(w_t D_t / delta, S_t / (delta + delta_b W_{t-1})) (the first term alone without
    the prefix budget); outward terms get g(x_t) = min(1, 1 / x_t), inward ones 1, padding 0.
    Consumes ``S`` (divided in place).
    """
    x = Z / delta
    if budget is not None:
        # at t = 1 both terms are Z_1 / delta (S_1 = Z_1, budget delta)
        torch.maximum(x, S[:, 1:].div_(budget), out=x)
    reduced = outward & (x > 1.0)
    return torch.where(reduced, x.reciprocal_(), m.to(_DT)), reduced


def split_violations(reduced: Tensor, Z: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """The masked (hard) / down-weighted (soft) outward terms split in two: those with
    w_t D_t > delta (the token threshold alone rejects them, whatever the budget) and the rest
    (rejected only because the prefix budget was exhausted)."""
    token_over = delta < Z
    return reduced & token_over, reduced & ~token_over


# ---------------------------------------------------------------------------------------------
# functional API: a CPPOParams, or its fields as keywords
# ---------------------------------------------------------------------------------------------


def _params(params: CPPOParams | None, fields: dict[str, Any]) -> CPPOParams:
    """``params`` with ``fields`` replaced, or a new CPPOParams from ``fields``."""
    if params is None:
        return CPPOParams(**fields)
    return dataclasses.replace(params, **fields) if fields else params


def cppo_gate(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    params: CPPOParams | None = None,
    **fields: Any,
) -> CPPOGate:
    """Vectorised Algorithm 1 (hard mask, or soft gate with ``soft=True``) with all diagnostics.

    Args:
        divergence: D_t ``[B, T]`` (any estimator from :mod:`cppo.divergence`).
        log_ratio: log pi(y_t) - log mu(y_t), ``[B, T]`` (only its sign is read).
        advantages: ``[B]`` or ``[B, T]``.
        response_mask: bool ``[B, T]``, responses left-aligned.
        params / fields: a :class:`CPPOParams`, its fields as keywords (``delta``, ``delta_b``
            and ``w_min`` required), or both (the keywords replace fields of ``params``).
    """
    p = _params(params, fields)
    return algorithm1(divergence, log_ratio, advantages, response_mask, p)


def cppo_mask(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    params: CPPOParams | None = None,
    **fields: Any,
) -> Tensor:
    """CPPO hard keep-mask, BoolTensor ``[B, T]`` (True = term kept; padding False).

    Arguments as for :func:`cppo_gate` (``soft`` must stay False).
    """
    p = _params(params, fields)
    if p.soft:
        raise ValueError("cppo_mask is the hard mask; use cppo_soft_weight for the soft gate")
    return algorithm1(divergence, log_ratio, advantages, response_mask, p, diagnostics=False).keep


def cppo_soft_weight(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    params: CPPOParams | None = None,
    **fields: Any,
) -> Tensor:
    """Soft-gate weights ``[B, T]`` (float64): g(x_t) on outward terms, 1 inward, 0 padding.

    Arguments as for :func:`cppo_gate`.
    """
    gate = cppo_gate(divergence, log_ratio, advantages, response_mask, params, soft=True, **fields)
    return gate.weight


# ---------------------------------------------------------------------------------------------
# the registered rule
# ---------------------------------------------------------------------------------------------


def _check_cfg(cfg: dict[str, Any]) -> None:
    if cfg["delta_b_max_factor"] < 1.0:
        raise RuleConfigError(
            f"rule 'cppo': config key 'delta_b_max_factor' must be >= 1; got "
            f"{cfg['delta_b_max_factor']}"
        )


@register_rule(
    "cppo",
    divergence="topk_tv",
    draws_random=lambda cfg: cfg["shuffle_weights"],
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

    Metrics besides the common ones: ``mask/token_fraction`` and ``mask/prefix_fraction`` (the
    token / prefix violations as fractions of all response tokens, adding up to
    ``mask/fraction``), ``cppo/prefix_share`` = prefix-masked / masked (the paper's Fig. 7),
    ``cppo/delta_b_eff`` (mean effective delta_b over non-empty responses) and, for the soft
    gate, ``cppo/gate_mean``.
    """
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    div = batch.divergence_2d()
    p = CPPOParams.from_config(cfg, seed=batch.seed, width=mask.shape[-1])
    gate = algorithm1(div, lr, adv, mask, p)
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    loss = masked_surrogate_loss(ratio, adv, gate.weight, mask, cfg["ratio_cap"])

    metrics = base_metrics(mask, ratio, gate.keep, div, gate.outward, cfg["ratio_cap"])
    reduced = gate.token_violation | gate.prefix_violation
    metrics["mask/fraction"] = masked_mean(reduced.to(_DT), mask)
    metrics["mask/token_fraction"] = masked_mean(gate.token_violation.to(_DT), mask)
    metrics["mask/prefix_fraction"] = masked_mean(gate.prefix_violation.to(_DT), mask)
    metrics["cppo/prefix_share"] = count_share(gate.prefix_violation.sum(), reduced.sum())
    metrics["cppo/delta_b_eff"] = selected_mean(gate.delta_b_eff, mask.any(-1), cfg["delta_b"])
    if p.soft:
        metrics["cppo/gate_mean"] = masked_mean(gate.weight, mask)
    return RuleOutput(
        per_token_loss=loss,
        keep=gate.keep,
        weight=gate.weight.to(loss.dtype),
        metrics=metrics,
    )

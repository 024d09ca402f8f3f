"""TRM-Max / TRM-Avg (Li et al. 2025): sequence-level trust-region masking.

A response is kept whole iff max_t D_t <= delta (TRM-Max) or mean_t D_t <= delta_avg
(TRM-Avg), over its real tokens. Kept responses use the plain ratio-advantage surrogate
-rho_t A_t; rejected ones contribute zero loss but stay in the normaliser (their tokens remain
in ``response_mask``). ``keep_inward: true`` keeps the inward terms of rejected responses (a
token-level variant; off by default, the appendix drops the whole response).

The per-token detector D_t is the rule's ``divergence`` (the estimator), and each estimator
has its own published threshold, used when ``delta`` / ``delta_avg`` is null:

| criterion | estimator | threshold | source |
|---|---|---|---|
| max | ``topk_kl`` (default) | 0.05 | TRM paper, per-token KL(mu || pi) as the CPPO appendix uses it |
| avg | ``topk_kl`` (default) | 0.001 | TRM paper, same |
| avg | ``k3`` (rho - 1 - log rho) | 0.01 | verl ``seq_mean_k3`` presets (TRM author's PR #4544) |
| max | ``abs_log_ratio`` (abs log rho) | sqrt(5) = 2.236 | verl ``seq_max_k2`` = 2.5, i.e. (log rho)^2 / 2 <= 2.5 (verl docs and multi-RS example) |

Other estimators (``topk_tv``, which the CPPO project page names for every divergence mask;
binary TV / KL; k3 with max) have no published threshold and need an explicit one.
"""

from __future__ import annotations

import math
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
from cppo.rules.ops import count_share, selected_mean
from cppo.rules.registry import RATIO_CAP, Param, RuleConfigError, register_rule

__all__ = ["TRM_THRESHOLDS", "trm_sequence_score", "trm_max_rule", "trm_avg_rule"]

# (rule, estimator) -> published threshold (table in the module docstring)
TRM_THRESHOLDS: dict[tuple[str, str], float] = {
    ("trm_max", "topk_kl"): 0.05,
    ("trm_avg", "topk_kl"): 0.001,
    ("trm_avg", "k3"): 0.01,
    ("trm_max", "abs_log_ratio"): math.sqrt(2 * 2.5),
}


def trm_sequence_score(kl: Tensor, response_mask: Tensor, reduce: str) -> Tensor:
    """Per-response max or mean of the per-token KL over real tokens, ``[B]`` (0 if empty)."""
    m = response_mask.bool()
    d = kl.detach().double()
    if reduce == "max":
        s = torch.where(m, d, d.new_full((), float("-inf"))).amax(-1)
    elif reduce == "mean":
        s = torch.where(m, d, d.new_zeros(())).sum(-1) / m.sum(-1).clamp(min=1)
    else:
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    return torch.where(m.any(-1), s, d.new_zeros(()))


def _trm(batch: RuleBatch, cfg: dict[str, Any], reduce: str, threshold: float) -> RuleOutput:
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    kl = batch.divergence_2d()
    score = trm_sequence_score(kl, mask, reduce)
    seq_keep = score <= threshold  # NaN/inf (from NaN KL) rejects
    outward = outward_mask(lr.detach(), adv) & mask
    keep = mask & seq_keep.unsqueeze(-1)
    if cfg["keep_inward"]:
        keep = keep | (mask & ~outward)
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    weight = keep.to(ratio.dtype)
    loss = masked_surrogate_loss(ratio, adv, weight, mask, cfg["ratio_cap"])
    metrics = base_metrics(mask, ratio, keep, kl, outward, cfg["ratio_cap"])
    nonempty = mask.any(-1)
    metrics["trm/reject_fraction"] = count_share((~seq_keep & nonempty).sum(), nonempty.sum())
    metrics["trm/score_mean"] = selected_mean(score, nonempty, 0.0)
    return RuleOutput(per_token_loss=loss, keep=keep, weight=weight, metrics=metrics)


_COMMON = {
    "keep_inward": Param(False, bool),
    "ratio_cap": RATIO_CAP,
}


def _threshold_param() -> Param:
    return Param(
        None,
        float,
        optional=True,
        check=lambda x: x >= 0,
        requirement=">= 0",
        help="null = the estimator's published threshold",
    )


def _fill_threshold(rule: str, key: str):
    """Check hook: a null threshold becomes the estimator's published one (or an error)."""

    def check(cfg: dict[str, Any]) -> None:
        if cfg[key] is not None:
            return
        published = TRM_THRESHOLDS.get((rule, cfg["divergence"]))
        if published is None:
            known = ", ".join(f"{e} {v:g}" for (r, e), v in TRM_THRESHOLDS.items() if r == rule)
            raise RuleConfigError(
                f"rule {rule!r}: no published threshold for divergence {cfg['divergence']!r}; "
                f"set config key {key!r} (published: {known})"
            )
        cfg[key] = published

    return check


@register_rule(
    "trm_max",
    divergence="topk_kl",
    binding="trm/reject_fraction",
    params={"delta": _threshold_param(), **_COMMON},
    check=_fill_threshold("trm_max", "delta"),
)
def trm_max_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """TRM-Max: keep a response iff max_t D_t <= delta (Top-K KL: 0.05)."""
    return _trm(batch, cfg, "max", cfg["delta"])


@register_rule(
    "trm_avg",
    divergence="topk_kl",
    binding="trm/reject_fraction",
    params={"delta_avg": _threshold_param(), **_COMMON},
    check=_fill_threshold("trm_avg", "delta_avg"),
)
def trm_avg_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """TRM-Avg: keep a response iff mean_t D_t <= delta_avg (Top-K KL: 0.001)."""
    return _trm(batch, cfg, "mean", cfg["delta_avg"])

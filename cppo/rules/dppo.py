"""DPPO (Eq. 3): keep a term if it is inward or its divergence is within one threshold.

M_t = 1 iff A_t (rho_t - 1) <= 0 or D_t <= delta, the same delta at every position. D is any
estimator from :mod:`cppo.divergence`; the comparison uses Top-K TV (K = 20) at CPPO's delta.
"""

from __future__ import annotations

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
from cppo.rules.registry import RATIO_CAP, Param, register_rule

__all__ = ["dppo_mask", "dppo_rule"]


def dppo_mask(
    divergence: Tensor,
    log_ratio: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    delta: float,
) -> Tensor:
    """DPPO keep-mask, BoolTensor ``[B, T]`` (True = kept; padding False).

    NaN divergence counts as exceeding any threshold.
    """
    with torch.no_grad():
        m = response_mask.bool()
        lr = torch.nan_to_num(log_ratio.detach().double(), nan=0.0)
        adv = advantages.detach().double()
        if adv.dim() == 1:
            adv = adv.unsqueeze(-1).expand(m.shape)
        d = divergence.detach().double()
        within = d <= delta  # NaN compares False
        return m & (~outward_mask(lr, adv) | within)


@register_rule(
    "dppo",
    divergence="topk_tv",
    params={
        "delta": Param(0.15, float, check=lambda x: x > 0, requirement="> 0"),
        "ratio_cap": RATIO_CAP,
    },
)
def dppo_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """DPPO: -M_t rho_t A_t with the DPPO mask; default Top-K TV (K=20), delta 0.15."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    div = batch.divergence_2d()
    keep = dppo_mask(div, lr, adv, mask, delta=cfg["delta"])
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    weight = keep.to(ratio.dtype)
    loss = masked_surrogate_loss(ratio, adv, weight, mask, cfg["ratio_cap"])
    outward = outward_mask(lr.detach(), adv) & mask
    metrics = base_metrics(mask, ratio, keep, div, outward, cfg["ratio_cap"])
    return RuleOutput(per_token_loss=loss, keep=keep, weight=weight, metrics=metrics)

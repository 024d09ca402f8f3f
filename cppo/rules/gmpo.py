"""GMPO (Zhao et al. 2025, arXiv 2507.20673; verl's ``geo_mean`` loss mode): the geometric
mean of the token ratios, each log-ratio clipped on the side the advantage pushes.

    l_{i,t} = sign(A_{i,t}) * min( sign(A_{i,t}) log rho_{i,t},
                                   sign(A_{i,t}) clip(log rho_{i,t}, -eps_low, eps_high) )
    r_i     = exp( (1/|y_i|) sum_t l_{i,t} )
    L_i     = -Abar_i r_i,           Abar_i = (1/|y_i|) sum_t A_{i,t}

Defaults eps_low = eps_high = 0.4 (the paper's clip range (e^-0.4, e^0.4); verl's example sets
clip_ratio_low/high 0.4). The per-token loss carries L_i on every token of response i, so the
catalogue's seq-mean-token-mean aggregation gives the paper's mean over responses. A token
passes gradient unless its log-ratio is clipped (outward and outside [-eps_low, eps_high]).
"""

from __future__ import annotations

from typing import Any

import torch

from cppo.rules.base import RuleBatch, RuleOutput, base_metrics, outward_mask
from cppo.rules.ops import selected_mean, sequence_log_ratio
from cppo.rules.registry import Param, register_rule

__all__ = ["gmpo_rule"]


@register_rule(
    "gmpo",
    params={
        "eps_low": Param(0.4, float, check=lambda x: x >= 0, requirement=">= 0"),
        "eps_high": Param(0.4, float, check=lambda x: x >= 0, requirement=">= 0"),
    },
)
def gmpo_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """GMPO: -Abar_i exp(mean_t of the sign-aware clipped log-ratios)."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    clamp = cfg["log_ratio_clamp"]
    if clamp is not None:
        lr = lr.clamp(-clamp, clamp)
    sign = torch.sign(adv)
    clipped = lr.clamp(-cfg["eps_low"], cfg["eps_high"])
    l_t = sign * torch.minimum(sign * lr, sign * clipped)
    # A = 0 makes sign 0 and l_t 0: that token's ratio then counts as 1 in the mean
    r = torch.exp(sequence_log_ratio(l_t, mask))
    abar = sequence_log_ratio(adv, mask)
    seq_loss = -abar * r
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    loss = torch.where(mask, seq_loss.unsqueeze(-1).expand(mask.shape), zero)
    with torch.no_grad():
        lrd = lr.detach()
        outside = (lrd < -cfg["eps_low"]) | (lrd > cfg["eps_high"])
        outward = outward_mask(lrd, adv) & mask
        keep = ~(outward & outside) & mask
    metrics = base_metrics(mask, lrd.exp(), keep, batch.divergence_2d(), outward)
    metrics["gmpo/seq_ratio_abs_dev_mean"] = selected_mean(
        (r.detach() - 1.0).abs(), mask.any(-1), 0.0
    )
    return RuleOutput(per_token_loss=loss, keep=keep, weight=keep.to(loss.dtype), metrics=metrics)

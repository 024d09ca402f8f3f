"""IcePop (Ling Team 2025, "Every Step Evolves", arXiv 2510.18855; verl's preset
``decoupled_token_icepop``): token ratios outside a band [alpha, beta] get weight zero.

    M_t = 1[alpha <= rho_t <= beta],     L_t = -M_t rho_t A_t

(gradient M_t rho_t A_t grad log pi: the importance weight kept inside the band, zeroed
outside, whatever the sign of A_t). Defaults alpha 0.5, beta 5.0 (the paper and verl's preset).
The paper applies the band to pi_old / mu next to a PPO clip on pi / pi_old; anchored on mu as
every rule here, the band applies to rho = pi / mu, which also bounds the drift within an
iteration.
"""

from __future__ import annotations

from typing import Any

from cppo.rules.base import (
    RuleBatch,
    RuleOutput,
    base_metrics,
    masked_surrogate_loss,
    outward_mask,
    ratio_from_log_ratio,
)
from cppo.rules.ops import masked_mean
from cppo.rules.registry import Param, RuleConfigError, register_rule

__all__ = ["icepop_rule"]


def _check_cfg(cfg: dict[str, Any]) -> None:
    if cfg["low"] > 1.0 or cfg["high"] < 1.0:
        raise RuleConfigError(
            f"rule 'icepop': the band [low, high] = [{cfg['low']}, {cfg['high']}] must contain 1"
        )


@register_rule(
    "icepop",
    params={
        "low": Param(0.5, float, check=lambda x: x >= 0, requirement=">= 0"),
        "high": Param(5.0, float, check=lambda x: x > 0, requirement="> 0"),
    },
    check=_check_cfg,
)
def icepop_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """IcePop: -1[low <= rho <= high] rho A, band [0.5, 5] by default."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    r = ratio.detach()
    keep = (r >= cfg["low"]) & (r <= cfg["high"]) & mask
    weight = keep.to(ratio.dtype)
    loss = masked_surrogate_loss(ratio, adv, weight, mask, None)
    outward = outward_mask(lr.detach(), adv) & mask
    metrics = base_metrics(mask, ratio, keep, batch.divergence_2d(), outward)
    metrics["icepop/below_fraction"] = masked_mean((r < cfg["low"]).to(r.dtype), mask)
    metrics["icepop/above_fraction"] = masked_mean((r > cfg["high"]).to(r.dtype), mask)
    return RuleOutput(per_token_loss=loss, keep=keep, weight=weight, metrics=metrics)

"""Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training"; verl ``rollout_is=token``, TRL
``vllm_importance_sampling_cap``): the policy-gradient loss weighted by the truncated ratio
to the rollout policy mu.

    L_t = -min(rho_t, C) A_t        with gradient  -min(rho_t, C) A_t grad log pi(y_t)

(value and gradient of -sg(min(1, C / rho_t)) rho_t A_t). C = 2 is verl's
``rollout_is_threshold`` default; TRL's default cap is 3 (set ``cap: 3.0``). Anchored on mu as
every rule here, so the weight corrects both the rollout/trainer mismatch and the policy's drift
within an iteration; nothing is masked. Its gradient equals CISPO's at the same cap (a test
checks it); the two are kept apart because they are named and defaulted apart.
"""

from __future__ import annotations

from typing import Any

import torch

from cppo.rules.base import (
    RuleBatch,
    RuleOutput,
    base_metrics,
    masked_surrogate_loss,
    outward_mask,
    ratio_from_log_ratio,
)
from cppo.rules.ops import masked_mean
from cppo.rules.registry import Param, register_rule

__all__ = ["tis_rule"]


@register_rule("tis", params={"cap": Param(2.0, float, check=lambda x: x > 0, requirement="> 0")})
def tis_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """TIS: -min(rho, C) A, C = 2 by default."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    loss = masked_surrogate_loss(ratio, adv, mask.to(ratio.dtype), mask, cfg["cap"])
    r = ratio.detach()
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    weight = torch.where(mask, r.clamp(max=cfg["cap"]), zero)
    outward = outward_mask(lr.detach(), adv) & mask
    metrics = base_metrics(mask, ratio, mask, batch.divergence_2d(), outward)
    metrics["tis/capped_fraction"] = masked_mean((r > cfg["cap"]).to(r.dtype), mask)
    metrics["tis/weight_mean"] = masked_mean(weight, mask)
    return RuleOutput(per_token_loss=loss, keep=mask.clone(), weight=weight, metrics=metrics)

"""CISPO (MiniMax-M1): clipped, stop-gradient IS weight times the log-probability.

Per-token loss: -sg(clip(rho_t, cap_low, cap)) A_t log pi(y_t); nothing is masked, every
token passes gradient A_t min(rho_t, cap) grad log pi. Token-level normalisation
(token-mean). MiniMax-M1 gives no number for the cap; the default C = 5 follows the DPPO
paper's scaling runs and TRL's recommendation (an absolute cap on rho). verl's example caps at
1 + 0.2 instead: set ``cap: 1.2`` for that reading. ``cap_low`` (absolute lower bound on the
weight) is off by default, as in MiniMax-M1.

Truncated importance sampling (TIS; Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training"; verl ``rollout_is=token``, TRL
``vllm_importance_sampling_cap``) is -min(rho_t, C) A_t with gradient
-min(rho_t, C) A_t grad log pi: this rule's gradient at cap C (only the logged loss value
differs), so the methods catalogue's ``tis`` is this rule with verl's C = 2 (TRL's default is
3). Anchored on mu as every rule here, the weight corrects both the rollout/trainer mismatch and
the policy's drift within an iteration; verl applies it to pi_old / mu next to a PPO clip.
"""

from __future__ import annotations

from typing import Any

import torch

from cppo.rules.base import RuleBatch, RuleOutput, base_metrics, ratio_from_log_ratio
from cppo.rules.ops import masked_mean
from cppo.rules.registry import Param, RuleConfigError, register_rule

__all__ = ["cispo_rule"]


def _check_cfg(cfg: dict[str, Any]) -> None:
    if cfg["cap_low"] is not None and cfg["cap_low"] > cfg["cap"]:
        raise RuleConfigError(
            f"rule 'cispo': config key 'cap_low' ({cfg['cap_low']}) must be <= cap ({cfg['cap']})"
        )


@register_rule(
    "cispo",
    params={
        "cap": Param(5.0, float, check=lambda x: x > 0, requirement="> 0"),
        "cap_low": Param(None, float, optional=True, check=lambda x: x >= 0, requirement=">= 0"),
    },
    check=_check_cfg,
    binding="cispo/capped_fraction",
)
def cispo_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """CISPO: -sg(min(rho, C)) A log pi, C = 5 by default."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    weight = ratio.detach().clamp(min=cfg["cap_low"], max=cfg["cap"])
    weight = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    loss = -(weight * adv * batch.safe_logp())
    loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    metrics = base_metrics(mask, ratio, mask, batch.divergence_2d())
    r = ratio.detach()
    metrics["cispo/capped_fraction"] = masked_mean((r > cfg["cap"]).to(r.dtype), mask)
    metrics["cispo/weight_mean"] = masked_mean(weight, mask)
    return RuleOutput(per_token_loss=loss, keep=mask.clone(), weight=weight, metrics=metrics)

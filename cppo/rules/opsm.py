"""Off-policy sequence masking (OPSM; DeepSeek-AI 2025, DeepSeek-V3.2 report, arXiv 2512.02556;
TRL ``off_policy_mask_threshold``): the clipped PPO loss, with a negative-advantage response
dropped when the policy has drifted from mu on it by more than delta on average.

    M_{i,t} = 0  if  A_{i,t} < 0  and  (1/|y_i|) sum_t log( mu(y_{i,t}) / pi(y_{i,t}) ) > delta,
              1  otherwise
    L_{i,t} = M_{i,t} * L^{clip}_{i,t}            (L^clip: the ``grpo`` rule's clipped loss)

Defaults: delta 0.5 (the value TRL's documentation suggests; DeepSeek give none), the clip
parameters as the ``grpo`` rule (clip-higher 0.2 / 0.28, dual clip 3).
"""

from __future__ import annotations

from typing import Any

import torch

from cppo.rules.base import RuleBatch, RuleOutput, base_metrics, outward_mask, ratio_from_log_ratio
from cppo.rules.grpo import PPO_CLIP_PARAMS, check_dual_clip, grpo_keep, ppo_clip_loss
from cppo.rules.ops import masked_mean, sequence_log_ratio
from cppo.rules.registry import Param, register_rule

__all__ = ["opsm_rule"]


@register_rule(
    "opsm",
    params={
        **PPO_CLIP_PARAMS,
        "threshold": Param(0.5, float, check=lambda x: x >= 0, requirement=">= 0"),
    },
    check=check_dual_clip,
)
def opsm_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """OPSM: PPO clip, minus the negative-advantage responses with mean log(mu/pi) > delta."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    clip = {k: cfg[k] for k in PPO_CLIP_PARAMS}
    with torch.no_grad():
        drift = -sequence_log_ratio(lr.detach(), mask)  # mean log(mu / pi) per response
        dropped = (adv < 0) & (drift.unsqueeze(-1) > cfg["threshold"]) & mask
    loss = ppo_clip_loss(ratio, adv, **clip)
    loss = torch.where(mask & ~dropped, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    keep = grpo_keep(ratio, lr, adv, mask, **clip) & ~dropped
    outward = outward_mask(lr.detach(), adv) & mask
    metrics = base_metrics(mask, ratio, keep, batch.divergence_2d(), outward)
    metrics["opsm/masked_fraction"] = masked_mean(dropped.to(ratio.dtype), mask)
    return RuleOutput(per_token_loss=loss, keep=keep, weight=keep.to(loss.dtype), metrics=metrics)

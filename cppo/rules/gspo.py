"""GSPO (Zheng et al. 2025, arXiv 2507.18071): the PPO clip on a sequence-level ratio.

    s_i      = exp( (1/|y_i|) sum_t log rho_{i,t} )          (geometric mean of the token ratios)
    s_{i,t}  = sg(s_i) * pi(y_{i,t}) / sg(pi(y_{i,t}))         (GSPO-token: value s_i,
                                                               gradient s_i grad log pi)
    L_{i,t}  = max(-A_{i,t} s_{i,t}, -A_{i,t} clip(s_{i,t}, 1 - eps_low, 1 + eps_high))

aggregated seq-mean-token-mean (the methods catalogue sets it, as verl's ``gspo`` loss mode and
TRL's ``importance_sampling_level="sequence"`` do). Defaults eps_low 3e-4, eps_high 4e-4 (the
paper; verl's GSPO recipe). With one advantage per response, a response is clipped or kept as a
whole. The sequence log-ratio is clamped to +-``log_ratio_clamp`` before exp.
"""

from __future__ import annotations

from typing import Any

import torch

from cppo.rules.base import (
    RuleBatch,
    RuleOutput,
    base_metrics,
    outward_mask,
    ratio_from_log_ratio,
)
from cppo.rules.grpo import ppo_clip_loss
from cppo.rules.ops import selected_mean, sequence_log_ratio
from cppo.rules.registry import Param, register_rule

__all__ = ["gspo_rule"]


@register_rule(
    "gspo",
    params={
        "eps_low": Param(3e-4, float, check=lambda x: 0 <= x < 1, requirement="0 <= eps_low < 1"),
        "eps_high": Param(4e-4, float, check=lambda x: x >= 0, requirement=">= 0"),
    },
)
def gspo_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """GSPO-token: the clipped loss on the sequence ratio s_i, gradient s_i A grad log pi."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    logp = batch.safe_logp()
    clamp = cfg["log_ratio_clamp"]
    seq_lr = sequence_log_ratio(lr.detach(), mask)
    if clamp is not None:
        seq_lr = seq_lr.clamp(-clamp, clamp)
    seq_lr_2d = seq_lr.unsqueeze(-1).expand(mask.shape)
    s = torch.exp(seq_lr_2d + logp - logp.detach())
    loss = ppo_clip_loss(s, adv, eps_low=cfg["eps_low"], eps_high=cfg["eps_high"], dual_clip=None)
    loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    with torch.no_grad():
        sd = s.detach()
        inside = (sd >= 1.0 - cfg["eps_low"]) & (sd <= 1.0 + cfg["eps_high"])
        keep = (~outward_mask(seq_lr_2d, adv) | inside) & mask
    token_ratio = ratio_from_log_ratio(lr.detach(), clamp)
    outward = outward_mask(lr.detach(), adv) & mask  # token-level, as every rule reports it
    metrics = base_metrics(mask, token_ratio, keep, batch.divergence_2d(), outward)
    rows = mask.any(-1)
    metrics["gspo/seq_ratio_abs_dev_mean"] = selected_mean((seq_lr.exp() - 1.0).abs(), rows, 0.0)
    return RuleOutput(per_token_loss=loss, keep=keep, weight=keep.to(loss.dtype), metrics=metrics)

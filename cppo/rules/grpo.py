"""GRPO / PPO clip (Eq. 2) with Clip-Higher and an optional dual clip.

Per-token loss (verl's vanilla PPO loss):
    L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))
and, with a dual clip c (only for A_t < 0), L_t = min(L_t, -c A_t).

Its gradient equals that of the masked ratio-advantage surrogate -M_t rho_t A_t with
    M_t = [A_t (rho_t - 1) <= 0  or  1 - eps_low <= rho_t <= 1 + eps_high]
          and not [A_t < 0 and rho_t > c],
which is the ``keep`` returned here (tests check the equality with autograd). Note the dual
clip also drops some *inward* terms (A < 0, rho > c). Defaults: (eps_low, eps_high) =
(0.2, 0.28) as in the paper's GRPO row; dual clip c = 3 as verl's default (the paper does not
say whether it was on; set ``dual_clip: null`` to disable).
"""

from __future__ import annotations

from typing import Any

import torch

from cppo.rules.base import (
    RuleBatch,
    RuleOutput,
    base_metrics,
    outward_mask,
    ratio_cap_factor,
    ratio_from_log_ratio,
)
from cppo.rules.ops import masked_mean
from cppo.rules.registry import RATIO_CAP, Param, RuleConfigError, register_rule

__all__ = ["PPO_CLIP_PARAMS", "check_dual_clip", "grpo_keep", "grpo_rule", "ppo_clip_loss"]


def grpo_keep(
    ratio: torch.Tensor,
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> torch.Tensor:
    """Terms through which the clipped PPO loss passes gradient (bool ``[B, T]``)."""
    with torch.no_grad():
        r = ratio.detach()
        inside = (r >= 1.0 - eps_low) & (r <= 1.0 + eps_high)
        keep = ~outward_mask(log_ratio.detach(), advantages) | inside
        if dual_clip is not None:
            keep = keep & ~((advantages < 0) & (r > dual_clip))
        return keep & response_mask


def ppo_clip_loss(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> torch.Tensor:
    """max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)), then min(., -c A) where A < 0."""
    loss = torch.maximum(
        -advantages * ratio, -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    )
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * dual_clip), loss)
    return loss


# The clip parameters, shared with the rules built on the same clipped loss (OPSM).
PPO_CLIP_PARAMS = {
    "eps_low": Param(0.2, float, check=lambda x: 0 <= x < 1, requirement="0 <= eps_low < 1"),
    "eps_high": Param(0.28, float, check=lambda x: x >= 0, requirement=">= 0"),
    "dual_clip": Param(3.0, float, optional=True),
}


def check_dual_clip(cfg: dict[str, Any]) -> None:
    if cfg["dual_clip"] is not None and cfg["dual_clip"] <= 1.0:
        raise RuleConfigError(
            f"config key 'dual_clip' must be > 1 (or null); got {cfg['dual_clip']}"
        )


@register_rule(
    "grpo",
    params={**PPO_CLIP_PARAMS, "ratio_cap": RATIO_CAP},
    check=check_dual_clip,
)
def grpo_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """PPO clipped loss with clip-higher (0.2, 0.28) and dual clip c (default 3)."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    c = cfg["dual_clip"]
    loss = ppo_clip_loss(ratio, adv, eps_low=cfg["eps_low"], eps_high=cfg["eps_high"], dual_clip=c)
    f = ratio_cap_factor(ratio, cfg["ratio_cap"])
    if f is not None:
        loss = loss * f
    loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    keep = grpo_keep(
        ratio, lr, adv, mask, eps_low=cfg["eps_low"], eps_high=cfg["eps_high"], dual_clip=c
    )
    outward = outward_mask(lr.detach(), adv) & mask
    metrics = base_metrics(mask, ratio, keep, batch.divergence_2d(), outward, cfg["ratio_cap"])
    if c is not None:
        r = ratio.detach()
        metrics["grpo/dual_clip_fraction"] = masked_mean(((adv < 0) & (r > c)).to(r.dtype), mask)
    return RuleOutput(per_token_loss=loss, keep=keep, weight=keep.to(loss.dtype), metrics=metrics)

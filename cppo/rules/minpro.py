"""MinPRO (Lei, Cheng, Tao 2026, arXiv 2601.22718): minimum prefix-ratio weighting.

What is implemented (the project spec's reading):

    m_t = min_{i < t} rho_i            (m_1 = 1; minimum over the preceding real tokens)
    w_t = sg(clip(m_t * rho_t, 1 - eps_low, 1 + eps_high))
    loss_t = -w_t A_t log pi(y_t)      (CISPO-style: gradient through log pi only)

token-mean aggregation, eps_low / eps_high = 0.2 / 0.28 (fallback; no values found).

Status of each part against the paper (searched: the paper's arXiv HTML abstract and
secondary summaries; the method section and any official code were not reachable):

* Confirmed by the paper's abstract (arxiv.org/abs/2601.22718): the exact off-policy
  correction for token t is the prefix importance ratio prod_{i<=t} rho_i, and MinPRO
  "replaces the unstable cumulative prefix ratio with a non-cumulative surrogate based on the
  minimum token-level ratio observed in the preceding prefix".
* Consistent with a secondary summary (emergentmind topic page): the surrogate
  "down-weights the gradient when any single-step ratio in the prefix is small".
* Not confirmed: that the weight is m_t * rho_t (vs m_t alone: ``include_current``), that the
  minimum excludes position t and is not capped at 1 (``cap_prefix_min_at_one``), the clip
  and its bounds, the stop-gradient log-prob (CISPO-style) form of the loss, the aggregation
  and every hyperparameter. These are configurable.

Computed in log space: log m_t is an exclusive running minimum (``torch.cummin``) of the
clamped log-ratio with padding at +inf, so tokens never see later or padding positions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cppo.rules.base import (
    RuleBatch,
    RuleOutput,
    base_metrics,
    ratio_from_log_ratio,
)
from cppo.rules.ops import masked_mean
from cppo.rules.registry import Param, register_rule

__all__ = ["prefix_min_log_ratio", "minpro_weight", "minpro_rule"]


def prefix_min_log_ratio(log_ratio: Tensor, response_mask: Tensor) -> Tensor:
    """log m_t = min over the real tokens before t of log rho_i (0 when there are none)."""
    m = response_mask.bool()
    lr = log_ratio.detach().masked_fill(~m, float("inf"))
    run = torch.cummin(lr, dim=-1).values
    prev = torch.nn.functional.pad(run, (1, 0), value=float("inf"))[:, :-1]
    return prev.masked_fill(torch.isinf(prev) & (prev > 0), 0.0)


def minpro_weight(
    log_ratio: Tensor,
    response_mask: Tensor,
    *,
    eps_low: float | None,
    eps_high: float | None,
    include_current: bool = True,
    cap_prefix_min_at_one: bool = False,
    log_ratio_clamp: float | None = 20.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Detached (w, log m, unclipped w): MinPRO weights ``[B, T]`` (0 on padding), the log
    prefix minima and the weights before the clip."""
    with torch.no_grad():
        lr = log_ratio.detach()
        if log_ratio_clamp is not None:
            lr = lr.clamp(-log_ratio_clamp, log_ratio_clamp)
        log_m = prefix_min_log_ratio(lr, response_mask)
        if cap_prefix_min_at_one:
            log_m = log_m.clamp(max=0.0)
        raw = torch.exp(log_m + lr) if include_current else torch.exp(log_m)
        w = raw
        lo = None if eps_low is None else 1.0 - eps_low
        hi = None if eps_high is None else 1.0 + eps_high
        if lo is not None or hi is not None:
            w = w.clamp(min=lo, max=hi)
        w = torch.where(response_mask.bool(), w, torch.zeros((), dtype=w.dtype, device=w.device))
    return w, log_m, raw


@register_rule(
    "minpro",
    params={
        "eps_low": Param(
            0.2, float, optional=True, check=lambda x: 0 <= x <= 1, requirement="[0, 1]"
        ),
        "eps_high": Param(0.28, float, optional=True, check=lambda x: x >= 0, requirement=">= 0"),
        "include_current": Param(True, bool),
        "cap_prefix_min_at_one": Param(False, bool),
    },
    binding="minpro/clip_fraction",
)
def minpro_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """MinPRO: -sg(clip(min_{i<t} rho_i * rho_t)) A_t log pi(y_t) (see module docstring)."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    w, log_m, raw = minpro_weight(
        lr,
        mask,
        eps_low=cfg["eps_low"],
        eps_high=cfg["eps_high"],
        include_current=cfg["include_current"],
        cap_prefix_min_at_one=cfg["cap_prefix_min_at_one"],
        log_ratio_clamp=cfg["log_ratio_clamp"],
    )
    loss = -(w * adv * batch.safe_logp())
    loss = torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    ratio = ratio_from_log_ratio(lr.detach(), cfg["log_ratio_clamp"])
    metrics = base_metrics(mask, ratio, mask, batch.divergence_2d())
    metrics["minpro/weight_mean"] = masked_mean(w, mask)
    metrics["minpro/prefix_min_mean"] = masked_mean(torch.exp(log_m), mask)
    metrics["minpro/clip_fraction"] = masked_mean((w != raw).to(w.dtype), mask)
    return RuleOutput(per_token_loss=loss, keep=mask.clone(), weight=w, metrics=metrics)

"""M2PO (Zheng, Zhao, Chen 2025, arXiv 2510.01161; AReaL ``actor.m2_threshold``): mask the
tokens with the largest squared log-ratio until the second moment of the rest is at most tau.

    M2 = (1/N) sum_{tokens} (log rho_t)^2
    while M2 > tau: mask the token with the largest (log rho_t)^2, recompute M2 over the rest
    L_t = -M_t rho_t A_t               (no clip; normalised over all tokens, masked or not)

Since the mean of the k smallest values grows with k, the loop keeps exactly the largest set
of smallest values whose mean is <= tau: one sort and a prefix mean find it. ``scope: all``
counts every token (the AReaL documentation's M2 over N tokens); ``scope: outward`` restricts
the moment and the masking to outward terms, A_t (rho_t - 1) > 0, as the paper's final
version's Algorithm 1 is read by Trinity-RFT. The batch is the one the rule is called on (the
trainer's micro-batch: the whole minibatch unless ``schedule.micro_batch`` splits it).
Default tau 0.04 (the paper).
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
from cppo.rules.ops import masked_mean
from cppo.rules.registry import Param, register_rule

__all__ = ["m2po_mask", "m2po_rule"]


def m2po_mask(second_moment: Tensor, selected: Tensor, tau: float) -> Tensor:
    """True where a selected token is masked so that the mean of the others is <= tau."""
    flat = second_moment.detach().reshape(-1)
    sel = selected.reshape(-1)
    n = flat.numel()
    if n == 0:
        return torch.zeros_like(selected)
    inf = torch.full((), float("inf"), dtype=flat.dtype, device=flat.device)
    values, order = torch.sort(torch.where(sel, flat, inf), stable=True)
    finite = torch.where(torch.isfinite(values), values, torch.zeros_like(values))
    counts = torch.arange(1, n + 1, device=flat.device)
    prefix_mean = finite.cumsum(0) / counts.to(flat.dtype)
    ok = (prefix_mean <= tau) & (counts <= sel.sum())
    keep_count = torch.where(ok, counts, torch.zeros_like(counts)).max()
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(n, device=flat.device))
    return (sel & (rank >= keep_count)).reshape(selected.shape)


@register_rule(
    "m2po",
    params={
        "tau": Param(0.04, float, check=lambda x: x >= 0, requirement=">= 0"),
        "scope": Param("all", str, choices=("all", "outward")),
    },
)
def m2po_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """M2PO: -M rho A with the second-moment mask, tau 0.04."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    with torch.no_grad():
        m2 = lr.detach().square()
        outward = outward_mask(lr.detach(), adv) & mask
        selected = outward if cfg["scope"] == "outward" else mask
        masked = m2po_mask(m2, selected, cfg["tau"])
        keep = mask & ~masked
    weight = keep.to(ratio.dtype)
    loss = masked_surrogate_loss(ratio, adv, weight, mask, None)
    metrics = base_metrics(mask, ratio, keep, batch.divergence_2d(), outward)
    metrics["m2po/m2_before"] = masked_mean(m2, selected)
    metrics["m2po/m2_after"] = masked_mean(m2, selected & keep)
    return RuleOutput(per_token_loss=loss, keep=keep, weight=weight, metrics=metrics)

"""TRM-Max / TRM-Avg (Li et al. 2025): sequence-level trust-region masking.

A response is kept whole iff max_t KL_t <= delta (TRM-Max) or mean_t KL_t <= delta_avg
(TRM-Avg), over its real tokens; KL_t = KL(mu(.|s_t) || pi(.|s_t)). Kept responses use the
plain ratio-advantage surrogate -rho_t A_t; rejected ones contribute zero loss but stay in the
normaliser (their tokens remain in ``response_mask``). Thresholds from the TRM paper:
delta = 0.05 (Max), delta_avg = 0.001 (Avg). The per-token KL is the rule's ``divergence``
(default Top-K KL, K = 20, per the CPPO appendix; configurable, e.g. ``topk_tv`` as the
project page suggests); ``RuleBatch.kl`` is used when ``divergence`` is None.
``keep_inward: true`` keeps the inward terms of rejected responses (a token-level variant;
off by default, the appendix drops the whole response).
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
from cppo.rules.registry import Param, register_rule

__all__ = ["trm_sequence_score", "trm_max_rule", "trm_avg_rule"]


def trm_sequence_score(kl: Tensor, response_mask: Tensor, reduce: str) -> Tensor:
    """Per-response max or mean of the per-token KL over real tokens, ``[B]`` (0 if empty)."""
    m = response_mask.bool()
    d = kl.detach().double()
    if reduce == "max":
        s = torch.where(m, d, d.new_full((), float("-inf"))).amax(-1)
    elif reduce == "mean":
        s = torch.where(m, d, d.new_zeros(())).sum(-1) / m.sum(-1).clamp(min=1)
    else:
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    return torch.where(m.any(-1), s, d.new_zeros(()))


def _trm(batch: RuleBatch, cfg: dict[str, Any], reduce: str, threshold: float) -> RuleOutput:
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    kl = batch.divergence_2d(kl_fallback=True)
    score = trm_sequence_score(kl, mask, reduce)
    seq_keep = score <= threshold  # NaN/inf (from NaN KL) rejects
    outward = outward_mask(lr.detach(), adv) & mask
    keep = mask & seq_keep.unsqueeze(-1)
    if cfg["keep_inward"]:
        keep = keep | (mask & ~outward)
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    weight = keep.to(ratio.dtype)
    loss = masked_surrogate_loss(ratio, adv, weight, mask, cfg["is_cap"])
    metrics = base_metrics(mask, ratio, keep, kl, outward)
    nonempty = mask.any(-1)
    n = int(nonempty.sum())
    metrics["trm/reject_fraction"] = float((~seq_keep & nonempty).sum()) / n if n else 0.0
    metrics["trm/score_mean"] = float(score[nonempty].mean()) if n else 0.0
    return RuleOutput(per_token_loss=loss, keep=keep, weight=weight, metrics=metrics)


_COMMON = {
    "keep_inward": Param(False, bool),
    "is_cap": Param(None, float, optional=True, check=lambda x: x > 0, requirement="> 0"),
}


@register_rule(
    "trm_max",
    divergence="topk_kl",
    kl_fallback=True,
    params={"delta": Param(0.05, float, check=lambda x: x >= 0, requirement=">= 0"), **_COMMON},
)
def trm_max_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """TRM-Max: keep a response iff max_t KL_t <= delta (0.05)."""
    return _trm(batch, cfg, "max", cfg["delta"])


@register_rule(
    "trm_avg",
    divergence="topk_kl",
    kl_fallback=True,
    params={
        "delta_avg": Param(0.001, float, check=lambda x: x >= 0, requirement=">= 0"),
        **_COMMON,
    },
)
def trm_avg_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """TRM-Avg: keep a response iff mean_t KL_t <= delta_avg (0.001)."""
    return _trm(batch, cfg, "mean", cfg["delta_avg"])

"""No trust region: the plain ratio-times-advantage surrogate, the benchmark's control.

Per-token loss  L_t = -rho_t A_t,  rho_t = pi(y_t|s_t) / mu(y_t|s_t)  (anchored on the rollout
policy mu like every rule here), with the gradient through rho_t and nothing clipped, masked or
capped. It is the objective every trust-region rule in this package starts from (the spec's
"masked ratio-advantage surrogate" with M_t = 1), so a column of results in which `none` is not
measurably worse than GRPO's clip cannot rank trust regions: the updates there never leave the
region the rules guard. Equivalent to ``grpo`` with ``eps_low -> 1``, ``eps_high -> inf`` and no
dual clip.
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
from cppo.rules.registry import register_rule

__all__ = ["none_rule"]


@register_rule("none", binding=None)
def none_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """-rho_t A_t on every response token (no trust region)."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    weight = mask.to(ratio.dtype)
    loss = masked_surrogate_loss(ratio, adv, weight, mask, None)
    outward = outward_mask(lr.detach(), adv) & mask
    metrics = base_metrics(mask, ratio, mask, batch.divergence_2d(), outward)
    return RuleOutput(per_token_loss=loss, keep=mask.clone(), weight=weight, metrics=metrics)

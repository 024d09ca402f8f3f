"""SAPO (Gao et al. 2025, arXiv 2511.20347; verl's ``sapo`` loss mode, TRL ``loss_type="sapo"``):
a smooth, temperature-controlled gate in place of the hard clip.

    f_tau(rho) = sigmoid(tau (rho - 1)) * 4 / tau,     tau = tau_pos if A_t > 0 else tau_neg
    L_t        = -f_tau(rho_t) A_t

Its gradient is -g_t rho_t A_t grad log pi with the gate g_t = 4 sigma (1 - sigma),
sigma = sigmoid(tau (rho_t - 1)): 1 on-policy, decaying smoothly as rho_t leaves 1 (faster for
a larger tau). ``weight`` reports g_t; how much the gate binds is the mean weight it takes off,
``sapo/damping_mean`` = mean_t (1 - g_t) (g_t <= 1). Defaults tau_pos 1.0, tau_neg 1.05 (the paper; verl and
TRL defaults).

Aggregation: the paper's surrogate objective is (1/G) sum_i (1/|y_i|) sum_t f(rho_{i,t}) A_{i,t}, each
response's token mean averaged over the responses, i.e. ``loss_agg_mode: seq-mean-token-mean``,
which verl's ``compute_policy_loss_sapo`` hard-codes whatever ``actor.loss_agg_mode`` says. The
rule itself aggregates as the run asks; the catalogue's ``sapo`` entry (config/methods.yaml)
sets seq-mean-token-mean, so it runs the paper's (and verl's) normalisation on both backends.
"""

from __future__ import annotations

from typing import Any

import torch

from cppo.rules.base import RuleBatch, RuleOutput, base_metrics, outward_mask, ratio_from_log_ratio
from cppo.rules.ops import masked_mean
from cppo.rules.registry import Param, register_rule

__all__ = ["sapo_rule"]


@register_rule(
    "sapo",
    params={
        "tau_pos": Param(1.0, float, check=lambda x: x > 0, requirement="> 0"),
        "tau_neg": Param(1.05, float, check=lambda x: x > 0, requirement="> 0"),
    },
    binding="sapo/damping_mean",
)
def sapo_rule(batch: RuleBatch, cfg: dict[str, Any]) -> RuleOutput:
    """SAPO: -sigmoid(tau (rho - 1)) * 4 / tau * A, tau by the sign of A."""
    mask = batch.mask
    lr = batch.log_ratio()
    adv = batch.advantages_2d()
    ratio = ratio_from_log_ratio(lr, cfg["log_ratio_clamp"])
    pos, neg = (
        torch.tensor(cfg[k], dtype=ratio.dtype, device=ratio.device) for k in ("tau_pos", "tau_neg")
    )
    tau = torch.where(adv > 0, pos, neg)  # in ratio's dtype: a float32 1.05 would creep in
    sig = torch.sigmoid(tau * (ratio - 1.0))
    loss = -(sig * 4.0 / tau) * adv
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    loss = torch.where(mask, loss, zero)
    gate = torch.where(mask, 4.0 * sig.detach() * (1.0 - sig.detach()), zero)
    outward = outward_mask(lr.detach(), adv) & mask
    metrics = base_metrics(mask, ratio, mask, batch.divergence_2d(), outward)
    metrics["sapo/gate_mean"] = masked_mean(gate, mask)
    metrics["sapo/gate_outward_mean"] = masked_mean(gate, outward)
    metrics["sapo/damping_mean"] = masked_mean(1.0 - gate, mask)
    return RuleOutput(per_token_loss=loss, keep=mask.clone(), weight=gate, metrics=metrics)

"""Trust-region rules for LLM RL: CPPO and the baselines it is compared with.

Public API::

    from cppo.rules import cppo_mask, dppo_mask            # functional masks
    from cppo.rules import get_rule, available_rules, register_rule
    from cppo.rules import RuleBatch, RuleOutput, aggregate_loss, metrics_to_floats

    rule = get_rule("cppo").bind(cfg)   # config checked and resolved once
    rule.divergence, rule.needs_topk    # what the caller must compute into RuleBatch.divergence
    out = rule(RuleBatch(logp, logp_mu, advantages, response_mask, divergence=D))
    loss = aggregate_loss(out.per_token_loss, response_mask, rule.cfg["loss_agg_mode"])
    metrics_to_floats(out.metrics)  # the diagnostics are 0-dim tensors: one copy to the host

Registered rules (one module each): the paper's grpo, cispo, dppo, cppo, trm_max, trm_avg,
minpro and the no-trust-region control none; beyond the paper gspo, gmpo, sapo, icepop, opsm
and m2po (Dr. GRPO is a preset of grpo and TIS one of cispo in config/methods.yaml).
"""

from cppo.rules import (  # noqa: F401  (registration)
    cispo,
    cppo,
    dppo,
    gmpo,
    grpo,
    gspo,
    icepop,
    m2po,
    minpro,
    none,
    opsm,
    sapo,
    trm,
)
from cppo.rules.aggregation import AGGREGATION_MODES, aggregate_loss
from cppo.rules.base import RuleBatch, RuleOutput, metrics_to_floats
from cppo.rules.cppo import (
    CPPOGate,
    CPPOParams,
    cppo_gate,
    cppo_mask,
    cppo_soft_weight,
    masked_quantile,
)
from cppo.rules.dppo import dppo_mask
from cppo.rules.registry import (
    BoundRule,
    Param,
    Rule,
    RuleConfigError,
    RuleContractError,
    UnknownRuleError,
    available_rules,
    get_rule,
    register_rule,
    resolve_config,
)

__all__ = [
    "AGGREGATION_MODES",
    "BoundRule",
    "CPPOGate",
    "CPPOParams",
    "Param",
    "Rule",
    "RuleBatch",
    "RuleConfigError",
    "RuleContractError",
    "RuleOutput",
    "UnknownRuleError",
    "aggregate_loss",
    "available_rules",
    "cppo_gate",
    "cppo_mask",
    "cppo_soft_weight",
    "dppo_mask",
    "get_rule",
    "masked_quantile",
    "metrics_to_floats",
    "register_rule",
    "resolve_config",
]

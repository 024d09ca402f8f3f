"""verl's policy-loss signature on this project's rules, and verl's loss aggregation restated.

verl 0.9.1 (``verl.workers.utils.losses.ppo_loss``) calls a registered policy loss with the
keyword arguments ``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights`` on padded ``[B, T]`` tensors (one micro-batch of one data-parallel rank) and
expects ``(loss, metrics)``. With ``algorithm.rollout_correction.bypass_mode=true`` the v1
trainer passes the rollout engine's log-probs as ``old_log_prob``: mu, the anchor of every rule
here (run.yaml ``anchor: rollout``); otherwise a recomputed old policy (``anchor: recomputed``).

The rule and its parameters come from run.yaml's ``method`` block, written to a JSON file whose
path reaches the loss through ``config.policy_loss.method_file`` (verl's loss config is a frozen
dataclass: ``cppo.backends.verl.plugin.CPPOPolicyLossConfig`` adds that one field). Aggregation
is verl's ``agg_loss`` with ``config.global_batch_info``: the data-parallel size and the
mini-batch's global token and sequence counts, the normalisers of the project's trainer
(``aggregate_loss(..., normalizer=global count / processes)``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from cppo.divergence import compute_divergence
from cppo.rules import RuleBatch, get_rule, metrics_to_floats

__all__ = ["load_method", "policy_loss", "rule_loss", "topk_divergence_of", "verl_agg_loss"]

Aggregate = Callable[..., Tensor]


def verl_agg_loss(
    loss_mat: Tensor,
    loss_mask: Tensor,
    loss_agg_mode: str,
    dp_size: int = 1,
    batch_num_tokens: float | None = None,
    global_batch_size: float | None = None,
    loss_scale_factor: float | None = None,
) -> Tensor:
    """verl 0.9.1's ``core_algos.agg_loss`` restated (a test compares the two in a verl venv).

    S = the masked sum of one micro-batch on one rank; the rank's loss is
    token-mean S / batch_num_tokens * dp, seq-mean-token-sum(-norm) (sum of the non-empty rows'
    sums) / global_batch_size * dp (then / loss_scale_factor, default T), seq-mean-token-mean
    (sum of row means, row length + 1e-8) / global_batch_size * dp. Gradients summed over
    micro-batches and averaged over ranks give the mini-batch's mean.
    """
    mask = loss_mask.to(loss_mat.dtype)
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("token-mean with dp_size > 1 needs the global batch_num_tokens")
            batch_num_tokens = mask.sum()
        return (loss_mat * mask).sum() / batch_num_tokens * dp_size
    row_tokens = mask.sum(-1)
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        rows = (loss_mat * mask).sum(-1)
    elif loss_agg_mode == "seq-mean-token-mean":
        # the count as verl adds it: an integer sum of a bool mask + 1e-8 is float32
        rows = (loss_mat * mask).sum(-1) / (loss_mask.sum(-1) + 1e-8)
    else:
        raise ValueError(f"loss_agg_mode {loss_agg_mode!r} is not one of verl's")
    nonempty = (row_tokens > 0).to(loss_mat.dtype)
    if global_batch_size is None:
        if dp_size > 1:
            raise ValueError(f"{loss_agg_mode} with dp_size > 1 needs the global_batch_size")
        global_batch_size = nonempty.sum()
    loss = (rows * nonempty).sum() / global_batch_size * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return loss


def topk_divergence_of(method: Mapping[str, Any]) -> dict[str, Any] | None:
    """The divergence a method block (run.yaml's ``method``) asks for when it is a Top-K one,
    which this backend cannot compute yet (README, "verl backend"); None otherwise."""
    cfg = dict(method)
    spec = get_rule(cfg.pop("rule")).divergence(cfg)
    return spec if spec is not None and spec["kind"].startswith("topk") else None


def rule_loss(
    method: Mapping[str, Any],
    *,
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    global_batch_info: Mapping[str, Any] | None = None,
    divergence: Tensor | None = None,
    rollout_is_weights: Tensor | None = None,
    aggregate: Aggregate = verl_agg_loss,
    seed: int = 0,
) -> tuple[Tensor, dict[str, float]]:
    """One micro-batch's loss under ``method`` (run.yaml's method block) and its diagnostics.

    ``divergence`` is the per-token D of a Top-K rule (``cppo.backends.verl.topk``); a rule
    asking for a sampled-token estimator (binary_tv, binary_kl, k3, abs_log_ratio) gets it
    computed here from the two log-probs. verl's IS weights, when given, multiply the
    advantages (a positive per-token factor leaves every mask decision as it is).
    """
    cfg = dict(method)
    rule = get_rule(cfg.pop("rule"))
    resolved = rule.resolve(cfg)
    mask = response_mask.bool()
    adv = advantages if rollout_is_weights is None else advantages * rollout_is_weights.detach()
    spec = rule.divergence(cfg)
    if spec is not None and divergence is None:
        if topk_divergence_of(method) is not None:
            raise ValueError(
                f"rule {rule.name!r} reads {spec['kind']} (K={spec['topk']}): on verl the Top-K "
                "divergence needs pi's log-probs at mu's top-K ids inside the engine's forward "
                "(cppo.backends.verl.topk; not wired into verl's engine yet, README 'verl "
                "backend'); give the method a sampled-token divergence (binary_tv, binary_kl, "
                "k3, abs_log_ratio) to run it on verl"
            )
        with torch.no_grad():
            divergence = compute_divergence(
                spec["kind"], logp=log_prob.detach(), logp_mu=old_log_prob, response_mask=mask
            )
    batch = RuleBatch(log_prob, old_log_prob, adv, mask, divergence=divergence, seed=seed)
    out = rule(batch, resolved)
    info = dict(global_batch_info or {})
    if resolved["loss_agg_mode"] == "seq-mean-token-sum-norm" and resolved["horizon"]:
        info["loss_scale_factor"] = resolved["horizon"]
    loss = aggregate(out.per_token_loss, mask, resolved["loss_agg_mode"], **info)
    return loss, metrics_to_floats(out.metrics)


@lru_cache(maxsize=8)
def load_method(path: str) -> dict[str, Any]:
    """run.yaml's method block, from the JSON file the train command wrote (read once)."""
    with open(path) as fh:
        method = json.load(fh)
    if not isinstance(method, dict) or "rule" not in method:
        raise ValueError(f"{path}: expected a JSON object with a 'rule' key")
    return method


def policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
    *,
    aggregate: Aggregate = verl_agg_loss,
) -> tuple[Tensor, dict[str, float]]:
    """The policy loss verl calls (registered as ``cppo`` by the plugin)."""
    path = config.policy_loss.get("method_file") if config is not None else None
    if not path:
        raise ValueError(
            "policy loss 'cppo' needs actor_rollout_ref.actor.policy_loss.method_file "
            "(the train command sets it; policy_loss._target_ must be the plugin's "
            "CPPOPolicyLossConfig)"
        )
    method = load_method(path)
    mode = method.get("loss_agg_mode", "token-mean")
    if loss_agg_mode != mode:
        raise ValueError(
            f"actor.loss_agg_mode is {loss_agg_mode!r} but the method's is {mode!r} "
            f"({path}); the generated overrides keep them equal"
        )
    return rule_loss(
        method,
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        global_batch_info=getattr(config, "global_batch_info", None),
        rollout_is_weights=rollout_is_weights,
        aggregate=aggregate,
    )

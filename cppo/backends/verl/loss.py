"""verl's policy-loss signature on this project's rules, and verl's loss aggregation restated.

verl 0.9.1 (``verl.workers.utils.losses.ppo_loss``) calls a registered policy loss with the
keyword arguments ``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights`` on padded ``[B, T]`` tensors (one micro-batch of one data-parallel rank) and
expects ``(loss, metrics)``. With ``algorithm.rollout_correction.bypass_mode=true`` the v1
trainer passes the rollout engine's log-probs as ``old_log_prob``: mu, the anchor of every rule
here (run.yaml ``anchor: rollout``); otherwise a recomputed old policy (``anchor: recomputed``).

The rule and its parameters come from run.yaml's ``method`` block, written with the run's
``imports`` (rules registered outside this package) and ``seed`` to a JSON file whose path
reaches the loss through ``config.policy_loss.method_file`` (verl's loss config is a frozen
dataclass: ``cppo.backends.verl.plugin.CPPOPolicyLossConfig`` adds that one field); each worker
reads it once, imports the modules and binds the rule. A Top-K rule's D is computed from pi's
logits by ``cppo.backends.verl.topk_loss`` and handed over around verl's call
(``passing_divergence``); a sampled-token D is computed here. Aggregation is verl's ``agg_loss`` with ``config.global_batch_info``: the data-parallel size and the
mini-batch's global token and sequence counts, the normalisers of the project's trainer
(``aggregate_loss(..., normalizer=global count / processes)``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cppo.divergence import compute_divergence
from cppo.rules import BoundRule, RuleBatch, metrics_to_floats
from cppo.run.config import method_rule

__all__ = [
    "MethodFile",
    "batch_seed",
    "current_divergence",
    "load_method",
    "passing_divergence",
    "policy_loss",
    "rule_loss",
    "verl_agg_loss",
    "write_method_file",
]

Aggregate = Callable[..., Tensor]
# D of a Top-K rule for the loss call in progress: verl's ppo_loss calls the registered policy
# loss with a fixed signature, so the Top-K loss hands D over through this variable
_TOPK_DIVERGENCE: ContextVar[Tensor | None] = ContextVar("cppo_topk_divergence", default=None)


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


@contextmanager
def passing_divergence(divergence: Tensor) -> Iterator[None]:
    """Within the block, the registered policy loss reads ``divergence`` as the rule's D."""
    token = _TOPK_DIVERGENCE.set(divergence)
    try:
        yield
    finally:
        _TOPK_DIVERGENCE.reset(token)


def current_divergence() -> Tensor | None:
    """The Top-K D of the micro-batch whose loss verl is computing, set by
    ``cppo.backends.verl.topk_loss`` around verl's ``ppo_loss`` (None outside it)."""
    return _TOPK_DIVERGENCE.get()


def batch_seed(seed: int, *tensors: Tensor) -> int:
    """A seed for one micro-batch, from the run's seed and the batch's contents.

    verl passes the loss no step counter; a rule that draws random numbers (CPPO's shuffled
    weights) needs one that changes from batch to batch. This one is deterministic (a resume
    that recomputes a batch draws the same numbers) and differs between micro-batches, steps
    and data-parallel ranks whenever their tensors differ. One host copy per micro-batch, only
    for such rules.
    """
    h = hashlib.blake2b(str(int(seed)).encode(), digest_size=8)
    for t in tensors:
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") % (2**31 - 1)


def rule_loss(
    rule: BoundRule,
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
    """One micro-batch's loss under ``rule`` (run.yaml's method block, bound) and its
    diagnostics.

    ``divergence`` is the per-token D of a Top-K rule (``cppo.backends.verl.topk_loss``); a
    rule asking for a sampled-token estimator (binary_tv, binary_kl, k3, abs_log_ratio) gets it
    computed here from the two log-probs. verl's IS weights, when given, multiply the
    advantages (a positive per-token factor leaves every mask decision as it is).
    """
    mask = response_mask.bool()
    adv = advantages if rollout_is_weights is None else advantages * rollout_is_weights.detach()
    spec = rule.divergence
    if spec is not None and divergence is None:
        if rule.needs_topk:
            raise ValueError(
                f"rule {rule.name!r} reads {spec['kind']} (K={spec['topk']}) but no Top-K D "
                "reached the loss: verl must run the trainer mode and loss of "
                "cppo.backends.verl.plugin (the generated overrides set them)"
            )
        with torch.no_grad():
            divergence = compute_divergence(
                spec["kind"], logp=log_prob.detach(), logp_mu=old_log_prob, response_mask=mask
            )
    batch = RuleBatch(log_prob, old_log_prob, adv, mask, divergence=divergence, seed=seed)
    out = rule(batch)
    cfg = rule.cfg
    info = dict(global_batch_info or {})
    if cfg["loss_agg_mode"] == "seq-mean-token-sum-norm" and cfg["horizon"]:
        info["loss_scale_factor"] = cfg["horizon"]
    loss = aggregate(out.per_token_loss, mask, cfg["loss_agg_mode"], **info)
    return loss, metrics_to_floats(out.metrics)


@dataclass(frozen=True)
class MethodFile:
    """What the loss reads from the method file: the bound rule and the run's seed."""

    rule: BoundRule
    seed: int


def write_method_file(cfg: Mapping[str, Any], path: str | Path) -> Path:
    """run.yaml's method block, plugin imports and seed as the JSON the loss reads."""
    path = Path(path)
    data = {"imports": list(cfg["imports"]), "seed": cfg["seed"], "method": cfg["method"]}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


@lru_cache(maxsize=8)
def load_method(path: str) -> MethodFile:
    """The method file the train command wrote (read, imported and bound once per process)."""
    with open(path) as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("method"), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'method' block")
    cfg = {"imports": data.get("imports", []), "method": data["method"]}
    return MethodFile(rule=method_rule(cfg), seed=int(data.get("seed", 0)))


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
    mode = method.rule.cfg["loss_agg_mode"]
    if loss_agg_mode != mode:
        raise ValueError(
            f"actor.loss_agg_mode is {loss_agg_mode!r} but the method's is {mode!r} "
            f"({path}); the generated overrides keep them equal"
        )
    seed = method.seed
    if method.rule.draws_random:
        seed = batch_seed(seed, old_log_prob, advantages, response_mask)
    return rule_loss(
        method.rule,
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask,
        global_batch_info=getattr(config, "global_batch_info", None),
        divergence=current_divergence(),
        rollout_is_weights=rollout_is_weights,
        aggregate=aggregate,
        seed=seed,
    )

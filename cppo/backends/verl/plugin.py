"""verl's plugin entry point (``[project.entry-points."verl.plugins"]`` in pyproject.toml; the
train command also names it in ``VERL_USE_EXTERNAL_MODULES``): registers the policy loss
``cppo`` (this project's rules, ``cppo.backends.verl.loss``) and its loss config class.

verl imports its plugins in every process that imports verl (the driver, the task runner, every
Ray worker), so the loss exists wherever the actor computes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, register_policy_loss
from verl.workers.config import PolicyLossConfig

from cppo.backends.verl.loss import policy_loss

__all__ = ["LOSS_MODE", "CPPOPolicyLossConfig"]

LOSS_MODE = "cppo"


@dataclass
class CPPOPolicyLossConfig(PolicyLossConfig):
    """verl's policy-loss config plus the JSON file of run.yaml's method block (verl's config
    dataclasses are frozen and take no unknown keys, so the rule's parameters travel in a file:
    ``+actor_rollout_ref.actor.policy_loss.method_file=<path>``)."""

    method_file: str = ""


if POLICY_LOSS_REGISTRY.get(LOSS_MODE) is not policy_loss:
    register_policy_loss(LOSS_MODE)(policy_loss)

"""verl's synchronous v1 trainer for a rule that reads a Top-K divergence: trainer mode
``cppo_topk`` (``trainer.v1.trainer_mode``, registered with verl's ``register_trainer``).

Two differences from verl's ``sync`` trainer, both at the actor update:

* after ``init()`` the actor workers get :class:`cppo.backends.verl.topk_loss.TopKPolicyLoss`
  (``set_loss_fn``, sent to every worker), bound to the same ``ActorConfig`` verl's own
  ``ppo_loss`` would be;
* every update batch carries ``distillation_use_topk`` (verl's ``_update_actor`` writes it from
  the distillation config, off here), so the FSDP engine hands that loss pi's logits.

Everything else is verl's sync trainer: verl reads the mode name in several places (replay
buffer, refill, checkpoints), so this class runs with the mode set back to ``sync``. Imported
through ``VERL_USE_EXTERNAL_MODULES`` (the train command adds it for Top-K runs only).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, open_dict
from verl.trainer.ppo.v1 import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.config import omega_conf_to_dataclass

from cppo.backends.verl.overrides import TOPK_TRAINER_MODE
from cppo.backends.verl.topk_loss import TopKPolicyLoss

__all__ = ["TopKTrainer"]

FLAG = "distillation_use_topk"


class _FlaggedActor:
    """The actor worker group, with the Top-K flag set on every update batch."""

    def __init__(self, group: Any) -> None:
        self._group = group

    def update_actor(self, batch: Any) -> Any:
        batch.extra_info[FLAG] = True
        return self._group.update_actor(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._group, name)


@register_trainer(TOPK_TRAINER_MODE)
class TopKTrainer(PPOTrainerSync):
    """verl's sync trainer with the Top-K loss and flag (see the module doc)."""

    def __init__(self, config: DictConfig) -> None:
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)

    def init(self) -> None:
        super().init()
        self.install_loss()

    def install_loss(self) -> None:
        actor = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        self.actor_rollout_wg.set_loss_fn(TopKPolicyLoss(actor))

    def _update_actor(self, batch: Any, metrics: dict) -> Any:
        group = self.actor_rollout_wg
        self.actor_rollout_wg = _FlaggedActor(group)
        try:
            return super()._update_actor(batch, metrics)
        finally:
            self.actor_rollout_wg = group

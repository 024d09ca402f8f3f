"""The verl backend: the paper-scale runs on verl 0.9.1 (Ray; FSDP or Megatron; vLLM rollouts)
with this project's rules, without a fork of verl and without a second copy of any rule.

Modules (only ``plugin`` and ``train`` import verl; the rest need torch alone, so they are
tested in the project's environment):

* ``loss``: verl's policy-loss signature -> ``cppo.rules`` (``policy_loss``), and verl's loss
  aggregation restated (``verl_agg_loss``).
* ``topk``: mu's top-K log-probs against pi's full logits (the distillation logits-processor
  route of verl) -> the Top-K divergence of ``cppo.divergence``.
* ``rollout``: top-K log-probs of vLLM's outputs -> verl's ``teacher_ids`` / ``teacher_logprobs``.
* ``reward``: the DAPO reward as a verl ``compute_score``.
* ``overrides``: run.yaml -> verl's Hydra overrides.
* ``metrics``: verl's file-logger records -> this project's metrics.jsonl records.
* ``plugin``: the ``verl.plugins`` entry point: registers the policy loss ``cppo`` and its config
  class (``CPPOPolicyLossConfig``).
* ``train``: ``python -m cppo.backends.verl.train --config run.yaml``, the train job's command.
* ``ray_slurm.sh``: a Ray cluster over the nodes of a SLURM job, then the command on its head.
"""

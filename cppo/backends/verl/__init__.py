"""The verl backend: the paper-scale runs on verl 0.9.1 (Ray; FSDP or Megatron; vLLM rollouts)
with this project's rules, without a fork of verl and without a second copy of any rule.

Modules that need torch alone (tested in the project's environment):

* ``loss``: verl's policy-loss signature -> ``cppo.rules`` (``policy_loss``), and verl's loss
  aggregation restated (``verl_agg_loss``).
* ``topk``: pi's log-probs at mu's top-K ids from pi's logits (chunked) -> the Top-K divergence
  of ``cppo.divergence``; the prefill gap of mu's top-K.
* ``reward``: the DAPO reward as a verl ``compute_score``.
* ``overrides``: run.yaml -> verl's Hydra overrides.
* ``metrics``: verl's file-logger records -> this project's metrics.jsonl records.
* ``train``: ``python -m cppo.backends.verl.train --config run.yaml``, the train job's command.
* ``ray_slurm.sh``: a Ray cluster over the nodes of a SLURM job, then the command on its head.

Modules that import verl (tested in the verl CPU environment, ``bash .ci/verl``):

* ``plugin``: the ``verl.plugins`` entry point: registers the policy loss ``cppo`` and its config
  class (``CPPOPolicyLossConfig``).
* ``topk_loss``: the actor loss of a Top-K rule on verl's FSDP engine (pi's logits in, D to the
  rule, verl's ``ppo_loss`` around it).
* ``trainer``: verl's sync trainer under the mode ``cppo_topk``: installs that loss and sets the
  flag that makes the engine hand it pi's logits.
* ``agent_loop``: verl's single-turn agent loop plus a prefill pass that brings back mu's top-K.
"""

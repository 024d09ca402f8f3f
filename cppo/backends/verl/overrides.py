"""run.yaml -> verl 0.9.1's Hydra overrides (``python -m verl.trainer.main_ppo <overrides>``).

One owner for the mapping, key by key; each line says where its value comes from. Units: verl
counts iterations (its global step: one rollout batch) and prompts per mini-batch; run.yaml
counts optimizer steps (validation.every, save_every, warmup_steps) and prompts.
The conventions of config/paper.yaml carry over: ``anchor: rollout`` is verl's bypass mode
(old_log_prob = the rollout engine's log-probs), ``scale_rewards: none`` is
``norm_adv_by_std_in_grpo=false``, seq-mean-token-sum-norm divides by
``loss_scale_factor`` = max_completion_length. A rule that reads a Top-K divergence runs verl's
v1 sync trainer under this project's mode ``cppo_topk`` (``cppo.backends.verl.trainer``), its
training rows through the agent loop ``cppo_topk`` (``cppo.backends.verl.agent_loop``, registered
by the file ``agent_loop_file``), with verl's unfused logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cppo.run.config import method_rule

__all__ = [
    "TOPK_AGENT",
    "TOPK_TRAINER_MODE",
    "VerlSetupError",
    "agent_loop_entries",
    "external_modules",
    "hydra_overrides",
    "iterations",
]

# verl's loss config subclass with the `method_file` field (registered by the plugin)
LOSS_CONFIG = "cppo.backends.verl.plugin.CPPOPolicyLossConfig"
PLUGIN_MODULES = "cppo.backends.verl.plugin"
REWARD_FILE = Path(__file__).with_name("reward.py")
# the Top-K route: the trainer mode (cppo.backends.verl.trainer) and the agent loop
# (cppo.backends.verl.agent_loop) under the names verl's registries know them by
TOPK_TRAINER_MODE = "cppo_topk"
TOPK_AGENT = "cppo_topk"
TOPK_MODULES = ("cppo.backends.verl.trainer",)


def external_modules(topk: bool) -> str:
    """``VERL_USE_EXTERNAL_MODULES``: what every verl process imports (the loss plugin, and the
    Top-K trainer mode when the rule reads a Top-K divergence)."""
    return ",".join([PLUGIN_MODULES, *(TOPK_MODULES if topk else ())])


def agent_loop_entries(topk: int) -> list[dict[str, Any]]:
    """The ``agent_loop_config_path`` file's content: the Top-K agent loop and its K."""
    target = "cppo.backends.verl.agent_loop.TopKAgentLoop"
    return [{"name": TOPK_AGENT, "_target_": target, "topk": int(topk)}]


class VerlSetupError(ValueError):
    """A run.yaml that verl cannot run as asked; the message names the key."""


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, str) and any(c in v for c in " ,=[]{}'\"()"):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def iterations(steps: int, updates_per_iter: int, key: str) -> int:
    """Optimizer steps of run.yaml as verl iterations (must be whole iterations)."""
    if steps % updates_per_iter:
        raise VerlSetupError(
            f"{key}: {steps} optimizer steps are not whole iterations of {updates_per_iter}"
        )
    return steps // updates_per_iter


def hydra_overrides(
    run: Mapping[str, Any],
    *,
    method_file: str | Path,
    train_file: str | Path,
    val_files: list[str],
    checkpoint_dir: str | Path,
    metrics_file: str | Path,
    agent_loop_file: str | Path | None = None,
) -> list[str]:
    """The overrides of one run (``run``: a validated run.yaml); ``agent_loop_file`` holds
    :func:`agent_loop_entries` (needed by a rule that reads a Top-K divergence)."""
    sched, val, method = run["schedule"], run["validation"], run["method"]
    verl = run["verl"]
    upi = sched["updates_per_iter"]
    per_epoch, rest = divmod(sched["prompts_per_iter"], sched["minibatch"])
    if rest or upi % per_epoch:
        raise VerlSetupError(
            f"schedule: verl takes prompts_per_iter / minibatch = {sched['prompts_per_iter']} / "
            f"{sched['minibatch']} mini-batches per epoch; updates_per_iter {upi} must be a "
            "whole number of epochs of them"
        )
    if run["rl"]["scale_rewards"] == "batch":
        raise VerlSetupError("rl.scale_rewards: verl's GRPO has no batch-std scaling (group, none)")
    seq_len = sched["max_prompt_length"] + sched["max_completion_length"]
    o: dict[str, Any] = {
        # data: DAPO-schema parquet files (cppo.backends.verl.train converts the JSONL)
        "data.train_files": str(train_file),
        "data.val_files": list(val_files),
        "data.train_batch_size": sched["prompts_per_iter"],
        "data.max_prompt_length": sched["max_prompt_length"],
        "data.max_response_length": sched["max_completion_length"],
        "data.filter_overlong_prompts": True,  # run.yaml: longer prompts are dropped
        "data.seed": run["seed"],
        # model
        "actor_rollout_ref.model.path": run["model"],
        "actor_rollout_ref.model.enable_gradient_checkpointing": run["gradient_checkpointing"],
        # rollout: vLLM with the sampled token's log-prob (mu)
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.rollout.n": sched["n"],
        "actor_rollout_ref.rollout.temperature": sched["temperature"],
        "actor_rollout_ref.rollout.top_p": sched["top_p"],
        "actor_rollout_ref.rollout.top_k": sched["top_k"] or -1,
        "actor_rollout_ref.rollout.calculate_log_probs": True,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": verl[
            "rollout_tensor_parallel_size"
        ],
        "actor_rollout_ref.rollout.gpu_memory_utilization": verl["gpu_memory_utilization"],
        "actor_rollout_ref.rollout.val_kwargs.n": val["k"],
        "actor_rollout_ref.rollout.val_kwargs.temperature": val["temperature"],
        "actor_rollout_ref.rollout.val_kwargs.top_p": val["top_p"],
        "actor_rollout_ref.rollout.val_kwargs.do_sample": True,
        # the update: minibatch prompts per optimizer step, updates_per_iter steps per iteration
        "actor_rollout_ref.actor.ppo_mini_batch_size": sched["minibatch"],
        "actor_rollout_ref.actor.ppo_epochs": upi // per_epoch,
        "actor_rollout_ref.actor.shuffle": False,
        "actor_rollout_ref.actor.data_loader_seed": run["seed"],
        "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": verl["max_token_len_per_gpu"]
        or seq_len,
        "actor_rollout_ref.actor.optim.lr": sched["learning_rate"],
        "actor_rollout_ref.actor.optim.lr_warmup_steps": sched["warmup_steps"],
        "actor_rollout_ref.actor.optim.weight_decay": run["optim"]["weight_decay"],
        "actor_rollout_ref.actor.optim.clip_grad": run["optim"]["max_grad_norm"],
        "actor_rollout_ref.actor.use_kl_loss": False,  # the paper: no KL term, no entropy bonus
        "actor_rollout_ref.actor.entropy_coeff": 0,
        # the loss: this project's rule through the plugin
        "actor_rollout_ref.actor.loss_agg_mode": method.get("loss_agg_mode", "token-mean"),
        "actor_rollout_ref.actor.policy_loss.loss_mode": "cppo",
        "actor_rollout_ref.actor.policy_loss._target_": LOSS_CONFIG,
        "+actor_rollout_ref.actor.policy_loss.method_file": str(method_file),
        # advantages and the anchor
        "algorithm.adv_estimator": "grpo",
        "algorithm.norm_adv_by_std_in_grpo": run["rl"]["scale_rewards"] == "group",
        "algorithm.use_kl_in_reward": False,
        "algorithm.rollout_correction.bypass_mode": run["anchor"] == "rollout",
        # reward: the DAPO answer line
        "reward.custom_reward_function.path": str(REWARD_FILE),
        "reward.custom_reward_function.name": "compute_score",
        # schedule, validation, checkpoints, logging
        "trainer.nnodes": verl["nnodes"],
        "trainer.n_gpus_per_node": verl["gpus_per_node"],
        "trainer.total_training_steps": sched["iterations"],
        "trainer.val_before_train": val["every"] > 0,
        "trainer.test_freq": iterations(val["every"], upi, "validation.every") or -1,
        "trainer.save_freq": iterations(run["save_every"], upi, "save_every"),
        "trainer.default_local_dir": str(checkpoint_dir),
        "trainer.resume_mode": "auto",
        "trainer.project_name": "cppo-repro",
        "trainer.experiment_name": run["run_name"],
        "trainer.logger": ["console", "file"],
        "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH": str(metrics_file),
        # the v1 trainer: the legacy one rewrites the loss mode in bypass mode (the rule would
        # silently become verl's bypass loss)
        "trainer.use_v1": True,
    }
    topk = method_rule(run).needs_topk
    o["+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES"] = external_modules(
        topk
    )
    if topk:
        if agent_loop_file is None:
            raise VerlSetupError(
                f"method: rule {method['rule']!r} reads a Top-K divergence; the overrides need "
                "the agent loop file (agent_loop_entries)"
            )
        o["trainer.v1.trainer_mode"] = TOPK_TRAINER_MODE
        o["actor_rollout_ref.rollout.agent.agent_loop_config_path"] = str(agent_loop_file)
        # the loss reads pi's logits: fused kernels never build them, a static pad would shift
        # the packed rows against mu's top-K fields (verl refuses it with the flag)
        o["actor_rollout_ref.model.use_fused_kernels"] = False
        o["actor_rollout_ref.actor.fsdp_config.pad_to_length"] = False
    if method.get("loss_agg_mode") == "seq-mean-token-sum-norm":
        o["actor_rollout_ref.actor.loss_scale_factor"] = (
            method.get("horizon") or sched["max_completion_length"]
        )
    if verl["strategy"] == "fsdp":
        o["actor_rollout_ref.actor.fsdp_config.param_offload"] = verl["param_offload"]
        o["actor_rollout_ref.actor.fsdp_config.optimizer_offload"] = verl["optimizer_offload"]
    else:
        o["model_engine"] = "megatron"
        for key in (
            "tensor_model_parallel_size",
            "expert_model_parallel_size",
            "pipeline_model_parallel_size",
            "param_offload",
            "optimizer_offload",
        ):
            o[f"actor_rollout_ref.actor.megatron.{key}"] = verl[key]
    lines = [f"{k}={_value(v)}" for k, v in o.items()]
    return lines + list(verl["overrides"])

"""CPPOConfig: TRL's GRPOConfig plus the method, divergence, anchor and diagnostics settings.

`grpo_config_from_run` builds it from a validated run config and sets every TRL knob whose default
would silently change what the methods mean (loss type, KL beta, vLLM importance-sampling
correction, reward scaling, truncation masking, sampling filters, bf16, gradient checkpointing,
entropy bonus, ...), so a TRL upgrade that changes a default cannot change a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import GRPOConfig

from cppo.divergence import DIVERGENCE_KINDS
from cppo.training.schedule import BatchPlan, plan_batches
from evaluation.backends import SAMPLERS

# run.yaml `vllm` keys that configure the engine itself (cppo.training.engine.engine_kwargs)
ENGINE_KEYS = (
    "dtype",
    "enforce_eager",
    "enable_chunked_prefill",
    "max_num_batched_tokens",
    "cpu_kvcache_space_gib",
)


@dataclass
class CPPOConfig(GRPOConfig):
    """GRPOConfig + the trust-region method and its diagnostics (see cppo.run.config)."""

    # TRL defaults this to True; the methods anchor rho on mu directly, so it must be off
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "Must stay False: rho = pi / mu already uses the engine's mu."},
    )
    method: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Method config: {'rule': registry name, ...rule parameters}."},
    )
    divergence_kind: str | None = field(
        default=None,
        metadata={
            "help": "Diagnostic D for rules that read none (one of cppo.divergence."
            "DIVERGENCE_KINDS); must agree with the rule's own when given. None: the rule's / "
            "topk_tv."
        },
    )
    divergence_topk: int | None = field(
        default=None, metadata={"help": "K (None: the rule's / 20)."}
    )
    divergence_sampled_token: str | None = field(
        default=None, metadata={"help": "extra | replace (None: the rule's / extra)."}
    )
    anchor: str = field(
        default="rollout",
        metadata={
            "help": "rollout: rho = pi / mu with mu the rollout engine's log-probs; "
            "recomputed: mu recomputed by the trainer at generation time."
        },
    )
    mask_std_0: bool = field(
        default=True,
        metadata={"help": "Drop zero-reward-variance groups from the loss and its normaliser."},
    )
    divergence_all_methods: bool = field(
        default=True, metadata={"help": "Record mu's top-K and D for every rule (diagnostics)."}
    )
    deviation_bins: int = field(
        default=10,
        metadata={"help": "Relative-position bins for |pi(y)-mu(y)| statistics; 0 = off."},
    )
    mu_chunk_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens per [chunk, V] tile in the top-K search (None = auto)."},
    )
    updates_per_iter: int = field(
        default=1, metadata={"help": "Optimizer steps per rollout batch."}
    )
    validation: dict[str, Any] | None = field(
        default=None, metadata={"help": "In-loop validation settings (see run.yaml 'validation')."}
    )
    metrics_file: str | None = field(
        default=None, metadata={"help": "metrics.jsonl path (default <output_dir>/metrics.jsonl)."}
    )
    vllm_engine: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Engine options of the colocated vLLM engine (run.yaml `vllm`: dtype, "
            "enforce_eager, enable_chunked_prefill, max_num_batched_tokens, "
            "cpu_kvcache_space_gib); see cppo.training.engine."
        },
    )

    sampler: str = field(
        default="kv_loop",
        metadata={"help": "Transformers rollouts: kv_loop (evaluation.kv_loop) or generate."},
    )
    loss_layout: str = field(
        default="shared_prompt",
        metadata={"help": "Loss forward: shared_prompt (cppo.training.shared_prompt) or padded."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.loss_layout not in ("shared_prompt", "padded"):
            raise ValueError(
                f"loss_layout must be 'shared_prompt' or 'padded', got {self.loss_layout!r}"
            )
        if self.method is None or not isinstance(self.method.get("rule"), str):
            raise ValueError("CPPOConfig.method must be a mapping with a 'rule' name")
        if self.divergence_kind is not None and self.divergence_kind not in DIVERGENCE_KINDS:
            raise ValueError(f"unknown divergence_kind {self.divergence_kind!r}")
        if self.anchor not in ("rollout", "recomputed"):
            raise ValueError(f"anchor must be 'rollout' or 'recomputed', got {self.anchor!r}")
        if self.beta != 0.0:
            raise ValueError("CPPOConfig: beta must be 0 (the paper uses no KL-to-reference term)")
        if self.num_iterations != 1:
            raise ValueError("CPPOConfig: num_iterations must be 1 (each response is used once)")
        if self.vllm_importance_sampling_correction:
            raise ValueError(
                "CPPOConfig: the ratio is anchored on mu directly; disable TRL's vLLM IS correction"
            )
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError("CPPOConfig: no entropy bonus in the paper's objective")
        if self.top_entropy_quantile != 1.0 or self.off_policy_mask_threshold is not None:
            raise ValueError(
                "CPPOConfig: TRL's entropy/off-policy token masks are not part of the methods"
            )

    @property
    def metrics_path(self) -> Path:
        return (
            Path(self.metrics_file)
            if self.metrics_file
            else Path(self.output_dir) / "metrics.jsonl"
        )


def grpo_config_from_run(
    run: dict[str, Any], *, world_size: int = 1
) -> tuple[CPPOConfig, BatchPlan]:
    """A CPPOConfig with every relevant knob taken from a validated run config."""
    sched = run["schedule"]
    plan = plan_batches(
        prompts_per_iter=sched["prompts_per_iter"],
        n=sched["n"],
        minibatch=sched["minibatch"],
        updates_per_iter=sched["updates_per_iter"],
        iterations=sched["iterations"],
        world_size=world_size,
        micro_batch=sched["micro_batch"],
    )
    rl, optim, vllm, diag = run["rl"], run["optim"], run["vllm"], run["diagnostics"]
    report_to = "none" if run["report_to"] == "none" else ["wandb"]
    # fp32 master weights in every setup: bf16 is autocast (DDP) or DeepSpeed's bf16 mode with fp32
    # optimizer state; AdamW on bf16 weights would lose lr-1e-6 updates to rounding.
    # No revision: run_training loads a local directory (a hub id + model_revision is resolved to
    # its cached snapshot first, cppo.hub), the same one for the policy, tokenizer and vLLM engine.
    model_init_kwargs: dict[str, Any] = {"dtype": "float32"}
    cfg = CPPOConfig(
        output_dir=run["output_dir"],
        run_name=run["run_name"],
        seed=run["seed"],
        data_seed=run["seed"],
        # device and precision
        use_cpu=run["use_cpu"],
        bf16=run["bf16"],
        fp16=False,
        cast_lm_head_to_fp32=run["cast_lm_head_to_fp32"],
        gradient_checkpointing=run["gradient_checkpointing"],
        model_init_kwargs=model_init_kwargs,
        # batching (Table 3)
        **plan.trl_kwargs(),
        shuffle_dataset=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        # rollouts: untruncated softmax at the configured temperature
        max_completion_length=sched["max_completion_length"],
        temperature=sched["temperature"],
        top_p=sched["top_p"],
        top_k=sched["top_k"],
        min_p=None,
        repetition_penalty=1.0,
        generation_kwargs=None,
        chat_template_kwargs=dict(run["chat_template_kwargs"]) or None,
        cache_implementation=None,
        use_transformers_continuous_batching=False,
        pad_to_multiple_of=None,
        mask_truncated_completions=rl["mask_truncated_completions"],
        # objective: GRPO advantages, no KL, no entropy bonus; the loss itself is the rule's
        beta=0.0,
        scale_rewards=rl["scale_rewards"],
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=None,
        loss_type="dapo",  # unused by CPPOTrainer._compute_loss; set so no TRL warning path triggers
        importance_sampling_level="token",
        epsilon=0.2,
        epsilon_high=0.28,
        delta=None,
        off_policy_mask_threshold=None,
        top_entropy_quantile=1.0,
        entropy_coef=0.0,
        use_adaptive_entropy=False,
        router_aux_loss_coef=run["router_aux_loss_coef"],
        disable_dropout=True,
        sync_ref_model=False,
        # optimizer
        optim="adamw_torch",
        learning_rate=sched["learning_rate"],
        lr_scheduler_type=optim["lr_scheduler"],
        warmup_steps=sched["warmup_steps"],
        weight_decay=optim["weight_decay"],
        adam_beta1=optim["adam_beta1"],
        adam_beta2=optim["adam_beta2"],
        adam_epsilon=optim["adam_epsilon"],
        max_grad_norm=optim["max_grad_norm"],
        # rollout engine
        use_vllm=run["backend"] == "vllm",
        vllm_mode=vllm["mode"],
        vllm_gpu_memory_utilization=vllm["gpu_memory_utilization"],
        vllm_tensor_parallel_size=vllm["tensor_parallel_size"],
        vllm_enable_sleep_mode=vllm["enable_sleep_mode"],
        vllm_max_model_length=vllm["max_model_length"],
        vllm_server_base_url=vllm["server_base_url"],
        vllm_importance_sampling_correction=False,
        vllm_engine={k: vllm[k] for k in ENGINE_KEYS},
        ds3_gather_for_generation=True,
        # logging, checkpoints
        logging_strategy="steps",
        logging_steps=1,
        logging_first_step=False,
        save_strategy="steps",
        save_steps=run["save_every"],
        # rotation is cppo.training.checkpoints' (by step number, keep_checkpoints); TRL's sorts
        # by mtime
        save_total_limit=None,
        save_only_model=False,
        eval_strategy="no",
        report_to=report_to,
        log_completions=False,
        disable_tqdm=True,
        # method
        method=dict(run["method"]),
        divergence_kind=run["divergence"]["kind"],
        divergence_topk=run["divergence"]["topk"],
        divergence_sampled_token=run["divergence"]["sampled_token"],
        anchor=run["anchor"],
        mask_std_0=rl["mask_std_0"],
        divergence_all_methods=diag["divergence_all_methods"],
        deviation_bins=diag["deviation_bins"],
        mu_chunk_tokens=diag["mu_chunk_tokens"],
        updates_per_iter=sched["updates_per_iter"],
        validation=dict(run["validation"]),
        sampler=run["transformers"]["sampler"],
        loss_layout=run["transformers"]["loss_layout"],
    )
    return cfg, plan

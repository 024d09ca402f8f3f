"""One GPU training job of a config, in the terms the memory and cost models read."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cppo.pipeline.resources.architectures import ARCHITECTURES, GIB, Architecture, architecture_name
from cppo.run.backends import verl_refusals
from cppo.run.config import validate_run_config, with_run_defaults

if TYPE_CHECKING:
    from cppo.pipeline.plan import Plan

# accelerate config files in commands.train.launcher are relative to the workflow's directory
REPO_ROOT = Path(__file__).resolve().parents[3]


def zero_stage(launcher: str, root: str | Path | None = None) -> int:
    """ZeRO stage of an `accelerate launch --config_file F` launcher (0: DDP or no config file);
    F is looked up under `root` (default: the working directory, then the repository)."""
    words = shlex.split(launcher)
    name = None
    for i, word in enumerate(words):
        if word == "--config_file" and i + 1 < len(words):
            name = words[i + 1]
        elif word.startswith("--config_file="):
            name = word.split("=", 1)[1]
    if name is None:
        return 0
    roots = [Path(root)] if root is not None else [Path.cwd(), REPO_ROOT]
    found = [r / name for r in roots if (r / name).is_file()]
    if not found:
        raise ValueError(f"commands.train.launcher: accelerate config file {name!r} not found")
    with found[0].open() as fh:
        acc = yaml.safe_load(fh) or {}
    if acc.get("distributed_type") != "DEEPSPEED":
        return 0
    return int(acc.get("deepspeed_config", {}).get("zero_stage", 0))



@dataclass(frozen=True)
class TrainingJob:
    """What sizes one training run of a model (read from the config by `training_job`)."""

    model: str
    arch_name: str
    arch: Architecture
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    zero_stage: int
    backend: str  # vllm | transformers
    vllm_mode: str  # colocate | server (backend vllm)
    tensor_parallel_size: int
    gpu_memory_utilization: float
    sleep_mode: bool
    max_model_length: int | None
    micro_batch: int
    prompts_per_iter: int
    n: int
    iterations: int
    max_prompt_length: int
    max_completion_length: int
    gradient_checkpointing: bool
    lm_head_fp32: bool
    val_every: int
    val_benchmarks: int
    val_k: int
    val_max_new_tokens: int
    val_batch_size: int
    save_every: int  # iterations between full checkpoints
    keep_checkpoints: int | None  # None: all
    snapshots: str  # all | best | none
    runtime_min: int
    runs: int  # runs of this model that will train (methods x seeds, less the refused)
    refused_runs: int = 0  # runs whose train command refuses them at start (not costed)
    # verl: tokens per GPU per forward/backward pass (dynamic batch size) instead of
    # micro_batch x seq_len, and the config block its engine settings come from
    update_tokens: int | None = None
    # verl: the largest K of the Top-K rules that will run (0: none); the update pass then
    # gathers pi's log-probs at mu's top-K ids
    topk: int = 0
    engine_key: str = "training.extra.vllm"
    tp_key: str = "tensor_parallel_size"

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def colocated_engine(self) -> bool:
        """A vLLM engine on the training GPUs (in server mode it runs elsewhere)."""
        return self.backend in ("vllm", "verl") and self.vllm_mode == "colocate"

    @property
    def seq_len(self) -> int:
        return self.max_prompt_length + self.max_completion_length

    @property
    def val_seq_len(self) -> int:
        return self.max_prompt_length + self.val_max_new_tokens

    @property
    def gpu_bytes(self) -> float:
        return self.gpu_mem_gib * GIB



# --- reading a config -------------------------------------------------------------------------


def gpu_training_models(plan: Plan) -> list[str]:
    """The models this check covers: hub models trained on GPUs."""
    return [
        m
        for m in plan.matrix.models
        if plan.cfg["models"][m]["source"] == "hub"
        and plan.commands.resources("train", m).get("gpus", 0)
    ]


def training_job(plan: Plan, model: str, root: str | Path | None = None) -> TrainingJob:
    """The TrainingJob of a model; raises ValueError naming the key when one is missing."""
    from cppo.pipeline.config import model_training

    cfg = plan.cfg
    entry = cfg["models"][model]
    arch_name = architecture_name(entry["hub"]["id"])
    if arch_name is None:
        raise ValueError(
            f"models.{model}.hub.id: no architecture numbers for {entry['hub']['id']!r}; add "
            "them from its config.json to cppo.pipeline.resources.ARCHITECTURES (and THROUGHPUT)"
        )
    sched = plan.resolver.schedule(model)
    training = model_training(cfg, model)
    refused = verl_refusals_by_method(plan, model) if training["backend"] == "verl" else {}
    # training.extra holds run.yaml keys; the trainer's defaults for those it leaves out
    run = with_run_defaults(training["extra"])
    vllm: Mapping[str, Any] = run["vllm"]
    res = plan.commands.resources("train", model)
    val = cfg["validation"]
    per_process = sched["minibatch"] * sched["n"] // plan.commands.world_size(model)
    keep = run["keep_checkpoints"]
    job = TrainingJob(
        model=model,
        arch_name=arch_name,
        arch=ARCHITECTURES[arch_name],
        nodes=plan.commands.nodes(model),
        gpus_per_node=int(res["gpus"]),
        gpu_mem_gib=float(res["gpu_mem_gib"]),
        zero_stage=zero_stage(cfg["commands"]["train"]["launcher"], root),
        backend=training["backend"],
        vllm_mode=str(vllm["mode"]),
        tensor_parallel_size=int(vllm["tensor_parallel_size"]),
        gpu_memory_utilization=float(vllm["gpu_memory_utilization"]),
        sleep_mode=bool(vllm["enable_sleep_mode"]),
        max_model_length=vllm["max_model_length"],
        micro_batch=int(sched.get("micro_batch") or per_process),
        prompts_per_iter=sched["prompts_per_iter"],
        n=sched["n"],
        iterations=sched["iterations"],
        max_prompt_length=sched["max_prompt_length"],
        max_completion_length=sched["max_completion_length"],
        gradient_checkpointing=bool(run["gradient_checkpointing"]),
        lm_head_fp32=bool(training["cast_lm_head_to_fp32"]),
        val_every=val["every"],
        val_benchmarks=len(val["benchmarks"]),
        val_k=val["k"],
        val_max_new_tokens=val["max_new_tokens"] or sched["max_completion_length"],
        val_batch_size=val["batch_size"],
        save_every=training["save_every"] or val["every"],
        keep_checkpoints=None if keep == "all" else int(keep),
        snapshots=str(run["snapshots"]),
        runtime_min=int(res["runtime"]),
        runs=(len(plan.matrix.methods) - len(refused)) * len(plan.matrix.seeds_of(model)),
        refused_runs=len(refused) * len(plan.matrix.seeds_of(model)),
    )
    if training["backend"] == "verl":
        rules = [plan.resolver.bound_rule(model, m) for m in plan.matrix.methods if m not in refused]
        topk = max((r.divergence["topk"] for r in rules if r.needs_topk), default=0)
        job = dataclasses.replace(job, **_verl_terms(training["verl"], sched), topk=topk)
    return job


def verl_refusals_by_method(plan: Plan, model: str) -> dict[str, list[str]]:
    """The methods of a verl model that the verl train command refuses at start, before any GPU
    work, with its messages (cppo.run.backends.verl_refusals, read by both)."""
    out = {}
    for method in plan.matrix.methods:
        run = validate_run_config(plan.resolver.run_config(model, method, plan.matrix.seeds_of(model)[0]))
        problems = verl_refusals(run)
        if problems:
            out[method] = problems
    return out


def _verl_terms(verl: Mapping[str, Any], sched: Mapping[str, Any]) -> dict[str, Any]:
    """verl's memory model in the terms of TrainingJob: FSDP full sharding (or Megatron with
    its distributed optimizer) shards parameters, gradients and Adam states over every GPU as
    ZeRO-3 does; its vLLM engine shares the GPUs and frees weights and KV cache during the
    update (rollout.free_cache_engine), sized for prompt + response; an update pass holds
    max_token_len_per_gpu tokens (dynamic batch size)."""
    seq_len = sched["max_prompt_length"] + sched["max_completion_length"]
    return {
        "zero_stage": 3,
        "vllm_mode": "colocate",
        "tensor_parallel_size": int(verl["rollout_tensor_parallel_size"]),
        "gpu_memory_utilization": float(verl["gpu_memory_utilization"]),
        "sleep_mode": True,
        "max_model_length": seq_len,
        "update_tokens": int(verl["max_token_len_per_gpu"] or seq_len),
        "engine_key": "training.verl",
        "tp_key": "rollout_tensor_parallel_size",
    }



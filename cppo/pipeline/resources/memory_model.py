"""Per-GPU memory of one training job, per phase of the colocated loop (see the package doc)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cppo.divergence import GATHER_CHUNK_BYTES
from cppo.pipeline.resources.architectures import BF16, FP32, GIB
from cppo.pipeline.resources.job import TrainingJob

# Bytes per parameter (replicated on every GPU, sharded over the data-parallel GPUs) by ZeRO
# stage, for bf16 mixed precision with fp32 master weights and Adam: 2 (bf16 weights) + 2 (bf16
# gradients) + 12 (fp32 master, Adam m and v) = 16, as counted in the ZeRO paper (Rajbhandari
# et al. 2020, Sec. 3.1). Stage 0 (plain DDP, fp32 weights under autocast) also holds 16.
ZERO_BYTES_PER_PARAM: dict[int, tuple[int, int]] = {0: (16, 0), 1: (4, 12), 2: (2, 14), 3: (0, 16)}
# ZeRO-3 gathers a layer's full weights for its forward and backward (and prefetches the next):
# two layers' bf16 weights and gradients, plus the LM head with its gradient (fp32 when cast).
ZERO3_GATHERED_LAYERS = 2
# CUDA context, NCCL communicators and allocator fragmentation per GPU (assumption).
RESERVED_GIB = 3.0
# What a colocated vLLM engine needs outside its weights and KV cache: CUDA graphs and the
# profiling activations at TRL's max_num_batched_tokens=4096 (assumption). Kept while asleep.
VLLM_RUNTIME_GIB = 2.0
# Activations a decoder layer keeps for its backward, in hidden-sized values per token: the
# normed input, attention output, o-projection output, residual and normed residual (5 x
# hidden), q and attention context (2 x q_dim), k and v (2 x kv_dim), the MLP's gate, up,
# activation and product (4 x mlp_width) and, in an MoE layer, the tokens copied to their
# experts (experts_per_token x hidden). With gradient checkpointing only the layer being
# recomputed holds them, twice (the activations and their gradients).
LAYER_HIDDEN_VALUES = 5
# verl's Top-K route, per token of an update pass and per top-K slot: mu's ids (int32) and
# log-probs (fp32) as they arrive, pi's log-probs at those ids as the loss returns them, nested
# and padded (3 x fp32), mu's padded ids (int64) and log-probs (fp32)
TOPK_BYTES_PER_SLOT = 4 + 4 + 3 * 4 + 8 + 4


# accelerate config files in commands.train.launcher are relative to the workflow's directory

@dataclass(frozen=True)
class Memory:
    """Per-GPU bytes of one training job: its terms, and the terms each phase adds up."""

    states: float
    buffers: float
    checkpoints: float
    layer_work: float
    logits: float
    engine_budget: float
    engine_weights: float
    kv_budget: float
    kv_per_token: int
    kv_sequences: int  # max-length sequences the engine's KV cache holds
    parts: dict[str, dict[str, float]]  # phase -> {term: bytes}

    @property
    def activations(self) -> float:
        return self.checkpoints + self.layer_work

    @property
    def phases(self) -> dict[str, float]:
        return {phase: sum(terms.values()) for phase, terms in self.parts.items()}

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def peak(self) -> float:
        return self.phases[self.peak_phase]


def memory(job: TrainingJob) -> Memory:
    """The per-GPU memory estimate of a training job (see the module docstring)."""
    a = job.arch
    params = a.params()
    replicated, sharded = ZERO_BYTES_PER_PARAM[job.zero_stage]
    states = replicated * params + sharded * params / job.world_size
    head_bytes = FP32 if job.lm_head_fp32 else BF16
    buffers = 0.0
    if job.zero_stage == 3:
        buffers = ZERO3_GATHERED_LAYERS * a.layer_params() * BF16 * 2
        buffers += a.embedding_params * head_bytes * 2

    tokens = job.update_tokens or job.micro_batch * job.seq_len
    width = (
        LAYER_HIDDEN_VALUES * a.hidden
        + 2 * a.q_dim
        + 2 * a.kv_dim
        + 4 * a.mlp_width
        + (a.experts_per_token * a.hidden if a.experts else 0)
    )
    if job.gradient_checkpointing:
        checkpoints = a.layers * a.hidden * tokens * BF16
        layer_work = 2 * width * tokens * BF16
    else:
        checkpoints = 0.0
        layer_work = a.layers * width * tokens * BF16
    # One micro-batch's completion logits in the LM head's precision. TRL's fused head
    # (ChunkedLogProbFunction, used by the trainer) never holds them all; the term is kept as the
    # margin for any unfused path.
    logit_rows = job.update_tokens or job.micro_batch * job.max_completion_length
    logits = logit_rows * a.vocab * head_bytes

    base = {"training states": states, "reserve": RESERVED_GIB * GIB}
    training = {**base, "gathered ZeRO-3 buffers": buffers}
    update = {**training, "activations": checkpoints + layer_work, "logits": logits}
    if job.topk:
        # one fp32 chunk of logit rows at a time, plus the top-K fields of the pass's tokens
        update["Top-K gather"] = GATHER_CHUNK_BYTES + tokens * job.topk * TOPK_BYTES_PER_SLOT
    # HF generate on the training model: under ZeRO-3 the trainer gathers the whole model for
    # generation (ds3_gather_for_generation), bf16 on every GPU for as long as it samples
    hf_generate = dict(training)
    if job.zero_stage == 3:
        hf_generate["gathered bf16 model"] = BF16 * params
    validation = {
        **hf_generate,
        "validation KV": job.val_batch_size * job.val_seq_len * a.kv_bytes_per_token(1),
    }
    if job.colocated_engine:
        engine_budget = job.gpu_memory_utilization * job.gpu_bytes
        engine_weights = BF16 * params / job.tensor_parallel_size
        kv_budget = engine_budget - engine_weights - VLLM_RUNTIME_GIB * GIB
        kv_per_token = a.kv_bytes_per_token(job.tensor_parallel_size)
        length = job.max_model_length or job.seq_len
        kv_sequences = max(0, math.floor(kv_budget / (length * kv_per_token)))
        rollout = {**base, "vLLM engine": engine_budget}
        # asleep (level 2) the engine drops its weights and KV cache but keeps its runtime
        update["vLLM engine"] = VLLM_RUNTIME_GIB * GIB if job.sleep_mode else engine_budget
        parts = {"rollout": rollout, "update": update}  # validation runs in the engine
    else:
        engine_budget = engine_weights = kv_budget = 0.0
        kv_per_token = a.kv_bytes_per_token(1)
        kv_sequences = 0
        if job.backend == "vllm":
            # vLLM server: the trainer waits for the samples of an engine on other GPUs, and
            # validates with HF generate (only a colocated engine is synced for validation)
            rollout = dict(training)
        else:
            # HF generate of the per-process rollout batch, with its KV cache (no tensor
            # parallelism)
            gen_batch = job.prompts_per_iter * job.n // job.world_size
            rollout = {**hf_generate, "rollout KV": gen_batch * job.seq_len * kv_per_token}
        parts = {"rollout": rollout, "update": update, "validation": validation}
    return Memory(
        states=states,
        buffers=buffers,
        checkpoints=checkpoints,
        layer_work=layer_work,
        logits=logits,
        engine_budget=engine_budget,
        engine_weights=engine_weights,
        kv_budget=kv_budget,
        kv_per_token=kv_per_token,
        kv_sequences=kv_sequences,
        parts=parts,
    )


def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def memory_errors(job: TrainingJob, mem: Memory) -> list[str]:
    """Why the job cannot start or run, one message per problem, naming the model and the key."""
    m = job.model
    vllm = f"models.{m}.{job.engine_key}"
    errors: list[str] = []
    if job.colocated_engine:  # a server's engine is sized where it runs
        tp = job.tensor_parallel_size
        if job.gpus_per_node % tp:
            errors.append(
                f"{vllm}.{job.tp_key}: {tp} does not divide the {job.gpus_per_node} "
                "GPUs of a node (each engine lives on one node)"
            )
        if job.max_model_length is None:
            errors.append(
                f"{vllm}.max_model_length: not set, so vLLM sizes its engine for the model's "
                f"whole context; set it to max_prompt_length + max_completion_length = "
                f"{job.seq_len}"
            )
        else:
            for what, length in (("rollouts", job.seq_len), ("validation", job.val_seq_len)):
                if job.max_model_length < length:
                    errors.append(
                        f"{vllm}.max_model_length: {job.max_model_length} tokens cut {what} "
                        f"short (max_prompt_length + new tokens = {length})"
                    )
        budget = f"gpu_memory_utilization {job.gpu_memory_utilization} x {job.gpu_mem_gib} GiB"
        if mem.kv_budget <= 0:
            errors.append(
                f"models.{m}: vLLM weights {gib(mem.engine_weights)} GiB per GPU "
                f"({job.tp_key} {tp}) + {VLLM_RUNTIME_GIB} GiB engine runtime exceed "
                f"the engine budget {budget} = {gib(mem.engine_budget)} GiB; raise "
                f"{vllm}.gpu_memory_utilization or {job.tp_key}"
            )
        elif mem.kv_sequences < 1:
            length = job.max_model_length or job.seq_len
            errors.append(
                f"models.{m}: the vLLM KV cache ({budget} - weights - runtime = "
                f"{gib(mem.kv_budget)} GiB) holds no sequence of {length} tokens "
                f"({gib(length * mem.kv_per_token)} GiB); raise {vllm}.gpu_memory_utilization"
            )
    if mem.peak > job.gpu_bytes:
        phase = mem.peak_phase
        shown = ", ".join(f"{k} {gib(v)}" for k, v in mem.parts[phase].items() if v)
        hint = {
            "rollout": f"lower {vllm}.gpu_memory_utilization or add nodes",
            "update": f"lower models.{m}.schedule.micro_batch or add nodes",
            "validation": "lower validation.batch_size",
        }[phase]
        errors.append(
            f"models.{m}: needs {gib(mem.peak)} GiB per GPU in the {phase} phase ({shown}; GiB) "
            f"but a GPU has {job.gpu_mem_gib} GiB (models.{m}.resources.train.gpu_mem_gib); "
            f"{hint}"
        )
    return errors



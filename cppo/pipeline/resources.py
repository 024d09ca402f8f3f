"""Will a config's GPU training jobs fit, and what do they cost? (`python -m cppo.pipeline
check-resources CONFIG`, also run when Snakemake parses a config with GPU training jobs.)

For every hub model trained on GPUs, per GPU and per phase of the loop (TRL + DeepSpeed), in
bytes. With a colocated vLLM engine (`backend: vllm`, `vllm.mode: colocate`):

    rollout = training states + vLLM engine budget (gpu_memory_utilization x GPU memory)
              + reserve
    update  = training states + gathered ZeRO-3 buffers + activations + logits + reserve
              + what the engine keeps meanwhile (its runtime when asleep, else its budget)
    (validation runs in the engine, as a rollout)

and the engine itself: its bf16 weights / tensor_parallel_size must leave KV room for at least
one sequence of the engine's max_model_length. With HF generate on the training model (the
transformers backend: rollouts and validation; a vLLM server: validation only, the engine and
its memory are on other GPUs):

    rollout / validation = training states + gathered buffers + the whole bf16 model under
              ZeRO-3 (gathered for generation) + the KV cache of the batch + reserve
    update  = as above, without an engine

A job needing more than `gpu_mem_gib` in any phase is refused, naming the model and the numbers.

These are estimates from the architecture (ARCHITECTURES), not measurements. The constants
below say where each term comes from; the throughput figures (THROUGHPUT) are assumptions.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from cppo.pipeline.plan import Plan

GIB = 1024**3
BF16 = 2
FP32 = 4


# --- architectures --------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that size its memory (names as in config.json)."""

    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int
    vocab: int  # vocab_size
    intermediate: int  # intermediate_size of a dense MLP (0: every layer is MoE)
    tied_embeddings: bool  # tie_word_embeddings
    experts: int = 0  # num_experts (0: dense)
    experts_per_token: int = 0  # num_experts_per_tok
    moe_intermediate: int = 0  # moe_intermediate_size

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def mlp_width(self) -> int:
        """Width of the MLP a token passes through (its experts' together in an MoE layer)."""
        if self.experts:
            return self.experts_per_token * self.moe_intermediate
        return self.intermediate

    def layer_params(self, active: bool = False) -> int:
        """One decoder layer: q/k/v/o projections, q/k norms, the MLP (gate, up, down), two norms;
        an MoE layer has `experts` MLPs (`experts_per_token` active) and a router."""
        attention = 2 * self.hidden * self.q_dim + 2 * self.hidden * self.kv_dim + 2 * self.head_dim
        if self.experts:
            n = self.experts_per_token if active else self.experts
            mlp = n * 3 * self.hidden * self.moe_intermediate + self.hidden * self.experts
        else:
            mlp = 3 * self.hidden * self.intermediate
        return attention + mlp + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def params(self, active: bool = False) -> int:
        """Distinct parameters (a tied LM head counted once) + the final norm."""
        heads = 1 if self.tied_embeddings else 2
        return self.layers * self.layer_params(active) + heads * self.embedding_params + self.hidden

    def kv_bytes_per_token(self, tensor_parallel_size: int = 1) -> int:
        """bf16 K and V of every layer for one token on one GPU; vLLM splits the KV heads over
        the tensor-parallel ranks (replicating them when there are more ranks than heads)."""
        heads = math.ceil(self.kv_heads / tensor_parallel_size)
        return 2 * self.layers * heads * self.head_dim * BF16


# From each model's config.json on the Hugging Face hub (Qwen/<name>; the -Base checkpoints
# share the architecture of the post-trained ones). Parameter counts follow from these numbers
# (Architecture.params): Qwen3-1.7B 1.72B distinct (the hub page says 2.03B because the tied LM
# head is stored twice), Qwen3-8B 8.19B, Qwen3-30B-A3B 30.5B total / 3.3B active per token.
ARCHITECTURES: dict[str, Architecture] = {
    "Qwen3-1.7B": Architecture(
        layers=28,
        hidden=2048,
        heads=16,
        kv_heads=8,
        head_dim=128,
        vocab=151936,
        intermediate=6144,
        tied_embeddings=True,
    ),
    "Qwen3-8B": Architecture(
        layers=36,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=151936,
        intermediate=12288,
        tied_embeddings=False,
    ),
    # config.json also lists intermediate_size 6144, unused: every layer is MoE
    # (decoder_sparse_step 1, no mlp_only_layers)
    "Qwen3-30B-A3B": Architecture(
        layers=48,
        hidden=2048,
        heads=32,
        kv_heads=4,
        head_dim=128,
        vocab=151936,
        intermediate=0,
        tied_embeddings=False,
        experts=128,
        experts_per_token=8,
        moe_intermediate=768,
    ),
}


def architecture_name(hub_id: str) -> str | None:
    """ "Qwen/Qwen3-8B-Base" -> "Qwen3-8B"; None when ARCHITECTURES has no entry."""
    name = hub_id.split("/")[-1].removesuffix("-Base")
    return name if name in ARCHITECTURES else None


# --- memory model ---------------------------------------------------------------------------

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


# accelerate config files in commands.train.launcher are relative to the workflow's directory
REPO_ROOT = Path(__file__).resolve().parents[2]


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
    runs: int  # runs of this model in the matrix (methods x seeds)
    # verl: tokens per GPU per forward/backward pass (dynamic batch size) instead of
    # micro_batch x seq_len, and the config block its engine settings come from
    update_tokens: int | None = None
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


# --- time and disk ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """Effective tokens/s per GPU of one phase of an iteration (assumptions, see THROUGHPUT)."""

    rollout: float  # generated tokens / (GPUs x generation time)
    update: float  # trained tokens (prompt + response) / (GPUs x update time)
    overhead_s: float  # per iteration: weight sync into vLLM, engine sleep/wake, logging


# ASSUMPTIONS, not measurements, for H100 80GB GPUs running this trainer (TRL GRPOTrainer, vLLM
# colocate, DeepSpeed ZeRO-3, Hugging Face modelling code); order-of-magnitude choices on the
# slow side, since a run that is faster than planned only returns wall time. Rollout rates are
# effective over a whole synchronous batch: the batch waits for its longest response (up to
# max_completion_length tokens at the decode speed of a nearly empty batch) and sequences are
# preempted when the KV cache is full, so they sit far below vLLM's peak throughput. Update
# rates cover forward + backward with gradient checkpointing (one more forward) and padding to
# the longest sequence of a micro-batch: 1.7B at 4000 tokens/s ~ 8 x 1.72e9 x 4000 = 55
# TFLOP/s per GPU, 8B at 1500 ~ 98 TFLOP/s, 30B-A3B at 2500 ~ 8 x 3.35e9 x 2500 = 67 TFLOP/s
# (6-10% of the H100's 989 dense bf16 TFLOP/s: long sequences, ZeRO-3 gathers, eager MoE
# experts). Replace them with the step timings of the first iterations of a real run
# (metrics.jsonl) before planning a campaign.
THROUGHPUT: dict[str, Throughput] = {
    "Qwen3-1.7B": Throughput(rollout=1500, update=4000, overhead_s=30),
    "Qwen3-8B": Throughput(rollout=900, update=1500, overhead_s=60),
    "Qwen3-30B-A3B": Throughput(rollout=2000, update=2500, overhead_s=120),
}
# Mean response length as a fraction of max_completion_length, over a whole run (assumption: the
# paper reports no lengths; DAPO-style runs on Qwen3 grow from ~1/4 to most of the budget).
MEAN_RESPONSE_FRACTION = 0.5
# Mean prompt length in tokens of a DAPO-Math-17k problem with its instruction (assumption).
MEAN_PROMPT_TOKENS = 250
# Problems per validation benchmark (assumption: AIME, 30 problems a year).
VALIDATION_PROBLEMS = 30
# What a run keeps on disk (cppo.training.checkpoints): the newest `keep_checkpoints` full
# resumable checkpoints (bf16 model + fp32 master weights and Adam m, v = 2 + 12 bytes/param; one
# more exists while the rotation writes the next) and bf16 model snapshots (2 bytes/param) at
# validated steps, final/ included: `snapshots: all` keeps one per validated step, `best` the
# best so far and the newest not yet scored (or final/), `none` final/ only.
FULL_CHECKPOINT_BYTES_PER_PARAM = BF16 + 12
SNAPSHOT_BYTES_PER_PARAM = BF16
SNAPSHOTS_AT_PEAK = {"best": 2, "none": 1}  # "all": iterations / validation.every
# the trainer's defaults (cppo.training.runconfig) when run.yaml leaves them out
DEFAULT_KEEP_CHECKPOINTS = 1
DEFAULT_SNAPSHOTS = "best"
# Attempts a training job may need beyond its estimate (a node failure, a slow start).
SPARE_ATTEMPTS = 1
# Minutes from a job's start to its first training step: environment, model and DeepSpeed
# start-up, the vLLM engine (weights, CUDA graphs) and, on a resume, loading the full checkpoint
# (assumption).
STARTUP_MIN = 10


@dataclass(frozen=True)
class Cost:
    """Time and disk of one training run."""

    response_tokens: float  # per iteration
    rollout_s: float
    update_s: float
    overhead_s: float
    validation_s: float  # one validation round
    validations: int  # rounds, step 0 included
    wall_h: float  # training and validation, without start-ups and lost work
    lost_s: float  # the most a wall-time kill throws away (work since the last checkpoint)
    attempts: int  # SLURM jobs of `runtime` minutes needed (resuming after each)
    gpu_h: float  # of all attempts: start-ups and the work lost at each kill included
    full_checkpoint: float  # bytes of one
    full_checkpoints: int  # at the peak
    snapshots: int  # at the peak, final/ included
    disk: float  # bytes at the peak

    @property
    def iteration_s(self) -> float:
        return self.rollout_s + self.update_s + self.overhead_s


def cost(job: TrainingJob) -> Cost:
    """Time and disk of one run; raises ValueError when a job of `runtime` minutes cannot make
    progress between its start-up and the work a wall-time kill loses."""
    rate = THROUGHPUT[job.arch_name]
    gpus = job.world_size
    sequences = job.prompts_per_iter * job.n
    response = sequences * MEAN_RESPONSE_FRACTION * job.max_completion_length
    trained = response + sequences * MEAN_PROMPT_TOKENS
    rollout_s = response / (rate.rollout * gpus)
    update_s = trained / (rate.update * gpus)
    val_tokens = (
        job.val_benchmarks
        * VALIDATION_PROBLEMS
        * job.val_k
        * MEAN_RESPONSE_FRACTION
        * job.val_max_new_tokens
    )
    validation_s = val_tokens / (rate.rollout * gpus)
    validations = job.iterations // job.val_every + 1
    iteration_s = rollout_s + update_s + rate.overhead_s
    wall_s = job.iterations * iteration_s + validations * validation_s
    # A kill at the wall time loses the work since the last full checkpoint: up to save_every
    # iterations and, since a step validates before it saves (transformers' Trainer logs, hence
    # validates, then saves), that step's validation round.
    lost_s = job.save_every * iteration_s + validation_s
    startup_s = STARTUP_MIN * 60
    runtime_s = job.runtime_min * 60
    usable_s = runtime_s - startup_s - lost_s  # progress kept by a job that is killed
    if usable_s <= 0:
        raise ValueError(
            f"models.{job.model}.resources.train.runtime: a {job.runtime_min} min job keeps no "
            f"training: {STARTUP_MIN} min of start-up plus the work a wall-time kill loses "
            f"({lost_s / 60:.0f} min: save_every = {job.save_every} iterations x "
            f"{iteration_s:.0f} s + a validation round of {validation_s:.0f} s, ASSUMED "
            "throughput) fill it; raise the runtime or lower training.save_every"
        )
    # the last job is not killed: it needs its start-up and what is left
    attempts = 1 + math.ceil(max(0.0, wall_s - (runtime_s - startup_s)) / usable_s)
    # the worst case: every kill loses all it can
    billed_s = wall_s + attempts * startup_s + (attempts - 1) * lost_s
    wall_h = wall_s / 3600
    params = job.arch.params()
    full = FULL_CHECKPOINT_BYTES_PER_PARAM * params
    saves = job.iterations // job.save_every
    fulls = saves if job.keep_checkpoints is None else min(saves, job.keep_checkpoints + 1)
    snapshots = SNAPSHOTS_AT_PEAK.get(job.snapshots, job.iterations // job.val_every)
    return Cost(
        response_tokens=response,
        rollout_s=rollout_s,
        update_s=update_s,
        overhead_s=rate.overhead_s,
        validation_s=validation_s,
        validations=validations,
        wall_h=wall_h,
        lost_s=lost_s,
        attempts=attempts,
        gpu_h=billed_s / 3600 * gpus,
        full_checkpoint=full,
        full_checkpoints=fulls,
        snapshots=snapshots,
        disk=fulls * full + snapshots * SNAPSHOT_BYTES_PER_PARAM * params,
    )


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
    extra: Mapping[str, Any] = training["extra"]
    vllm: Mapping[str, Any] = extra.get("vllm", {})
    res = plan.commands.resources("train", model)
    val = cfg["validation"]
    per_process = sched["minibatch"] * sched["n"] // plan.commands.world_size(model)
    keep = extra.get("keep_checkpoints", DEFAULT_KEEP_CHECKPOINTS)
    job = TrainingJob(
        model=model,
        arch_name=arch_name,
        arch=ARCHITECTURES[arch_name],
        nodes=plan.commands.nodes(model),
        gpus_per_node=int(res["gpus"]),
        gpu_mem_gib=float(res["gpu_mem_gib"]),
        zero_stage=zero_stage(cfg["commands"]["train"]["launcher"], root),
        backend=training["backend"],
        # the trainer's defaults (cppo.training.runconfig) when the config leaves them out
        vllm_mode=str(vllm.get("mode", "colocate")),
        tensor_parallel_size=int(vllm.get("tensor_parallel_size", 1)),
        gpu_memory_utilization=float(vllm.get("gpu_memory_utilization", 0.35)),
        sleep_mode=bool(vllm.get("enable_sleep_mode", True)),
        max_model_length=vllm.get("max_model_length"),
        micro_batch=int(sched.get("micro_batch") or per_process),
        prompts_per_iter=sched["prompts_per_iter"],
        n=sched["n"],
        iterations=sched["iterations"],
        max_prompt_length=sched["max_prompt_length"],
        max_completion_length=sched["max_completion_length"],
        gradient_checkpointing=bool(extra.get("gradient_checkpointing", False)),
        lm_head_fp32=bool(training["cast_lm_head_to_fp32"]),
        val_every=val["every"],
        val_benchmarks=len(val["benchmarks"]),
        val_k=val["k"],
        val_max_new_tokens=val["max_new_tokens"] or sched["max_completion_length"],
        val_batch_size=val["batch_size"],
        save_every=training["save_every"] or val["every"],
        keep_checkpoints=None if keep == "all" else int(keep),
        snapshots=str(extra.get("snapshots", DEFAULT_SNAPSHOTS)),
        runtime_min=int(res["runtime"]),
        runs=len(plan.matrix.methods) * len(plan.matrix.seeds),
    )
    if training["backend"] == "verl":
        job = dataclasses.replace(job, **_verl_terms(training["verl"], sched))
    return job


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


@dataclass(frozen=True)
class Row:
    job: TrainingJob
    memory: Memory
    cost: Cost


@dataclass(frozen=True)
class Report:
    rows: list[Row]
    errors: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def train_retries(self) -> int | None:
        """Retries of the train rule: enough wall-time kills to finish the longest run, plus a
        spare; None (the profile's) when no job is covered."""
        if not self.rows:
            return None
        return max(r.cost.attempts for r in self.rows) - 1 + SPARE_ATTEMPTS


def check(plan: Plan, root: str | Path | None = None) -> Report:
    """Estimate every covered model of a config; errors for those that cannot run."""
    rows: list[Row] = []
    errors: list[str] = []
    notes: list[str] = []
    for model in gpu_training_models(plan):
        try:
            job = training_job(plan, model, root)
        except ValueError as err:
            errors.append(str(err))
            continue
        mem = memory(job)
        errors.extend(memory_errors(job, mem))
        if job.backend == "verl":
            notes.extend(verl_refusals(plan, model))
        try:
            rows.append(Row(job, mem, cost(job)))
        except ValueError as err:
            errors.append(str(err))
    return Report(rows, errors, notes)


def verl_refusals(plan: Plan, model: str) -> list[str]:
    """The runs of a verl model whose rule reads a Top-K divergence: the verl train command
    refuses them at start (cppo.backends.verl.train.refusals), before any GPU work."""
    from cppo.backends.verl.loss import topk_divergence_of

    out = []
    for method in plan.matrix.methods:
        rule = plan.cfg["methods"][method]["rule"]
        spec = topk_divergence_of({"rule": rule, **plan.resolver.method_params(model, method)})
        if spec is not None:
            out.append(
                f"models.{model} / methods.{method}: {spec['kind']} is not wired into verl's "
                "forward pass yet; its verl runs stop at start (README, 'verl backend')"
            )
    return out


# --- printing ---------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_report(report: Report) -> str:
    """The memory table, the time/disk table and the assumptions behind them."""
    if not report.rows:
        return "check-resources: no hub model trained on GPUs; nothing to check"
    mem_rows, cost_rows = [], []
    for r in report.rows:
        j, m, c = r.job, r.memory, r.cost
        if j.colocated_engine:
            engine = f"{gib(m.engine_budget)} ({gib(m.engine_weights)} w)"
        else:
            engine = "server" if j.backend == "vllm" else "-"
        mem_rows.append(
            [
                j.model,
                j.backend,
                f"{j.nodes}x{j.gpus_per_node}",
                f"{j.tensor_parallel_size}",
                f"{j.gpu_memory_utilization:g}",
                f"{j.update_tokens} tok" if j.update_tokens else f"{j.micro_batch}",
                gib(m.states),
                gib(m.buffers),
                gib(m.activations),
                gib(m.logits),
                engine,
                f"{gib(m.kv_budget)} ({m.kv_sequences})" if j.colocated_engine else "-",
                gib(m.phases["rollout"]),
                gib(m.phases["update"]),
                f"{gib(m.peak)}/{j.gpu_mem_gib:g}",
            ]
        )
        cost_rows.append(
            [
                j.model,
                f"{c.response_tokens / 1e6:.2f}",
                f"{c.rollout_s:.0f}+{c.update_s:.0f}+{c.overhead_s:.0f}",
                f"{c.validation_s:.0f} x{c.validations}",
                f"{c.wall_h:.0f}",
                f"{c.gpu_h:,.0f}",
                f"{j.runs}",
                f"{c.gpu_h * j.runs:,.0f}",
                f"{j.runtime_min} x{c.attempts}",
                f"{c.lost_s / 3600:.1f}",
                f"{c.full_checkpoints} x {gib(c.full_checkpoint)}",
                f"{j.snapshots}: {c.snapshots} x {gib(SNAPSHOT_BYTES_PER_PARAM * j.arch.params())}",
                f"{c.disk / 1e12:.2f}",
            ]
        )
    total_gpu_h = sum(r.cost.gpu_h * r.job.runs for r in report.rows)
    total_disk = sum(r.cost.disk * r.job.runs for r in report.rows)
    out = [
        "Per-GPU memory of one training job, GiB (estimates; cppo/pipeline/resources.py)",
        _table(
            [
                "model",
                "backend",
                "nodes",
                "tp",
                "util",
                "micro",
                "states",
                "buffers",
                "activ",
                "logits",
                "engine (weights)",
                "KV (max-len seqs)",
                "rollout",
                "update",
                "peak/GPU",
            ],
            mem_rows,
        ),
        "",
        "Time and disk of one run (ASSUMED throughput; see below)",
        _table(
            [
                "model",
                "Mtok/iter",
                "s/iter gen+upd+sync",
                "val s x n",
                "wall h",
                "GPU-h/run",
                "runs",
                "GPU-h all",
                "runtime min x jobs",
                "lost h/kill",
                "full ckpts x GiB",
                "snapshots x GiB",
                "disk/run TB",
            ],
            cost_rows,
        ),
        f"total: {total_gpu_h:,.0f} GPU-hours of training, {total_disk / 1e12:.1f} TB of "
        "run directories at their peak (post-hoc evaluation not included)",
        *(["", "Notes:", *(f"  - {n}" for n in report.notes)] if report.notes else []),
        "",
        "Assumptions (cppo.pipeline.resources): tokens/s per GPU (rollout, update), sync s/iter:",
    ]
    for name in dict.fromkeys(r.job.arch_name for r in report.rows):
        t = THROUGHPUT[name]
        out.append(f"  {name}: {t.rollout:g}, {t.update:g}, {t.overhead_s:g}")
    out += [
        f"  mean response = {MEAN_RESPONSE_FRACTION:g} x max_completion_length, mean prompt = "
        f"{MEAN_PROMPT_TOKENS} tokens, {VALIDATION_PROBLEMS} problems per validation benchmark",
        f"  per job: {STARTUP_MIN} min of start-up; a wall-time kill loses up to save_every "
        "iterations + one validation round (GPU-hours count the start-ups and a full loss at "
        "every kill)",
        f"  per GPU: reserve {RESERVED_GIB:g} GiB, vLLM runtime {VLLM_RUNTIME_GIB:g} GiB; "
        "activations and logits at max lengths (padding to the longest sequence)",
        f"  disk at the peak: full checkpoints x {FULL_CHECKPOINT_BYTES_PER_PARAM} B/param (kept + "
        f"the one being written) + bf16 snapshots x {SNAPSHOT_BYTES_PER_PARAM} B/param (final/ "
        "included; snapshots: all = one per validated step)",
    ]
    if report.errors:
        out += ["", f"REFUSED ({len(report.errors)} problem(s)):"]
        out += [f"  - {e}" for e in report.errors]
    return "\n".join(out)

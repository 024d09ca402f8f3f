"""Time, GPU-hours, SLURM attempts and disk of one training run (ASSUMED throughput)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cppo.pipeline.resources.architectures import BF16
from cppo.pipeline.resources.job import TrainingJob

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
# verl's Top-K route re-prefills every sampled sequence with K prompt log-probs
# (cppo.backends.verl.agent_loop): a forward pass over the trained tokens, priced at this multiple
# of the update rate (a forward alone is ~1/4 of forward + backward with recomputation; 3 leaves
# room for vLLM's per-position log-prob objects). ASSUMED: benchmarks/gpu_smoke.sh measures the
# K=20 prefill against K=0. Charged to every run of a model with a Top-K rule.
TOPK_PREFILL_SPEEDUP = 3.0
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
    if job.topk:
        rollout_s += trained / (TOPK_PREFILL_SPEEDUP * rate.update * gpus)
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



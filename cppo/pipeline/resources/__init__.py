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

from cppo.pipeline.resources.architectures import (
    ARCHITECTURES,
    BF16,
    FP32,
    GIB,
    Architecture,
    architecture_name,
)
from cppo.pipeline.resources.check import Report, Row, check, format_report, verl_refusals
from cppo.pipeline.resources.cost_model import THROUGHPUT, Cost, Throughput, cost
from cppo.pipeline.resources.job import TrainingJob, gpu_training_models, training_job, zero_stage
from cppo.pipeline.resources.memory_model import Memory, memory, memory_errors

__all__ = [
    "ARCHITECTURES",
    "BF16",
    "FP32",
    "GIB",
    "THROUGHPUT",
    "Architecture",
    "Cost",
    "Memory",
    "Report",
    "Row",
    "Throughput",
    "TrainingJob",
    "architecture_name",
    "check",
    "cost",
    "format_report",
    "gpu_training_models",
    "memory",
    "memory_errors",
    "training_job",
    "verl_refusals",
    "zero_stage",
]

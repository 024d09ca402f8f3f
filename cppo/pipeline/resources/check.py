"""The check of a config: every covered model's job, memory and cost, its errors and notes, and
the printed report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cppo.pipeline.resources.cost_model import (
    FULL_CHECKPOINT_BYTES_PER_PARAM,
    MEAN_PROMPT_TOKENS,
    MEAN_RESPONSE_FRACTION,
    SNAPSHOT_BYTES_PER_PARAM,
    SPARE_ATTEMPTS,
    STARTUP_MIN,
    THROUGHPUT,
    VALIDATION_PROBLEMS,
    Cost,
    cost,
)
from cppo.pipeline.resources.job import (
    TrainingJob,
    gpu_training_models,
    training_job,
    verl_refusals_by_method,
)
from cppo.pipeline.resources.memory_model import (
    RESERVED_GIB,
    VLLM_RUNTIME_GIB,
    Memory,
    gib,
    memory,
    memory_errors,
)

if TYPE_CHECKING:
    from cppo.pipeline.plan import Plan

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
    """The runs of a verl model that the verl train command refuses at start, before any GPU
    work, each with the train command's reasons."""
    return [
        f"models.{model} / methods.{method}: {'; '.join(problems)}; its verl runs stop at start "
        "and are left out of the runs, GPU-hours and disk above"
        for method, problems in verl_refusals_by_method(plan, model).items()
    ]


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
                f"{j.runs}" + (f" (+{j.refused_runs} refused)" if j.refused_runs else ""),
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


"""What a run keeps on disk: rotated full checkpoints for resuming, model-only snapshots for
post-hoc evaluation.

- checkpoint-<step>/: TRL / transformers checkpoints (weights, optimizer, scheduler, RNG, trainer
  state) every `save_every` optimizer steps; only the newest `keep_checkpoints` complete ones are
  kept (`all`: every one). A resume needs only the newest.
- snapshots/step-<step>/: the model alone (safetensors in `snapshot_dtype`, config, generation
  config, tokenizer) at the validated steps, loadable with from_pretrained by the evaluation.
  `snapshots: all` keeps every one, `best` only the best validation so far within
  [0, snapshot_best_within] (the pipeline's checkpoint selection needs no other), `none` none.
  The last step is never snapshotted: final/ holds it.

A full ZeRO-3 checkpoint is ~14 bytes per parameter (ZeRO's shards of the fp32 master weights and
two Adam moments, 12; the consolidated 16-bit model, 2), and two exist while the rotation writes
the next one; a bf16 snapshot is 2 bytes per parameter.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback

from cppo.run.directory import SNAPSHOTS, snapshot_dir, snapshot_steps
from cppo.run.metrics import best_validation, read_metrics
from cppo.training.validation_callback import validation_due

log = logging.getLogger(__name__)

SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint-<step> directory; -1 for any other name."""
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


# What a resumable checkpoint of this trainer holds: (what, the names any one of which will do).
CHECKPOINT_FILES = (
    ("trainer state", ("trainer_state.json",)),
    ("model weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")),
    ("optimizer state", ("optimizer.pt", "global_step*")),  # global_step*: DeepSpeed's shards
    ("scheduler state", ("scheduler.pt",)),
    ("RNG state", ("rng_state.pth", "rng_state_*.pth")),
)


def missing_files(checkpoint: Path) -> list[str]:
    """The parts of a resumable checkpoint that `checkpoint` lacks, by file name (empty when it
    is complete): a resume from it would start a fresh optimizer, scheduler or RNG, or fail."""
    return [
        " or ".join(names)
        for _, names in CHECKPOINT_FILES
        if not any(any(checkpoint.glob(name)) for name in names)
    ]


def is_complete(checkpoint: Path) -> bool:
    return not missing_files(checkpoint)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint in run_dir. One that lacks a file is passed over with a
    warning naming the file (the previous complete one is used); one without its
    trainer_state.json, which the trainer writes last, is a save cut by a kill."""
    candidates = sorted(
        (p for p in run_dir.glob("checkpoint-*") if checkpoint_step(p) >= 0),
        key=checkpoint_step,
        reverse=True,
    )
    for path in candidates:
        missing = missing_files(path)
        if not missing:
            return path
        if (path / "trainer_state.json").is_file():
            log.warning(
                "%s lacks %s: not resuming from it; the previous complete checkpoint is used",
                path,
                "; ".join(missing),
            )
    return None


def rotate_checkpoints(run_dir: Path, keep: int | None) -> list[Path]:
    """Delete every checkpoint-<step>/ but the newest `keep` complete ones (by step number, not
    mtime); incomplete ones (a save cut by a kill) go too. None keeps everything. Returns what
    was deleted."""
    if keep is None:
        return []
    dirs = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0]
    complete = sorted((p for p in dirs if is_complete(p)), key=checkpoint_step)
    kept = set(complete[-keep:])
    removed = [p for p in sorted(dirs, key=checkpoint_step) if p not in kept]
    for path in removed:
        shutil.rmtree(path)
    return removed


def drop_snapshots_after(run_dir: Path, step: int) -> list[int]:
    """Delete snapshots of steps after `step` (a resume from checkpoint-<step> recomputes those
    steps) and unfinished snapshot writes. Returns the deleted steps."""
    dropped = [s for s in snapshot_steps(run_dir) if s > step]
    for s in dropped:
        shutil.rmtree(snapshot_dir(run_dir, s))
    parent = run_dir / SNAPSHOTS
    if parent.is_dir():
        for tmp in parent.glob(".step-*.tmp"):
            shutil.rmtree(tmp)
    return dropped


def prune_to_best(run_dir: Path, metrics_path: Path, up_to: int, within: int | None) -> list[int]:
    """`snapshots: best`: keep the snapshot of the best validation in [0, within] among the
    records of steps <= `up_to`, and any snapshot of a later step (not scored yet, or not yet in
    a full checkpoint, so a resume may score it differently). Returns the deleted steps.

    The rule is the checkpoint selection's (cppo.run.metrics.best_validation: highest val/mean,
    earliest on ties), so the snapshot it will ask for is the one kept.
    """
    records = read_metrics(metrics_path).validation if metrics_path.exists() else []
    committed = [r for r in records if int(r["step"]) <= up_to]
    window = up_to if within is None else min(up_to, within)
    best = best_validation(committed, window)
    best_step = int(best["step"]) if best is not None else None
    dropped = [s for s in snapshot_steps(run_dir) if s <= up_to and s != best_step]
    for s in dropped:
        shutil.rmtree(snapshot_dir(run_dir, s))
    return dropped


def _cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """Floating tensors to `dtype`; tensors sharing storage (tied embeddings) stay shared, so
    save_pretrained recognises and drops the tied copy."""
    cast: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        if not tensor.is_floating_point():
            out[name] = tensor
            continue
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in cast:
            cast[key] = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        out[name] = cast[key]
    return out


def write_snapshot(trainer: Any, path: Path, dtype: torch.dtype) -> None:
    """Save the trainer's current model (no optimizer state) with its tokenizer into `path`.

    Collective under DeepSpeed ZeRO-3 (every rank takes part in the gather); only the main
    process writes, into a temporary directory renamed at the end, so a kill never leaves a
    half-written snapshot that the checkpoint selection could pick.
    """
    accelerator = trainer.accelerator
    if accelerator.distributed_type == DistributedType.DEEPSPEED and dtype == torch.float32:
        # ZeRO-3 gathers the 16-bit weights; fp32 would only widen them
        log.warning("snapshot_dtype float32 under DeepSpeed: the snapshot holds the 16-bit weights")
    state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(trainer.model)
        tmp = path.with_name(f".{path.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, state_dict=_cast_state_dict(state_dict, dtype))
        # config.json records the snapshot's dtype, so dtype="auto" loads what was saved
        config = model.config.__class__.from_pretrained(tmp)
        config.dtype = dtype
        config.save_pretrained(tmp)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    accelerator.wait_for_everyone()


def validated_step(step: int, max_steps: int, validation: dict[str, Any]) -> bool:
    """Whether the trainer validates after optimizer step `step` > 0 (the schedule of
    cppo.training.validation_callback)."""
    return step > 0 and validation_due(step, max_steps, validation)


class CheckpointPolicy(TrainerCallback):
    """Writes the snapshots and rotates the full checkpoints of one run (see the module doc)."""

    def __init__(
        self,
        trainer: Any,
        run_dir: Path,
        *,
        keep_checkpoints: int | None,
        snapshots: str,
        snapshot_dtype: torch.dtype,
        best_within: int | None,
        validation: dict[str, Any],
        metrics_path: Path,
    ) -> None:
        if snapshots not in ("all", "best", "none"):
            raise ValueError(f"snapshots must be all, best or none, got {snapshots!r}")
        self.trainer = trainer
        self.run_dir = run_dir
        self.keep = keep_checkpoints
        self.mode = snapshots
        self.dtype = snapshot_dtype
        self.best_within = best_within
        self.validation = validation
        self.metrics_path = metrics_path

    def wants_snapshot(self, step: int, max_steps: int) -> bool:
        if self.mode == "none" or step >= max_steps:  # final/ holds the last step
            return False
        if not validated_step(step, max_steps, self.validation):
            return False
        # outside the selection window a step can never be the best
        return self.mode == "all" or self.best_within is None or step <= self.best_within

    def on_step_end(self, args, state, control, **kwargs):
        # before this step's validation and save; the weights are the ones validated
        step = int(state.global_step)
        if self.wants_snapshot(step, int(state.max_steps)):
            write_snapshot(self.trainer, snapshot_dir(self.run_dir, step), self.dtype)
        return control

    def on_save(self, args, state, control, **kwargs):
        # runs after checkpoint-<step> is complete (trainer_state.json written)
        if self.trainer.accelerator.is_main_process:
            step = int(state.global_step)
            removed = rotate_checkpoints(self.run_dir, self.keep)
            if removed:
                log.info("removed old checkpoints %s", [p.name for p in removed])
            if self.mode == "best":
                # only now are the records up to `step` safe from a resume that redoes them
                dropped = prune_to_best(self.run_dir, self.metrics_path, step, self.best_within)
                if dropped:
                    log.info("removed snapshots of steps %s (not the best so far)", dropped)
        return control

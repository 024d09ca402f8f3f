"""Reading a trainer run directory and selecting its checkpoints.

Run directory (written by `python -m cppo.train`): metrics.jsonl (one JSON object per optimizer
step, kind "train" or "validation"), snapshots/step-<step>/ (model-only HF directories with the
tokenizer, at validated steps; see cppo.training.checkpoints), checkpoint-<step>/ (full resumable
trainer checkpoints, rotated), final/, DONE.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VAL_MEAN = "val/mean"


@dataclass
class RunMetrics:
    train: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.train + self.validation]
        return max(steps) if steps else None


def is_finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse metrics.jsonl. A resumed run may log a step twice: the last record wins.

    A torn last line (the job was killed while writing) is skipped; a bad line elsewhere is an
    error, since it means the file is not what the trainer writes.
    """
    lines = Path(path).read_text().splitlines()
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON object") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}:{i + 1}: record without a 'step'")
        kind = rec.get("kind", "train")
        by_key[(kind, int(rec["step"]))] = rec
    out = RunMetrics()
    for (kind, _), rec in sorted(by_key.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        (out.validation if kind == "validation" else out.train).append(rec)
    return out


def best_validation(records: list[dict[str, Any]], t_stop_steps: int) -> dict[str, Any] | None:
    """The validation record with the highest val/mean among steps in [0, t_stop_steps].

    Ties go to the earliest step (the first time the best value was reached). Records with a
    missing or non-finite val/mean are ignored. None when no record qualifies.
    """
    best: dict[str, Any] | None = None
    for rec in records:
        value = rec.get(VAL_MEAN)
        if not is_finite(value) or not 0 <= rec["step"] <= t_stop_steps:
            continue
        if (
            best is None
            or value > best[VAL_MEAN]
            or (value == best[VAL_MEAN] and rec["step"] < best["step"])
        ):
            best = rec
    return best


def collapse_step(records: list[dict[str, Any]], keys: list[str]) -> int | None:
    """The step from which training never recovers a finite value of one of `keys`.

    The trainer writes a non-finite metric as null, so null and NaN/inf both count as broken.
    A run has collapsed at step s when, for one of the keys, every record from s on is broken
    (a one-off null is not a collapse). None when no key ends broken.
    """
    best: int | None = None
    for key in keys:
        start = None
        for rec in records:
            if key not in rec:
                continue
            if is_finite(rec[key]):
                start = None
            elif start is None:
                start = int(rec["step"])
        if start is not None and (best is None or start < best):
            best = start
    return best


def validation_collapse_step(
    records: list[dict[str, Any]], fraction: float | None, consecutive: int
) -> int | None:
    """The first step of `consecutive` validations in a row whose val/mean is below
    `fraction` x the step-0 value (non-finite values count as below). None when there is no
    such run of validations, no step-0 record, or `fraction` is None."""
    if fraction is None:
        return None
    start = next((r.get(VAL_MEAN) for r in records if int(r["step"]) == 0), None)
    if not is_finite(start):
        return None
    first, count = None, 0
    for rec in records:
        if int(rec["step"]) == 0:
            continue
        value = rec.get(VAL_MEAN)
        if is_finite(value) and value >= fraction * start:
            first, count = None, 0
            continue
        first = int(rec["step"]) if first is None else first
        count += 1
        if count >= consecutive:
            return first
    return None


SNAPSHOTS = "snapshots"


def snapshot_dir(run_dir: str | Path, step: int) -> Path:
    """Where the trainer writes the model-only snapshot of optimizer step `step`."""
    return Path(run_dir) / SNAPSHOTS / f"step-{step}"


def _model_dirs(run_dir: Path) -> list[tuple[Path, str]]:
    """(parent, name prefix) of every kind of saved model, in the order they are preferred: the
    snapshot first, then a full checkpoint (runs from before snapshots, or a surviving one)."""
    return [
        (run_dir / SNAPSHOTS, "step-"),
        (run_dir, "checkpoint-"),
        (run_dir / "checkpoints", "checkpoint-"),
    ]


def find_checkpoint(run_dir: str | Path, step: int) -> Path | None:
    """The saved model of `step`: snapshots/step-<step>/, else checkpoint-<step>/."""
    for parent, prefix in _model_dirs(Path(run_dir)):
        cand = parent / f"{prefix}{step}"
        if cand.is_dir():
            return cand
    return None


def list_checkpoints(run_dir: str | Path) -> list[int]:
    """Steps with a saved model (snapshot or full checkpoint)."""
    steps = set()
    for parent, prefix in _model_dirs(Path(run_dir)):
        if parent.is_dir():
            for d in parent.glob(f"{prefix}*"):
                suffix = d.name[len(prefix) :]
                if d.is_dir() and suffix.isdigit():
                    steps.add(int(suffix))
    return sorted(steps)


def _initial_model_dir(model: str, revision: str | None) -> tuple[str, str | None]:
    """A pinned hub model as its local snapshot directory when it is cached, so the evaluation
    of step 0 reads the same files as training did and needs no network; else (id, revision)."""
    if not revision or Path(model).is_dir():
        return model, revision
    from cppo.hub import ModelNotCachedError, cached_snapshot

    try:
        return str(cached_snapshot(model, revision)), None
    except ModelNotCachedError:
        return model, revision


def select_checkpoints(
    run_dir: str | Path,
    t_stop_steps: int,
    initial_model: str,
    initial_revision: str | None = None,
) -> dict[str, Any]:
    """Best (in-loop val/mean within [0, T_stop]) and final checkpoints of a finished run.

    The best step's model is its snapshot (snapshots/step-<step>/, or checkpoint-<step>/ in a
    run directory from before snapshots); step 0 is the initial model (a pinned hub model as its
    cached snapshot directory when there is one); the last step is final/. A best step without a
    saved model is an error: with `snapshots: best` the trainer keeps exactly that snapshot when
    its run.yaml `snapshot_best_within` matches `t_stop_steps`.
    """
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    final_dir = run_dir / "final"
    last = metrics.last_step or 0
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "t_stop_steps": t_stop_steps,
        "final": {"step": last, "path": str(final_dir)},
    }
    if not final_dir.is_dir():
        raise FileNotFoundError(f"{final_dir}: the run has no final/ model directory")
    best = best_validation(metrics.validation, t_stop_steps)
    if best is None:
        raise ValueError(
            f"{run_dir}: no validation record with a finite val/mean in [0, {t_stop_steps}]"
        )
    step = int(best["step"])
    ckpt = find_checkpoint(run_dir, step)
    revision = None
    if ckpt is not None:
        path = str(ckpt)
    elif step == 0:
        path, revision = _initial_model_dir(initial_model, initial_revision)
    elif step == last:
        path = str(final_dir)
    else:
        raise FileNotFoundError(
            f"{run_dir}: best validation step {step} has no {SNAPSHOTS}/step-{step}/ or "
            f"checkpoint-{step}/ (saved: {list_checkpoints(run_dir) or 'none'})"
        )
    out["best"] = {"step": step, "val_mean": best[VAL_MEAN], "path": path}
    if revision:
        out["best"]["revision"] = revision
    return out

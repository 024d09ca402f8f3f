"""The run directory every backend leaves, and the checkpoint selection that reads it.

    metrics.jsonl          one record per optimizer step (cppo.run.metrics)
    snapshots/step-<N>/    model-only Hugging Face directories (with the tokenizer) at
                           validated steps
    checkpoint-<N>/        full resumable checkpoints of the backend (rotated)
    final/                 the last step's model
    DONE                   written last: JSON with the run's name, steps and provenance

`select_checkpoints` turns a finished run into its best (in-loop validation within T_stop) and
final model directories for the post-hoc evaluation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cppo.run.metrics import VAL_MEAN, best_validation, read_metrics

DONE = "DONE"


class RunIntegrityError(ValueError):
    """A finished run directory that does not hold what its DONE marker says."""


def write_done(run_dir: str | Path, info: dict[str, Any]) -> Path:
    """The completion marker, written last (after final/ and the last metrics record), so its
    presence means done; `steps` is the last optimizer step, which integrity_problems checks
    metrics.jsonl against."""
    path = Path(run_dir) / DONE
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def integrity_problems(run_dir: str | Path) -> list[str]:
    """What a run directory with a DONE marker lacks, one message each (empty: intact): a DONE
    that is not a JSON object with `steps`, no final/, a metrics.jsonl that is missing, holds a
    line that is not a JSON record (torn or edited), or ends before the step DONE names."""
    run_dir = Path(run_dir)
    done = run_dir / DONE
    if not done.exists():
        return []
    try:
        info = json.loads(done.read_text())
        steps = int(info["steps"])
    except (ValueError, KeyError, TypeError):
        return [f"{done} is not the JSON marker the trainer writes (with 'steps')"]
    problems = []
    if not (run_dir / "final").is_dir():
        problems.append(f"{run_dir / 'final'} is missing")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return [*problems, f"{metrics} is missing"]
    last = 0
    for i, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if rec.get("kind", "train") == "train":
                last = max(last, int(rec["step"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{metrics}:{i} is not a complete JSON record")
    if last < steps:
        problems.append(f"{metrics} ends at train step {last}, but {DONE} says {steps}")
    return problems


def check_integrity(run_dir: str | Path) -> None:
    """Raise RunIntegrityError naming the run, what is wrong and how to redo it."""
    problems = integrity_problems(run_dir)
    if problems:
        raise RunIntegrityError(
            f"finished run {run_dir} is damaged: {'; '.join(problems)}. Its results cannot be "
            f"trusted: move or delete {run_dir} and rerun to train it again"
        )


SNAPSHOTS = "snapshots"


def snapshot_dir(run_dir: str | Path, step: int) -> Path:
    """Where the trainer writes the model-only snapshot of optimizer step `step`."""
    return Path(run_dir) / SNAPSHOTS / f"step-{step}"


def snapshot_steps(run_dir: str | Path) -> list[int]:
    """Steps with a complete snapshot (a write in progress is a hidden .step-<N>.tmp)."""
    parent = Path(run_dir) / SNAPSHOTS
    steps = []
    if parent.is_dir():
        for d in parent.iterdir():
            match = re.fullmatch(r"step-(\d+)", d.name)
            if match and d.is_dir():
                steps.append(int(match.group(1)))
    return sorted(steps)


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
    check_integrity(run_dir)
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

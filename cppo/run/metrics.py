"""metrics.jsonl: one JSON object per line, written by every backend, read by the pipeline.

A record has `kind` ("train" or "validation") and `step` (the optimizer step). A train record
carries every key of TRAIN_KEYS (null where it does not apply) plus the rule's own diagnostics by
their names; a validation record carries `val/mean` (the unweighted mean over the validation
benchmarks), `val/<benchmark>` and `val/k`. Non-finite values are written as null.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RULE_KEYS",
    "TRAIN_KEYS",
    "VAL_MEAN",
    "MetricsWriter",
    "RunMetrics",
    "best_validation",
    "is_finite",
    "read_metrics",
    "truncate_metrics",
]

TRAIN_KEYS = (
    "reward/mean",
    "accuracy",
    "length/mean",
    "length/max",
    "truncation_rate",
    "entropy",
    "grad_norm",
    "learning_rate",
    "mask/fraction",
    "mask/token_fraction",
    "mask/prefix_fraction",
    "cppo/delta_b_eff",
    "divergence/mean",
    "ratio/abs_dev_mean",
    "logprob/rel_error",
    "logprob/engine_topk_tv",
    # verl's Top-K route: mu's top-K from a prefill pass (cppo.backends.verl.topk.prefill_gap)
    "logprob/prefill_gap",
    "logprob/prefill_coverage",
    "groups/zero_std_fraction",
    "time/step_s",
    "throughput/tokens_per_s",
)
# Contract keys that the rule's own report fills (weighted by eligible tokens over micro-steps).
RULE_KEYS = ("mask/fraction", "mask/token_fraction", "mask/prefix_fraction", "cppo/delta_b_eff")
VAL_MEAN = "val/mean"


def is_finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class RunMetrics:
    train: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_step(self) -> int | None:
        steps = [r["step"] for r in self.train + self.validation]
        return max(steps) if steps else None


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


class MetricsWriter:
    """Appends JSON records (one per line) to metrics.jsonl, flushed and fsynced per record."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record, allow_nan=False)
        with open(self.path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def truncate_metrics(path: str | Path, max_step: int) -> int:
    """Keep only records with step <= max_step (a resumed run rewrites what came after). Returns dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    records = []
    dropped = 0
    with open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut by the kill
                continue
            if rec.get("step", 0) <= max_step:
                records.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as fh:
        fh.writelines(records)
    os.replace(tmp, path)
    return dropped

"""verl's per-iteration metrics -> this project's metrics.jsonl records.

verl's file logger writes one JSON line ``{"step": iteration, "data": {name: value}}`` per
log call (training metrics once per iteration; validation at iteration 0 and every test_freq).
A record here is keyed by optimizer step: iteration x updates_per_iter, the last optimizer
step of the iteration, so selection, tables and figures read verl runs unchanged. The train
record carries every key of the contract (``cppo.run.metrics.TRAIN_KEYS``; null where verl
has no counterpart), the rule's own diagnostics under their names (verl prefixes them with
``actor/``), and every other verl metric under ``verl/<name>``. accuracy is (mean score + 1) / 2,
exact for the +1 / -1 DAPO reward.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cppo.run.metrics import TRAIN_KEYS

__all__ = ["convert", "read_verl_log", "train_record", "validation_record"]

# contract key <- verl metric
RENAMED = {
    "reward/mean": "critic/score/mean",
    "length/mean": "response_length/mean",
    "length/max": "response_length/max",
    "truncation_rate": "response_length/clip_ratio",
    "entropy": "actor/entropy",
    "grad_norm": "actor/grad_norm",
    "learning_rate": "actor/lr",
    "time/step_s": "timing_s/step",
    "throughput/tokens_per_s": "perf/throughput",
}
VALIDATION_PREFIX = "val-core/"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def train_record(step: int, data: Mapping[str, Any], rule_keys: Iterable[str]) -> dict[str, Any]:
    """One train record from one iteration's verl metrics."""
    rec: dict[str, Any] = {"kind": "train", "step": step}
    used = set()
    for key in TRAIN_KEYS:
        source = RENAMED.get(key, f"actor/{key}")
        rec[key] = _num(data.get(source))
        used.add(source)
    score = _num(data.get("critic/score/mean"))
    rec["accuracy"] = None if score is None else (score + 1.0) / 2.0
    for key in rule_keys:
        if key not in rec:
            rec[key] = _num(data.get(f"actor/{key}"))
            used.add(f"actor/{key}")
    for name, value in sorted(data.items()):
        if name not in used and not name.startswith(("val-core/", "val-aux/")):
            v = _num(value)
            if v is not None:
                rec[f"verl/{name}"] = v
    return rec


def validation_record(step: int, data: Mapping[str, Any], k: int) -> dict[str, Any] | None:
    """``val/<benchmark>`` (Avg@k of the DAPO accuracy) and ``val/mean`` from val-core keys
    ``val-core/<data_source>/acc/mean@<k>``; None when the iteration has no validation."""
    suffix = f"/acc/mean@{k}"
    scores = {
        name[len(VALIDATION_PREFIX) : -len(suffix)]: float(v)
        for name, v in data.items()
        if name.startswith(VALIDATION_PREFIX) and name.endswith(suffix) and _num(v) is not None
    }
    if not scores:
        return None
    rec: dict[str, Any] = {"kind": "validation", "step": step}
    for name in sorted(scores):
        rec[f"val/{name}"] = scores[name]
    rec["val/mean"] = sum(scores.values()) / len(scores)
    rec["val/k"] = k
    return rec


def read_verl_log(paths: Iterable[str | Path]) -> dict[int, dict[str, Any]]:
    """Iteration -> merged metrics of verl's file-logger files, in the order given (a resumed
    attempt's file comes later and wins for the iterations it repeats). Bad lines are skipped."""
    merged: dict[int, dict[str, Any]] = {}
    for path in paths:
        with open(path) as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                    step, data = int(row["step"]), dict(row["data"])
                except (ValueError, KeyError, TypeError):
                    continue
                merged.setdefault(step, {}).update(data)
    return merged


def convert(
    by_iteration: Mapping[int, Mapping[str, Any]],
    *,
    updates_per_iter: int,
    val_k: int,
    rule_keys: Iterable[str],
) -> list[dict[str, Any]]:
    """metrics.jsonl records in step order; at a validated step the train record comes first,
    as the project's trainer writes them (step 0: the validation before training)."""
    rule_keys = list(rule_keys)
    out: list[dict[str, Any]] = []
    for it in sorted(by_iteration):
        data = by_iteration[it]
        step = it * updates_per_iter
        has_train = any(not k.startswith(("val-core/", "val-aux/")) for k in data)
        if it > 0 and has_train:
            out.append(train_record(step, data, rule_keys))
        val = validation_record(step, data, val_k)
        if val is not None:
            out.append(val)
    return out

"""Aggregation of run directories into long-form CSVs.

Every table CSV has the columns model, method, seed, benchmark, step, value, n_samples
(value in percent, step = optimizer step as logged by the trainer, benchmark "mean" = the
unweighted mean over the validation benchmarks, as in the paper's headline number);
posthoc.csv adds a checkpoint column (best / final).

- validation_long.csv: every in-loop validation record of every run.
- table1.csv: per run, the best validation mean within [0, T_stop] (the paper's Table 1 rule).
- table4.csv: per run and benchmark, the value at that best-mean step (Table 4).
- posthoc.csv: the independent post-hoc evaluation of the selected checkpoints.
- run_status.csv: per run, last step, number of validations, collapse step, best step.
- stability.csv: per run, metric (start, best, gain, final, last2, net) and value: the
  validation mean at step 0, the best within T_stop, best - start, the last validation, the
  mean of the last two, last - start.
- binding.csv: per run, metric and value: how much the rule binds, averaged over optimizer
  steps: `binds`, the diagnostic the rule declares as its own measure (cppo.rules: a share of
  masked or clipped terms, of capped IS weights, of rejected responses, or the weight a soft
  gate takes off); the masked share of terms, a ratio_cap's capped share, CPPO's prefix-budget
  share of its masks (all in %), mean |rho - 1| and mean D_t.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from cppo.pipeline.layout import expand_runs
from cppo.run.directory import integrity_problems
from cppo.run.metrics import VAL_MEAN, RunMetrics, best_validation, is_finite, read_metrics

LONG_COLUMNS = ["model", "method", "seed", "benchmark", "step", "value", "n_samples"]
STATUS_COLUMNS = [
    "model",
    "method",
    "seed",
    "done",
    "last_step",
    "n_validations",
    "best_step",
    "best_value",
    "collapse_step",
]


METRIC_COLUMNS = ["model", "method", "seed", "metric", "value"]
# the CSVs beside the tables' own (one per table of cppo.pipeline.tables.TABLES)
LONG_CSVS = ("validation_long", "run_status")

# binding.csv metric -> the training-record key it reads (`binds`: the rule's declared one)
BINDING_KEYS = {
    "masked": "mask/fraction",
    "capped": "ratio/capped_fraction",
    "abs_dev": "ratio/abs_dev_mean",
    "divergence": "divergence/mean",
}
PERCENT = {"binds", "masked", "capped", "prefix_share"}


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


def stability_values(validation: list[dict[str, Any]], t_stop_steps: int) -> dict[str, float]:
    """start / best / gain / mean / final / last2 / net of one run's validation means, in %.

    mean: the mean of the validations after the start within [0, T_stop], a steadier measure
    of a run than its best (a maximum over noisy validations). A validation without a finite
    mean (a broken model) counts as 0, as in the collapse rule.
    """
    vals = [
        (int(r["step"]), r[VAL_MEAN] if is_finite(r.get(VAL_MEAN)) else 0.0) for r in validation
    ]
    if not vals:
        return {}
    out: dict[str, float] = {}
    start = dict(vals).get(0)
    best = best_validation(validation, t_stop_steps)
    after = [v for step, v in vals if 0 < step <= t_stop_steps]
    if after:
        out["mean"] = _pct(sum(after) / len(after))
    out["final"] = _pct(vals[-1][1])
    out["last2"] = _pct(sum(v for _, v in vals[-2:]) / len(vals[-2:]))
    if best is not None:
        out["best"] = _pct(best[VAL_MEAN])
    if start is not None:
        out["start"] = _pct(start)
        out["net"] = out["final"] - out["start"]
        if "best" in out:
            out["gain"] = out["best"] - out["start"]
    return out


def binding_values(train: list[dict[str, Any]], binds: str | None) -> dict[str, float]:
    """Run means over optimizer steps of how much the rule binds: `binds` is the key of the
    rule's own measure (cppo.rules.Rule.binding; None for a rule that never binds)."""
    out: dict[str, float] = {}

    def mean(key: str) -> float | None:
        xs = [float(r[key]) for r in train if is_finite(r.get(key))]
        return sum(xs) / len(xs) if xs else None

    keys = {"binds": binds, **BINDING_KEYS} if binds else BINDING_KEYS
    for metric, key in keys.items():
        value = mean(key)
        if value is not None:
            out[metric] = value * (100.0 if metric in PERCENT else 1.0)
    # CPPO: the budget's share of all masked terms over the run, a ratio of sums (a mean of
    # per-step shares would weight a step that masks one term like one that masks many)
    prefix = [r for r in train if is_finite(r.get("mask/prefix_fraction"))]
    masked = sum(float(r["mask/fraction"]) for r in prefix if is_finite(r.get("mask/fraction")))
    if prefix and masked > 0:
        out["prefix_share"] = 100.0 * sum(float(r["mask/prefix_fraction"]) for r in prefix) / masked
    return out


def output_csvs(manifest: dict[str, Any]) -> list[str]:
    """The CSVs the aggregate step declares: the long ones and one per table the results
    directory has (write_all writes them, and posthoc.csv whether or not it is shown)."""
    from cppo.pipeline.tables import table_names

    return [*LONG_CSVS, *table_names(manifest)]


def load_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def count_rows(path: str | Path) -> int | None:
    """Number of non-empty lines of a benchmark JSONL, None when the file is not there."""
    path = Path(path)
    if not path.exists():
        return None
    with path.open() as fh:
        return sum(1 for line in fh if line.strip())


def benchmark_sizes(manifest: dict[str, Any]) -> dict[str, int | None]:
    return {name: count_rows(b["path"]) for name, b in manifest["benchmarks"].items()}


def _n_samples(k: int, sizes: dict[str, int | None], names: list[str]) -> int | None:
    if not names or any(sizes.get(n) is None for n in names):
        return None
    return int(k * sum(sizes[n] for n in names))  # type: ignore[misc]


def _pct(x: Any) -> float:
    return float(x) * 100.0 if isinstance(x, int | float) and x is not None else math.nan


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for col in ("step", "n_samples", "seed", "last_step", "best_step", "collapse_step"):
        if col in df:
            df[col] = df[col].astype("Int64")
    return df


class RunReader:
    """What every row function needs about the results directory: validation benchmarks and
    their sizes, k, T_stop per model and the collapse rule."""

    def __init__(self, manifest: dict[str, Any]):
        self.manifest = manifest
        self.sizes = benchmark_sizes(manifest)
        self.k = int(manifest["validation"]["k"])
        self.names = list(manifest["validation"]["benchmarks"])

    def t_stop(self, run: dict[str, Any]) -> int:
        return int(self.manifest["models"][run["model"]]["t_stop_steps"])

    def value_row(
        self, key: dict[str, Any], rec: dict[str, Any], bench: str, field: str
    ) -> dict[str, Any]:
        """One long-form row: a validation record's value of `field` for `bench`."""
        names = self.names if bench == "mean" else [bench]
        return {
            **key,
            "benchmark": bench,
            "step": int(rec["step"]),
            "value": _pct(rec[field]),
            "n_samples": _n_samples(int(rec.get("val/k", self.k)), self.sizes, names),
        }

    def validation_rows(self, key: dict[str, Any], metrics: RunMetrics) -> list[dict[str, Any]]:
        """validation_long.csv: every benchmark of every validation record, then the mean."""
        rows = []
        for rec in metrics.validation:
            rows += [
                self.value_row(key, rec, b, f"val/{b}") for b in self.names if f"val/{b}" in rec
            ]
            if VAL_MEAN in rec:
                rows.append(self.value_row(key, rec, "mean", VAL_MEAN))
        return rows

    def table1_rows(self, key: dict[str, Any], best: dict[str, Any] | None) -> list[dict]:
        """table1.csv: the best validation mean within [0, T_stop]."""
        return [] if best is None else [self.value_row(key, best, "mean", VAL_MEAN)]

    def table4_rows(self, key: dict[str, Any], best: dict[str, Any] | None) -> list[dict]:
        """table4.csv: each benchmark at the best-mean step."""
        if best is None:
            return []
        return [self.value_row(key, best, b, f"val/{b}") for b in self.names if f"val/{b}" in best]

    def status_row(
        self, key: dict[str, Any], run: dict[str, Any], metrics: RunMetrics, best: dict | None
    ) -> dict[str, Any]:
        """run_status.csv: last step, validations, best step and value, collapse step."""
        collapse = self.manifest["collapse"]
        steps = [
            collapse_step(metrics.train, list(collapse["nonfinite_keys"])),
            validation_collapse_step(
                metrics.validation, collapse["val_fraction"], collapse["consecutive"]
            ),
        ]
        problems = integrity_problems(run["run_dir"])
        for problem in problems:
            print(f"aggregate: {run['run_dir']}: {problem} (not counted as done)", file=sys.stderr)
        return {
            **key,
            "done": (Path(run["run_dir"]) / "DONE").exists() and not problems,
            "last_step": metrics.last_step,
            "n_validations": len(metrics.validation),
            "best_step": None if best is None else int(best["step"]),
            "best_value": None if best is None else _pct(best[VAL_MEAN]),
            "collapse_step": min((s for s in steps if s is not None), default=None),
        }

    def stability_rows(self, key: dict[str, Any], run: dict, metrics: RunMetrics) -> list[dict]:
        """stability.csv: start, best, gain, final, last2, net."""
        values = stability_values(metrics.validation, self.t_stop(run))
        return [{**key, "metric": m, "value": v} for m, v in values.items()]

    def binding_rows(self, key: dict[str, Any], run: dict, metrics: RunMetrics) -> list[dict]:
        """binding.csv: how much the rule binds (binding_values)."""
        binds = self.manifest["methods"][run["method"]].get("binding")
        values = binding_values(metrics.train, binds)
        return [{**key, "metric": m, "value": v} for m, v in values.items()]


def collect(manifest: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """All long-form tables of a results directory, from its manifest."""
    reader = RunReader(manifest)
    rows: dict[str, list[dict[str, Any]]] = {
        name: [] for name in ("validation_long", "table1", "table4", "posthoc", "run_status",
                              "stability", "binding")
    }  # fmt: skip
    for run in expand_runs(manifest):
        key = {"model": run["model"], "method": run["method"], "seed": int(run["seed"])}
        metrics_path = Path(run["run_dir"]) / "metrics.jsonl"
        if not metrics_path.exists():
            rows["run_status"].append({**key, "done": False, "n_validations": 0})
            continue
        metrics = read_metrics(metrics_path)
        best = best_validation(metrics.validation, reader.t_stop(run))
        rows["validation_long"] += reader.validation_rows(key, metrics)
        rows["stability"] += reader.stability_rows(key, run, metrics)
        rows["binding"] += reader.binding_rows(key, run, metrics)
        rows["run_status"].append(reader.status_row(key, run, metrics, best))
        rows["table1"] += reader.table1_rows(key, best)
        rows["table4"] += reader.table4_rows(key, best)
        if best is not None:
            rows["posthoc"] += _posthoc_rows(run, key)
    columns = {
        "validation_long": LONG_COLUMNS,
        "table1": LONG_COLUMNS,
        "table4": LONG_COLUMNS,
        "posthoc": ["checkpoint", *LONG_COLUMNS],
        "run_status": STATUS_COLUMNS,
        "stability": METRIC_COLUMNS,
        "binding": METRIC_COLUMNS,
    }
    return {name: _frame(rows[name], columns[name]) for name in columns}


def _posthoc_rows(run: dict[str, Any], key: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    selection = Path(run["selection"])
    sel = json.loads(selection.read_text()) if selection.exists() else {}
    for ckpt, summaries in run.get("eval", {}).items():
        step = sel.get(ckpt, {}).get("step")
        values, samples = [], []
        for bench, path in summaries.items():
            path = Path(path)
            if not path.exists():
                continue
            summary = json.loads(path.read_text())
            value = _pct(summary["avg_at_k"])
            rows.append(
                {
                    "checkpoint": ckpt,
                    **key,
                    "benchmark": bench,
                    "step": step,
                    "value": value,
                    "n_samples": summary.get("n_samples"),
                }
            )
            values.append(value)
            samples.append(summary.get("n_samples"))
        if len(values) > 1 and len(values) == len(summaries):
            rows.append(
                {
                    "checkpoint": ckpt,
                    **key,
                    "benchmark": "mean",
                    "step": step,
                    "value": sum(values) / len(values),
                    "n_samples": None if None in samples else int(sum(samples)),
                }
            )
    return rows


def write_all(manifest_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    manifest = load_manifest(manifest_path)
    frames = collect(manifest)
    if manifest["paper_comparison"]:
        from cppo.pipeline.tables import paper_diff

        frames["paper_diff"] = paper_diff(
            frames["table1"], frames["table4"], frames["run_status"], manifest
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, df in frames.items():
        path = out_dir / f"{name}.csv"
        df.to_csv(path, index=False, float_format="%.4f")
        written[name] = path
    return written

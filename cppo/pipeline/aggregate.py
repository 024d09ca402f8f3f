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
  steps (masked / clipped share of terms, capped IS weights, CPPO's prefix-budget share of its
  masks, TRM's rejected responses, in %; mean |rho - 1| and mean D_t).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from cppo.pipeline.layout import expand_runs
from cppo.pipeline.runs import (
    VAL_MEAN,
    best_validation,
    collapse_step,
    is_finite,
    read_metrics,
    validation_collapse_step,
)

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

# binding.csv metric -> the training-record keys it reads (the first one a run logged wins)
BINDING_KEYS = {
    "masked": ("mask/fraction",),
    "capped": ("cispo/capped_fraction", "minpro/clip_fraction", "ratio/capped_fraction"),
    "rejected": ("trm/reject_fraction",),
    "abs_dev": ("ratio/abs_dev_mean",),
    "divergence": ("divergence/mean",),
}
PERCENT = {"masked", "capped", "rejected", "prefix_share"}


def stability_values(validation: list[dict[str, Any]], t_stop_steps: int) -> dict[str, float]:
    """start / best / gain / final / last2 / net of one run's validation means, in %.

    A validation without a finite mean (a broken model) counts as 0, as in the collapse rule.
    """
    vals = [
        (int(r["step"]), r[VAL_MEAN] if is_finite(r.get(VAL_MEAN)) else 0.0) for r in validation
    ]
    if not vals:
        return {}
    out: dict[str, float] = {}
    start = dict(vals).get(0)
    best = best_validation(validation, t_stop_steps)
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


def binding_values(train: list[dict[str, Any]]) -> dict[str, float]:
    """Run means over optimizer steps of what the rule masked, capped or rejected."""
    out: dict[str, float] = {}

    def mean(key: str) -> float | None:
        xs = [float(r[key]) for r in train if is_finite(r.get(key))]
        return sum(xs) / len(xs) if xs else None

    for metric, keys in BINDING_KEYS.items():
        value = next((v for k in keys if (v := mean(k)) is not None), None)
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


def collect(manifest: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """All long-form tables of a results directory, from its manifest."""
    sizes = benchmark_sizes(manifest)
    k = int(manifest["validation"]["k"])
    val_names = list(manifest["validation"]["benchmarks"])
    nonfinite_keys = list(manifest["collapse"]["nonfinite_keys"])

    long_rows, t1_rows, t4_rows, status_rows, post_rows = [], [], [], [], []
    stability_rows, binding_rows = [], []
    for run in expand_runs(manifest):
        key = {"model": run["model"], "method": run["method"], "seed": int(run["seed"])}
        run_dir = Path(run["run_dir"])
        metrics_path = run_dir / "metrics.jsonl"
        if not metrics_path.exists():
            status_rows.append({**key, "done": False, "n_validations": 0})
            continue
        metrics = read_metrics(metrics_path)
        names = val_names
        for rec in metrics.validation:
            for b in names:
                if f"val/{b}" in rec:
                    long_rows.append(
                        {
                            **key,
                            "benchmark": b,
                            "step": int(rec["step"]),
                            "value": _pct(rec[f"val/{b}"]),
                            "n_samples": _n_samples(int(rec.get("val/k", k)), sizes, [b]),
                        }
                    )
            if VAL_MEAN in rec:
                long_rows.append(
                    {
                        **key,
                        "benchmark": "mean",
                        "step": int(rec["step"]),
                        "value": _pct(rec[VAL_MEAN]),
                        "n_samples": _n_samples(int(rec.get("val/k", k)), sizes, names),
                    }
                )

        t_stop = int(manifest["models"][run["model"]]["t_stop_steps"])
        for metric, value in stability_values(metrics.validation, t_stop).items():
            stability_rows.append({**key, "metric": metric, "value": value})
        for metric, value in binding_values(metrics.train).items():
            binding_rows.append({**key, "metric": metric, "value": value})
        best = best_validation(metrics.validation, t_stop)
        steps = [
            collapse_step(metrics.train, nonfinite_keys),
            validation_collapse_step(
                metrics.validation,
                manifest["collapse"]["val_fraction"],
                manifest["collapse"]["consecutive"],
            ),
        ]
        collapse = min((s for s in steps if s is not None), default=None)
        status_rows.append(
            {
                **key,
                "done": (run_dir / "DONE").exists(),
                "last_step": metrics.last_step,
                "n_validations": len(metrics.validation),
                "best_step": None if best is None else int(best["step"]),
                "best_value": None if best is None else _pct(best[VAL_MEAN]),
                "collapse_step": collapse,
            }
        )
        if best is None:
            continue
        bk = int(best.get("val/k", k))
        t1_rows.append(
            {
                **key,
                "benchmark": "mean",
                "step": int(best["step"]),
                "value": _pct(best[VAL_MEAN]),
                "n_samples": _n_samples(bk, sizes, names),
            }
        )
        for b in names:
            if f"val/{b}" in best:
                t4_rows.append(
                    {
                        **key,
                        "benchmark": b,
                        "step": int(best["step"]),
                        "value": _pct(best[f"val/{b}"]),
                        "n_samples": _n_samples(bk, sizes, [b]),
                    }
                )

        post_rows += _posthoc_rows(run, key)

    def frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
        df = pd.DataFrame(rows, columns=columns)
        for col in ("step", "n_samples", "seed", "last_step", "best_step", "collapse_step"):
            if col in df:
                df[col] = df[col].astype("Int64")
        return df

    return {
        "validation_long": frame(long_rows, LONG_COLUMNS),
        "table1": frame(t1_rows, LONG_COLUMNS),
        "table4": frame(t4_rows, LONG_COLUMNS),
        "posthoc": frame(post_rows, ["checkpoint", *LONG_COLUMNS]),
        "run_status": frame(status_rows, STATUS_COLUMNS),
        "stability": frame(stability_rows, METRIC_COLUMNS),
        "binding": frame(binding_rows, METRIC_COLUMNS),
    }


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

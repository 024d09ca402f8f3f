"""How much a results directory's numbers move between seeds, and what its seed count separates.

    python benchmarks/seed_spread.py results/toy-seeds/manifest.json [--a grpo --b none]

Run from the directory the manifest's run paths are relative to (the repository root). For each
model (column) and method, over its seeds, for two per-run measures of the validation curve
(cppo.pipeline.aggregate.stability_values: `best`, the best validation within [0, T_stop], and
`mean`, the mean of the validations after the start within T_stop):

- the mean with its 95% Student-t half-width and the between-seed sd;
- the collapse rate (the pipeline's collapse rule, run_status.csv) with its 95% Wilson interval;

and per column, for methods `a` and `b`:

- the difference a - b with its 95% Welch interval (separated when it excludes 0);
- the pooled sd and the smallest difference n seeds per method separate at 95%:
  d_n = t_{0.975, 2n-2} * sd_pooled * sqrt(2 / n), the difference whose two-sample t interval
  just excludes 0 (a true difference of d_n is separated about half the time); with it, the
  normal-approximation difference separated with 80% power, (1.960 + 0.842) sd sqrt(2 / n).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from cppo.pipeline.aggregate import collect, load_manifest
from cppo.pipeline.stats import seed_stat, t975

MEASURES = ("best", "mean")
SEED_COUNTS = (3, 5, 6, 8, 10, 16)
Z975, Z80 = 1.960, 0.842


def wilson(k: int, n: int, z: float = Z975) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Difference of means a - b and the half-width of its 95% Welch interval."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if va + vb else 1
    return statistics.fmean(a) - statistics.fmean(b), t975(max(1, math.floor(df))) * math.sqrt(
        va + vb
    )


def pooled_sd(groups: list[list[float]]) -> float:
    num = sum((len(g) - 1) * statistics.variance(g) for g in groups)
    return math.sqrt(num / sum(len(g) - 1 for g in groups))


def separable(sd: float, n: int) -> tuple[float, float]:
    """(d_n at 95%, the 80%-power difference) for n seeds per method."""
    return t975(2 * n - 2) * sd * math.sqrt(2 / n), (Z975 + Z80) * sd * math.sqrt(2 / n)


def spread(manifest: dict, a: str, b: str) -> dict:
    frames = collect(manifest)
    status = frames["run_status"]
    done = status[status["done"].astype(bool)][["model", "method", "seed"]]
    # finished runs only: a run still training has a shorter curve
    stab = frames["stability"].merge(done, on=["model", "method", "seed"])
    status = status.merge(done, on=["model", "method", "seed"])
    out: dict = {"columns": {}, "not_done": len(frames["run_status"]) - len(done)}
    for model in stab["model"].unique():
        col: dict = {"methods": {}, "compare": {}}
        values: dict[tuple[str, str], list[float]] = {}
        for method in stab[stab.model == model]["method"].unique():
            rows = stab[(stab.model == model) & (stab.method == method)]
            st = status[(status.model == model) & (status.method == method)]
            n_collapsed = int(st["collapse_step"].notna().sum())
            entry = {"n": int(rows["seed"].nunique()), "collapsed": n_collapsed}
            entry["collapse_wilson"] = wilson(n_collapsed, len(st))
            for measure in MEASURES:
                vals = [float(v) for v in rows[rows.metric == measure]["value"]]
                values[(method, measure)] = vals
                mean, hw = seed_stat(vals)
                sd = statistics.stdev(vals) if len(vals) > 1 else math.nan
                entry[measure] = {"values": vals, "mean": mean, "hw": hw, "sd": sd}
            col["methods"][method] = entry
        for measure in MEASURES:
            va, vb = values.get((a, measure)), values.get((b, measure))
            if not va or not vb or len(va) < 2 or len(vb) < 2:
                continue
            diff, hw = welch(va, vb)
            sd = pooled_sd([va, vb])
            col["compare"][measure] = {
                "diff": diff,
                "hw": hw,
                "separated": abs(diff) > hw,
                "sd_pooled": sd,
                "separable": {n: separable(sd, n) for n in SEED_COUNTS},
            }
        out["columns"][str(model)] = col
    return out


def markdown(result: dict, a: str, b: str) -> str:
    lines = (
        [f"({result['not_done']} runs not finished, left out)", ""] if result["not_done"] else []
    )
    for model, col in result["columns"].items():
        lines += [f"### {model}", ""]
        lines += [
            "| method | n | best (sd) | mean (sd) | collapsed (95% Wilson) |",
            "|---|--:|---|---|---|",
        ]
        for method, e in col["methods"].items():
            lo, hi = e["collapse_wilson"]
            cells = [f"{e[m]['mean']:.1f} ± {e[m]['hw']:.1f} ({e[m]['sd']:.1f})" for m in MEASURES]
            lines.append(
                f"| {method} | {e['n']} | {cells[0]} | {cells[1]} | "
                f"{e['collapsed']}/{e['n']} ({100 * lo:.0f}-{100 * hi:.0f}%) |"
            )
        lines.append("")
        for measure, c in col["compare"].items():
            verdict = "separated" if c["separated"] else "not separated"
            lines.append(
                f"- {measure}: {a} - {b} = {c['diff']:.1f} ± {c['hw']:.1f} (Welch 95%, "
                f"{verdict}); pooled sd {c['sd_pooled']:.1f}; separable at 95% / with 80% "
                "power at n = "
                + ", ".join(
                    f"{n}: {d50:.1f} / {d80:.1f}" for n, (d50, d80) in c["separable"].items()
                )
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("manifest", help="results/<profile>/manifest.json")
    p.add_argument("--a", default="grpo", help="first method of the comparison")
    p.add_argument("--b", default="none", help="second method of the comparison")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    result = spread(load_manifest(args.manifest), args.a, args.b)
    print(markdown(result, args.a, args.b))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Rendering of the long-form CSVs as the paper's tables (Markdown, LaTeX, HTML).

Cells show the mean over seeds; with two or more seeds, "mean ± h" where h is the half-width of
a 95% Student-t interval of the mean over seeds (h = t_{0.975, n-1} * sd / sqrt(n)). Within a
column, the best mean is bold only when its interval lies wholly above the runner-up's: nothing
is ranked inside the noise, and with one seed nothing is bold. A run that collapsed inside
[0, T_stop] (configured in `collapse`: non-finite training metrics, or validation below a
fraction of its start) is counted in its cell: "(2/3 collapse, first it. N)"; a single seed
that collapsed reads "(collapse, it. N)", the paper's "collapse (step 215)".
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cppo.pipeline.paper import paper_table
from cppo.pipeline.stats import seed_stat


@dataclass
class Stat:
    """A cell: the mean over seeds, its 95% t half-width (NaN with one seed), the number of
    seeds, and how many of the (model, method)'s seeds collapsed inside [0, T_stop]."""

    mean: float
    half_width: float
    n: int
    n_collapsed: int = 0
    collapse_iter: int | None = None
    n_seeds: int | None = None  # seeds in the config; a cell with fewer values says n=

    @property
    def collapsed(self) -> bool:
        """Every seed collapsed (the paper prints "collapse" for such a run; here the cell
        keeps its value and says so, and the ranking leaves it out)."""
        return self.n_collapsed > 0 and self.n_collapsed >= (self.n_seeds or self.n)

    @property
    def interval(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width


def fmt_cell(stat: Stat | None, *, digits: int = 2) -> str:
    if stat is None:
        return "–"
    note = ""
    if stat.n_collapsed:
        where = f"it. {stat.collapse_iter}"
        note = (
            f"collapse, {where}"
            if stat.n_collapsed == stat.n == 1
            else f"{stat.n_collapsed}/{stat.n_seeds or stat.n} collapse, first {where}"
        )
    if math.isnan(stat.mean):
        return note or "–"
    text = f"{stat.mean:.{digits}f}"
    if not math.isnan(stat.half_width):
        text += f" ± {stat.half_width:.{digits}f}"
    if stat.n_seeds is not None and stat.n < stat.n_seeds:
        text += f" (n={stat.n})"
    return f"{text} ({note})" if note else text


def separated_best(cells: dict[Any, Stat]) -> Any | None:
    """The key of the highest mean, if its 95% interval lies wholly above the runner-up's.

    Cells whose every seed collapsed are not ranked (the paper prints "collapse" for them).
    With fewer than two ranked cells, or one seed (no interval), nothing is singled out.
    """
    ranked = sorted(
        ((k, c) for k, c in cells.items() if not c.collapsed and not math.isnan(c.mean)),
        key=lambda kc: kc[1].mean,
        reverse=True,
    )
    if len(ranked) < 2:
        return None
    (best_key, best), (_, runner) = ranked[0], ranked[1]
    if math.isnan(best.half_width) or math.isnan(runner.half_width):
        return None
    return best_key if best.interval[0] > runner.interval[1] else None


def _collapsed_runs(status: pd.DataFrame, manifest: dict[str, Any]) -> dict[tuple, int]:
    """(model, method, seed) -> collapse iteration, for collapses inside [0, T_stop]."""
    out = {}
    for row in status.itertuples(index=False):
        step = row.collapse_step
        if pd.isna(step):
            continue
        model = manifest["models"][row.model]
        if int(step) <= int(model["t_stop_steps"]):
            out[(row.model, row.method, int(row.seed))] = int(step) // int(
                model["updates_per_iter"]
            )
    return out


def summarize(
    df: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any], by: list[str]
) -> dict[tuple, Stat]:
    """Per group of `by` (must include model and method): a Stat over every seed's value.

    Collapsed seeds keep their value (the best within T_stop of a run that later collapsed is
    still its best); the cell counts them and names the first collapse iteration.
    """
    collapsed = _collapsed_runs(status, manifest)
    stats: dict[tuple, Stat] = {}
    seeds = [int(s) for s in manifest["seeds"]]
    groups = df.groupby(by, sort=False) if len(df) else []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        info = dict(zip(by, key, strict=True))
        its = [
            collapsed[(info["model"], info["method"], s)]
            for s in seeds
            if (info["model"], info["method"], s) in collapsed
        ]
        values = [float(v) for v in group["value"] if not math.isnan(float(v))]
        mean, hw = seed_stat(values)
        stats[key] = Stat(mean, hw, len(values), len(its), min(its) if its else None, len(seeds))
    return stats


@dataclass
class Grid:
    """A rendered table: header row, body rows of cell strings, which cells are bold."""

    title: str
    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]
    notes: list[str]
    n_label_cols: int = 1

    def markdown(self) -> str:
        def cell(text: str, b: bool) -> str:
            return f"**{text}**" if b else text

        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        n_num = len(self.header) - self.n_label_cols
        lines.append("|" + "|".join(["---"] * self.n_label_cols + ["---:"] * n_num) + "|")
        for row, bold in zip(self.rows, self.bold, strict=True):
            lines.append(
                "| " + " | ".join(cell(t, b) for t, b in zip(row, bold, strict=True)) + " |"
            )
        lines += [""] + [f"{n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        def esc(text: str) -> str:
            for a, b in (
                ("\\", r"\textbackslash{}"),
                ("&", r"\&"),
                ("%", r"\%"),
                ("_", r"\_"),
                ("#", r"\#"),
                ("±", r"$\pm$"),
                ("–", "--"),
            ):
                text = text.replace(a, b)
            return text

        def cell(text: str, b: bool) -> str:
            return rf"\textbf{{{esc(text)}}}" if b else esc(text)

        cols = "l" * self.n_label_cols + "r" * (len(self.header) - self.n_label_cols)
        out = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(self.title)}}}"]
        out += [rf"\begin{{tabular}}{{{cols}}}", r"\toprule"]
        out.append(" & ".join(esc(h) for h in self.header) + r" \\")
        out.append(r"\midrule")
        for row, bold in zip(self.rows, self.bold, strict=True):
            out.append(" & ".join(cell(t, b) for t, b in zip(row, bold, strict=True)) + r" \\")
        out += [r"\bottomrule", r"\end{tabular}"]
        for note in self.notes:
            out.append(rf"\par\small {esc(note)}")
        out.append(r"\end{table}")
        return "\n".join(out) + "\n"

    def html(self) -> str:
        def cell(text: str, b: bool) -> str:
            t = html.escape(text)
            return f"<td><b>{t}</b></td>" if b else f"<td>{t}</td>"

        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            "<style>table{border-collapse:collapse;font-family:sans-serif}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}</style></head><body>",
            f"<h3>{html.escape(self.title)}</h3><table>",
            "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in self.header) + "</tr>",
        ]
        for row, bold in zip(self.rows, self.bold, strict=True):
            out.append(
                "<tr>" + "".join(cell(t, b) for t, b in zip(row, bold, strict=True)) + "</tr>"
            )
        out.append("</table>")
        out += [f"<p>{html.escape(n)}</p>" for n in self.notes]
        out.append("</body></html>")
        return "\n".join(out) + "\n"


def _seed_note(manifest: dict[str, Any]) -> str:
    n = len(manifest["seeds"])
    if n == 1:
        return f"One seed ({manifest['seeds'][0]}): no interval, no ranking; values in %."
    return (
        f"Mean ± half-width of the 95% Student-t interval over n = {n} seeds (a cell with "
        "fewer says n=; per-seed values in the CSV); values in %. Bold: the best mean of a "
        "column, only where its interval does not overlap the runner-up's."
    )


def _model_header(manifest: dict[str, Any], model: str) -> str:
    entry = manifest["models"][model]
    label = entry["label"]
    if entry.get("stands_for"):
        label += f" (≈ {entry['stands_for']})"
    return label


def _bold_where_separated(
    stats: dict[tuple, Stat], rows: list[Any], cols: list[Any], key
) -> list[list[bool]]:
    """bold[r][c]: cell (row, col) is the separated best of its column (see separated_best)."""
    winners = {}
    for c in cols:
        cells = {r: stats[key(r, c)] for r in rows if key(r, c) in stats}
        winners[c] = separated_best(cells)
    return [[winners[c] == r and winners[c] is not None for c in cols] for r in rows]


def table1_grid(df: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any]) -> Grid:
    """Rows: methods; columns: models; cell: best validation mean within [0, T_stop]."""
    stats = summarize(df, status, manifest, ["model", "method"])
    models, methods = list(manifest["models"]), list(manifest["methods"])
    bold = _bold_where_separated(stats, methods, models, lambda me, mo: (mo, me))
    rows = [
        [manifest["methods"][me]["label"], *(fmt_cell(stats.get((mo, me))) for mo in models)]
        for me in methods
    ]
    bench = ", ".join(
        manifest["benchmarks"][b]["label"] for b in manifest["validation"]["benchmarks"]
    )
    tstops = ", ".join(
        f"{manifest['models'][m]['label']}: {manifest['models'][m]['t_stop']}" for m in models
    )
    return Grid(
        title=f"Table 1: best {bench} Avg@{manifest['validation']['k']} within [0, T_stop]",
        header=["Method", *(_model_header(manifest, m) for m in models)],
        rows=rows,
        bold=[[False, *b] for b in bold],
        notes=[_seed_note(manifest), f"T_stop (iterations): {tstops}."],
    )


def table4_grid(df: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any]) -> Grid:
    """Rows: (model, method); columns: validation benchmarks at the best-mean checkpoint."""
    stats = summarize(df, status, manifest, ["model", "method", "benchmark"])
    benches = list(manifest["validation"]["benchmarks"])
    methods = list(manifest["methods"])
    rows, bold = [], []
    for model in manifest["models"]:
        block = _bold_where_separated(
            stats, methods, benches, lambda me, b, model=model: (model, me, b)
        )
        for meth, brow in zip(methods, block, strict=True):
            row = [manifest["models"][model]["label"], manifest["methods"][meth]["label"]]
            rows.append(row + [fmt_cell(stats.get((model, meth, b))) for b in benches])
            bold.append([False, False, *brow])
    grid = Grid(
        title="Table 4: per-benchmark validation Avg@k at the best-mean checkpoint",
        header=["Model", "Method", *(manifest["benchmarks"][b]["label"] for b in benches)],
        rows=rows,
        bold=bold,
        notes=[_seed_note(manifest)],
    )
    grid.n_label_cols = 2
    return grid


def metric_grid(
    df: pd.DataFrame,
    status: pd.DataFrame,
    manifest: dict[str, Any],
    *,
    title: str,
    columns: list[tuple[str, str]],
    notes: list[str],
    digits: int = 2,
) -> Grid:
    """Rows: (model, method); one column per (metric, header) of a long CSV with a `metric`
    column (stability.csv, binding.csv); cells are means over seeds with their interval."""
    stats = summarize(df, status, manifest, ["model", "method", "metric"])
    methods = list(manifest["methods"])
    metrics = [m for m, _ in columns]
    rows, bold = [], []
    for model in manifest["models"]:
        for meth in methods:
            row = [manifest["models"][model]["label"], manifest["methods"][meth]["label"]]
            for metric in metrics:
                row.append(fmt_cell(stats.get((model, meth, metric)), digits=digits))
            rows.append(row)
            bold.append([False] * len(row))
    grid = Grid(
        title=title,
        header=["Model", "Method", *(h for _, h in columns)],
        rows=rows,
        bold=bold,
        notes=[_seed_note(manifest).split("; values in %")[0] + ".", *notes],
    )
    grid.n_label_cols = 2
    return grid


STABILITY_COLUMNS = [
    ("start", "start"),
    ("best", "best ≤ T_stop"),
    ("gain", "gain (best − start)"),
    ("final", "final"),
    ("last2", "mean of last 2"),
    ("net", "final − start"),
]
BINDING_COLUMNS = [
    ("binds", "binds (%, the rule's own measure)"),
    ("masked", "masked / clipped (% of terms)"),
    ("capped", "ratio cap (% of terms)"),
    ("prefix_share", "prefix-budget share of masks (%)"),
    ("abs_dev", "mean |ρ − 1|"),
    ("divergence", "mean D_t"),
]


def stability_grid(df: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any]) -> Grid:
    k = manifest["validation"]["k"]
    return metric_grid(
        df,
        status,
        manifest,
        title=f"Stability: validation Avg@{k} at the start, best within T_stop, and at the end",
        columns=STABILITY_COLUMNS,
        notes=[
            "Values in %. final = the last validation (a missing value counts as 0); a "
            "collapse is counted in every cell of its row.",
        ],
    )


def binding_measures(manifest: dict[str, Any]) -> str:
    """'label: metric key' of each method's declared binding measure, in table order."""
    parts = []
    for entry in manifest["methods"].values():
        key = entry.get("binding")
        parts.append(f"{entry['label']}: {key if key else 'none, it never binds'}")
    return "; ".join(parts)


def binding_grid(df: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any]) -> Grid:
    return metric_grid(
        df,
        status,
        manifest,
        title="How much each rule binds (mean over optimizer steps, then over seeds)",
        columns=BINDING_COLUMNS,
        notes=[
            "binds: each rule's own measure of how much it binds, in % ("
            + binding_measures(manifest)
            + "). masked / clipped: terms passing no gradient (PPO clip, DPPO/CPPO mask, TRM's "
            "rejected responses); ratio cap: terms over a rule's ratio_cap; prefix-budget "
            "share: CPPO's masks from the budget, not the token threshold; D_t: the divergence "
            "the run computes (its method's, else the logged one).",
        ],
        digits=3,
    )


def posthoc_grid(df: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any]) -> Grid:
    """Rows: (model, method); columns: (checkpoint, benchmark) of the post-hoc evaluation."""
    ev = manifest["evaluation"]
    stats = summarize(
        df, status.iloc[0:0], manifest, ["model", "method", "checkpoint", "benchmark"]
    )
    benches = list(ev["benchmarks"]) + (["mean"] if len(ev["benchmarks"]) > 1 else [])
    cols = [(c, b) for c in ev["checkpoints"] for b in benches]
    rows, bold = [], []
    for model in manifest["models"]:
        for meth in manifest["methods"]:
            row = [manifest["models"][model]["label"], manifest["methods"][meth]["label"]]
            row += [fmt_cell(stats.get((model, meth, c, b))) for c, b in cols]
            rows.append(row)
            bold.append([False] * len(row))

    def label(b: str) -> str:
        return "mean" if b == "mean" else manifest["benchmarks"][b]["label"]

    grid = Grid(
        title=f"Post-hoc Avg@{ev['k']} of the selected checkpoints",
        header=["Model", "Method", *(f"{c}: {label(b)}" for c, b in cols)],
        rows=rows,
        bold=bold,
        notes=[_seed_note(manifest), "best = best in-loop validation mean within [0, T_stop]."],
    )
    grid.n_label_cols = 2
    return grid


def paper_diff(
    t1: pd.DataFrame, t4: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any]
) -> pd.DataFrame:
    """Reproduced (mean over seeds) vs reported, per model, method and benchmark."""
    reported = pd.concat([paper_table("table1"), paper_table("table4")], ignore_index=True)
    ours = {
        **summarize(t1, status, manifest, ["model", "method", "benchmark"]),
        **summarize(t4, status, manifest, ["model", "method", "benchmark"]),
    }
    rows = []
    for r in reported.itertuples(index=False):
        if r.model not in manifest["models"] or r.method not in manifest["methods"]:
            continue
        st = ours.get((r.model, r.method, r.benchmark))
        rep = float(r.value) if r.status == "ok" else math.nan
        repro = st.mean if st is not None and not st.collapsed else math.nan
        rows.append(
            {
                "model": r.model,
                "method": r.method,
                "benchmark": r.benchmark,
                "reported": rep,
                "reported_status": r.status,
                "reproduced": repro,
                "half_width": st.half_width if st is not None else math.nan,
                "n_seeds": st.n if st is not None else 0,
                "reproduced_status": "missing"
                if st is None
                else ("collapse" if st.collapsed else "ok"),
                "diff": repro - rep,
            }
        )
    return pd.DataFrame(rows)


def paper_diff_grid(diff: pd.DataFrame, manifest: dict[str, Any]) -> Grid:
    rows, bold = [], []
    for r in diff.itertuples(index=False):
        rep = "collapse" if r.reported_status == "collapse" else f"{r.reported:.2f}"
        if r.reproduced_status == "ok":
            ours = f"{r.reproduced:.2f}"
            if not math.isnan(r.half_width):
                ours += f" ± {r.half_width:.2f}"
        else:
            ours = r.reproduced_status
        d = "–" if math.isnan(r.diff) else f"{r.diff:+.2f}"
        rows.append(
            [
                manifest["models"][r.model]["label"],
                manifest["methods"][r.method]["label"],
                r.benchmark,
                rep,
                ours,
                d,
            ]
        )
        bold.append([False] * 6)
    grid = Grid(
        title="Reproduced vs reported (paper Tables 1 and 4)",
        header=["Model", "Method", "Benchmark", "Reported", "Reproduced", "Diff"],
        rows=rows,
        bold=bold,
        notes=[_seed_note(manifest), "mean = best AIME24/25/26 mean within [0, T_stop] (Table 1)."],
    )
    grid.n_label_cols = 3
    return grid


def write_grid(grid: Grid, prefix: str | Path) -> list[Path]:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext, text in (("md", grid.markdown()), ("tex", grid.latex()), ("html", grid.html())):
        path = prefix.with_name(f"{prefix.name}.{ext}")
        path.write_text(text)
        out.append(path)
    return out


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"model": str, "method": str, "benchmark": str})


@dataclass(frozen=True)
class Table:
    """A rendered table: its grid from tables/<name>.csv (and run_status.csv), its report
    caption, and whether a results directory has it (from the manifest)."""

    grid: Callable[[pd.DataFrame, pd.DataFrame, dict[str, Any]], Grid]
    caption: str
    shown: Callable[[dict[str, Any]], bool] = lambda manifest: True


# The tables of a results directory, in report order: the one list of table names (the
# workflow's aggregate and render jobs and the summary read it from here). Each is the CSV of
# the same name written by the aggregate step (cppo.pipeline.aggregate.collect).
TABLES: dict[str, Table] = {
    "table1": Table(
        table1_grid,
        "Table 1: best validation mean Avg@k within [0, T_stop] per model (columns) and method "
        "(rows), mean and 95% t-interval over seeds. Bold marks the best method of a column only "
        "where its interval does not overlap the runner-up's; collapsed runs (config `collapse`) "
        "are counted in their cell.",
    ),
    "table4": Table(
        table4_grid,
        "Table 4: per-benchmark validation Avg@k at each run's best-mean checkpoint.",
    ),
    "stability": Table(
        stability_grid,
        "Stability: per model and method, the validation mean at the start, the best within "
        "T_stop, the gain, the last validation, the mean of the last two and the net change "
        "(mean and 95% t-interval over seeds).",
    ),
    "binding": Table(
        binding_grid,
        "How much each rule binds: each rule's own measure (the diagnostic it declares: a "
        "masked or clipped share of terms, capped importance weights, rejected responses, a "
        "gate's damping), the masked share of terms, a ratio cap's share, CPPO's prefix-budget "
        "share of its masks, mean abs(rho - 1) and the mean divergence D_t, averaged over "
        "optimizer steps, then over seeds.",
    ),
    "posthoc": Table(
        posthoc_grid,
        "Independent post-hoc Avg@k (python -m evaluation, fresh sampling seed) of the "
        "best-within-T_stop and the final checkpoint of every run.",
        shown=lambda manifest: bool(manifest["evaluation"]["checkpoints"]),
    ),
    "paper_diff": Table(
        lambda diff, status, manifest: paper_diff_grid(diff, manifest),
        "Reproduced versus reported: the paper's Tables 1 and 4 beside this run's numbers and "
        "their difference (reproduced minus reported, percentage points).",
        shown=lambda manifest: bool(manifest["paper_comparison"]),
    ),
}


def table_names(manifest: dict[str, Any]) -> list[str]:
    return [name for name, table in TABLES.items() if table.shown(manifest)]


def render(manifest: dict[str, Any], tables_dir: str | Path, name: str) -> list[Path]:
    """Render tables/<name>.csv (with run_status.csv) to <name>.md/.tex/.html."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}")
    tables_dir = Path(tables_dir)
    status = _read(tables_dir / "run_status.csv")
    df = _read(tables_dir / f"{name}.csv")
    return write_grid(TABLES[name].grid(df, status, manifest), tables_dir / name)

"""Rendering of the long-form CSVs as the paper's tables (Markdown, LaTeX, HTML).

Cells show the mean over seeds; with two or more seeds, "mean ± h" where h is the half-width of
a 95% Student-t interval over seeds (h = t_{0.975, n-1} * sd / sqrt(n)). The best mean of each
column is bold. A run that collapsed (non-finite training metrics) inside [0, T_stop] shows as
"collapse (it. N)" like the paper's CISPO 30B entry; when only some seeds collapsed, the cell
averages the others and says how many collapsed.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cppo.pipeline.paper import paper_table

# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (standard tables).
T975 = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
]  # fmt: skip


def t975(df: int) -> float:
    if df < 1:
        return math.nan
    return T975[df - 1] if df <= len(T975) else 1.96


@dataclass
class Stat:
    mean: float
    half_width: float  # NaN with one seed
    n: int
    n_collapsed: int = 0
    collapse_iter: int | None = None

    @property
    def collapsed(self) -> bool:
        return self.n == 0 and self.n_collapsed > 0


def seed_stat(values: list[float]) -> tuple[float, float]:
    """Mean and 95% t half-width of a list of per-seed values (half-width NaN for n < 2)."""
    vals = [v for v in values if not math.isnan(v)]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan
    mean = sum(vals) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


def fmt_cell(stat: Stat | None, *, digits: int = 2) -> str:
    if stat is None:
        return "–"
    if stat.collapsed:
        return f"collapse (it. {stat.collapse_iter})"
    if math.isnan(stat.mean):
        return "–"
    text = f"{stat.mean:.{digits}f}"
    if not math.isnan(stat.half_width):
        text += f" ± {stat.half_width:.{digits}f}"
    if stat.n_collapsed:
        text += f" ({stat.n_collapsed} collapsed)"
    return text


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
    """Per group of `by` (must include model and method): a Stat over seeds."""
    collapsed = _collapsed_runs(status, manifest)
    stats: dict[tuple, Stat] = {}
    seeds = [int(s) for s in manifest["seeds"]]
    groups = df.groupby(by, sort=False) if len(df) else []
    seen: set[tuple] = set()
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        seen.add(key)
        info = dict(zip(by, key, strict=True))
        ok = [
            float(r.value)
            for r in group.itertuples(index=False)
            if (info["model"], info["method"], int(r.seed)) not in collapsed
        ]
        n_col = sum((info["model"], info["method"], s) in collapsed for s in seeds)
        its = [
            collapsed[(info["model"], info["method"], s)]
            for s in seeds
            if (info["model"], info["method"], s) in collapsed
        ]
        mean, hw = seed_stat(ok)
        stats[key] = Stat(mean, hw, len(ok), n_col, min(its) if its else None)
    return stats


def _best_by_column(cells: dict[tuple, Stat], col_index: int) -> dict[Any, float]:
    best: dict[Any, float] = {}
    for key, stat in cells.items():
        if stat.collapsed or math.isnan(stat.mean):
            continue
        col = key[col_index]
        best[col] = max(best.get(col, -math.inf), stat.mean)
    return best


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
        return f"One seed ({manifest['seeds'][0]}); values in %."
    return f"Mean ± 95% t-interval half-width over {n} seeds; values in %."


def _model_header(manifest: dict[str, Any], model: str) -> str:
    entry = manifest["models"][model]
    label = entry["label"]
    if entry.get("stands_for"):
        label += f" (≈ {entry['stands_for']})"
    return label


def table1_grid(df: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any]) -> Grid:
    """Rows: methods; columns: models; cell: best validation mean within [0, T_stop]."""
    stats = summarize(df, status, manifest, ["model", "method"])
    models, methods = list(manifest["models"]), list(manifest["methods"])
    best = _best_by_column(stats, 0)
    rows, bold = [], []
    for meth in methods:
        row, brow = [manifest["methods"][meth]["label"]], [False]
        for model in models:
            st = stats.get((model, meth))
            row.append(fmt_cell(st))
            brow.append(st is not None and not st.collapsed and st.mean == best.get(model))
        rows.append(row)
        bold.append(brow)
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
        bold=bold,
        notes=[_seed_note(manifest), f"T_stop (iterations): {tstops}."],
    )


def table4_grid(df: pd.DataFrame, status: pd.DataFrame, manifest: dict[str, Any]) -> Grid:
    """Rows: (model, method); columns: validation benchmarks at the best-mean checkpoint."""
    stats = summarize(df, status, manifest, ["model", "method", "benchmark"])
    benches = list(manifest["validation"]["benchmarks"])
    rows, bold = [], []
    for model in manifest["models"]:
        best: dict[str, float] = {}
        for (mo, _, b), st in stats.items():
            if mo == model and not st.collapsed and not math.isnan(st.mean):
                best[b] = max(best.get(b, -math.inf), st.mean)
        for meth in manifest["methods"]:
            row = [manifest["models"][model]["label"], manifest["methods"][meth]["label"]]
            brow = [False, False]
            for b in benches:
                st = stats.get((model, meth, b))
                row.append(fmt_cell(st))
                brow.append(st is not None and not st.collapsed and st.mean == best.get(b))
            rows.append(row)
            bold.append(brow)
    grid = Grid(
        title="Table 4: per-benchmark validation Avg@k at the best-mean checkpoint",
        header=["Model", "Method", *(manifest["benchmarks"][b]["label"] for b in benches)],
        rows=rows,
        bold=bold,
        notes=[_seed_note(manifest)],
    )
    grid.n_label_cols = 2
    return grid


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


def render(manifest: dict[str, Any], tables_dir: str | Path, name: str) -> list[Path]:
    """Render tables/<name>.csv (with run_status.csv) to <name>.md/.tex/.html."""
    tables_dir = Path(tables_dir)
    status = _read(tables_dir / "run_status.csv")
    df = _read(tables_dir / f"{name}.csv")
    if name == "table1":
        grid = table1_grid(df, status, manifest)
    elif name == "table4":
        grid = table4_grid(df, status, manifest)
    elif name == "posthoc":
        grid = posthoc_grid(df, status, manifest)
    elif name == "paper_diff":
        grid = paper_diff_grid(df, manifest)
    else:
        raise ValueError(f"unknown table {name!r}")
    return write_grid(grid, tables_dir / name)

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
import re
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cppo.pipeline.layout import seeds_of
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
    groups = df.groupby(by, sort=False) if len(df) else []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        info = dict(zip(by, key, strict=True))
        seeds = seeds_of(manifest, info["model"])
        its = [
            collapsed[(info["model"], info["method"], s)]
            for s in seeds
            if (info["model"], info["method"], s) in collapsed
        ]
        values = [float(v) for v in group["value"] if not math.isnan(float(v))]
        mean, hw = seed_stat(values)
        stats[key] = Stat(mean, hw, len(values), len(its), min(its) if its else None, len(seeds))
    return stats


# The preamble a .tex table needs from the document that \input's it (its first line says so):
# booktabs for the rules, graphicx for \resizebox. Nothing else: the text is ASCII (below).
LATEX_PREAMBLE = r"\usepackage{booktabs,graphicx}"

# The one mapping from a label's characters to LaTeX, applied character by character. It covers
# LaTeX's special characters, those the default OT1 font encoding draws as other glyphs (< > |),
# and the non-ASCII text of the tables and of config labels (Greek letters, math symbols, dashes,
# quotes). A .tex table is then plain ASCII and compiles with pdflatex whatever the including
# document's input and font encodings. Accented Latin letters become accent commands
# (_latex_char); anything else is printed as "?" and named in a comment at the top of the file.
LATEX_CHARS: dict[str, str] = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    # a cell (or a wrapped line) that starts with [ would be read as \\'s optional argument
    "[": "{[}",
    "]": "{]}",
    "\u00a0": "~",
    "–": "--",
    "—": "---",
    "‘": "`",
    "’": "'",
    "“": "``",
    "”": "''",
    "…": r"\ldots{}",
    "ß": r"\ss{}",
    "æ": r"\ae{}",
    "Æ": r"\AE{}",
    "œ": r"\oe{}",
    "Œ": r"\OE{}",
    "ø": r"\o{}",
    "Ø": r"\O{}",
    "ł": r"\l{}",
    "Ł": r"\L{}",
    "±": r"$\pm$",
    "−": "$-$",
    "×": r"$\times$",
    "÷": r"$\div$",
    "·": r"$\cdot$",
    "°": r"$^\circ$",
    "²": "$^2$",
    "³": "$^3$",
    "≈": r"$\approx$",
    "∼": r"$\sim$",
    "≤": r"$\le$",
    "≥": r"$\ge$",
    "≠": r"$\ne$",
    "≪": r"$\ll$",
    "≫": r"$\gg$",
    "∞": r"$\infty$",
    "∈": r"$\in$",
    "∑": r"$\sum$",
    "∏": r"$\prod$",
    "√": r"$\surd$",
    "∝": r"$\propto$",
    "∇": r"$\nabla$",
    "∂": r"$\partial$",
    "→": r"$\rightarrow$",
    "←": r"$\leftarrow$",
    "↔": r"$\leftrightarrow$",
    "⇒": r"$\Rightarrow$",
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "γ": r"$\gamma$",
    "δ": r"$\delta$",
    "ε": r"$\varepsilon$",
    "ϵ": r"$\epsilon$",
    "ζ": r"$\zeta$",
    "η": r"$\eta$",
    "θ": r"$\theta$",
    "ι": r"$\iota$",
    "κ": r"$\kappa$",
    "λ": r"$\lambda$",
    "μ": r"$\mu$",
    "µ": r"$\mu$",
    "ν": r"$\nu$",
    "ξ": r"$\xi$",
    "π": r"$\pi$",
    "ρ": r"$\rho$",
    "σ": r"$\sigma$",
    "ς": r"$\varsigma$",
    "τ": r"$\tau$",
    "υ": r"$\upsilon$",
    "φ": r"$\varphi$",
    "ϕ": r"$\phi$",
    "χ": r"$\chi$",
    "ψ": r"$\psi$",
    "ω": r"$\omega$",
    "Γ": r"$\Gamma$",
    "Δ": r"$\Delta$",
    "Θ": r"$\Theta$",
    "Λ": r"$\Lambda$",
    "Ξ": r"$\Xi$",
    "Π": r"$\Pi$",
    "Σ": r"$\Sigma$",
    "Υ": r"$\Upsilon$",
    "Φ": r"$\Phi$",
    "Ψ": r"$\Psi$",
    "Ω": r"$\Omega$",
}
# combining mark (after Unicode NFD) -> LaTeX text accent command
_LATEX_ACCENTS = {
    "\u0300": "`",
    "\u0301": "'",
    "\u0302": "^",
    "\u0303": "~",
    "\u0304": "=",
    "\u0306": "u",
    "\u0307": ".",
    "\u0308": '"',
    "\u030a": "r",
    "\u030b": "H",
    "\u030c": "v",
    "\u0327": "c",
    "\u0328": "k",
}
# A LaTeX cell or header longer than this many characters is set on several lines (at spaces;
# a value and its "± h" stay together), so that a column of numbers is as wide as its numbers,
# not as its header or a cell's collapse note; label columns (left-aligned) wrap at the second.
LATEX_WRAP = 16
LATEX_WRAP_LABEL = 24


def _latex_char(c: str, unmapped: set[str]) -> str:
    if c in LATEX_CHARS:
        return LATEX_CHARS[c]
    if c.isascii():
        return c
    base, *marks = unicodedata.normalize("NFD", c)
    if base.isascii() and marks and all(m in _LATEX_ACCENTS for m in marks):
        out = base
        for m in marks:
            out = rf"\{_LATEX_ACCENTS[m]}{{{out}}}"
        return out
    unmapped.add(c)
    return "?"


def latex_escape(text: str, unmapped: set[str] | None = None) -> str:
    """`text` as LaTeX (ASCII only): LATEX_CHARS, accents, and "?" for any other character
    (added to `unmapped`)."""
    unmapped = set() if unmapped is None else unmapped
    return "".join(_latex_char(c, unmapped) for c in text)


def _wrap(text: str, width: int) -> list[str]:
    """Greedy word wrap at spaces; "x ± h" is never broken."""
    lines: list[str] = []
    for word in text.replace(" ± ", "\0±\0").split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return [line.replace("\0", " ") for line in lines]


_TABLE_NUMBER = re.compile(r"^Table\s+\d+[A-Za-z]?\s*:\s*")


def _markdown_cell(text: str) -> str:
    """A pipe table's cell: its pipes escaped, nothing else changed."""
    return text.replace("|", r"\|")


@dataclass
class Grid:
    """A rendered table: header row, body rows of cell strings, which cells are bold.

    The title is shown as written in Markdown and HTML; LaTeX numbers a caption itself, so the
    LaTeX caption leaves out a leading "Table N:".
    """

    title: str
    header: list[str]
    rows: list[list[str]]
    bold: list[list[bool]]
    notes: list[str]
    n_label_cols: int = 1

    def markdown(self) -> str:
        def cell(text: str, b: bool) -> str:
            text = _markdown_cell(text)
            return f"**{text}**" if b else text

        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(_markdown_cell(h) for h in self.header) + " |")
        n_num = len(self.header) - self.n_label_cols
        lines.append("|" + "|".join(["---"] * self.n_label_cols + ["---:"] * n_num) + "|")
        for row, bold in zip(self.rows, self.bold, strict=True):
            lines.append(
                "| " + " | ".join(cell(t, b) for t, b in zip(row, bold, strict=True)) + " |"
            )
        lines += [""] + [f"{n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        """A table float to include with \\input: ASCII only, needs LATEX_PREAMBLE; long cells
        are set on several lines, and a table still wider than the line is scaled down to its
        width (never up)."""
        unmapped: set[str] = set()

        def esc(text: str) -> str:
            return latex_escape(text, unmapped)

        def cell(text: str, align: str, b: bool = False, pos: str = "t") -> str:
            width = LATEX_WRAP_LABEL if align == "l" else LATEX_WRAP
            lines = [esc(line) for line in _wrap(text, width)]
            if b:
                lines = [rf"\textbf{{{line}}}" for line in lines]
            if len(lines) == 1:
                return lines[0]
            return (
                rf"\begin{{tabular}}[{pos}]{{@{{}}{align}@{{}}}}"
                + r" \\ ".join(lines)
                + r"\end{tabular}"
            )

        aligns = ["l"] * self.n_label_cols + ["r"] * (len(self.header) - self.n_label_cols)
        body = [
            " & ".join(cell(h, a, pos="b") for h, a in zip(self.header, aligns, strict=True))
            + r" \\",
            r"\midrule",
        ]
        for row, bold in zip(self.rows, self.bold, strict=True):
            cells = (cell(t, a, b) for t, a, b in zip(row, aligns, bold, strict=True))
            body.append(" & ".join(cells) + r" \\")
        out = [r"\begin{table}[t]", r"\centering"]
        out.append(rf"\caption{{{esc(_TABLE_NUMBER.sub('', self.title))}}}")
        out += [
            r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
            rf"\begin{{tabular}}{{{''.join(aligns)}}}",
            r"\toprule",
            *body,
            r"\bottomrule",
            r"\end{tabular}}",
        ]
        for note in self.notes:
            out.append(rf"\par\small {esc(note)}")
        out.append(r"\end{table}")
        head = [
            f"% requires {LATEX_PREAMBLE} (booktabs: the rules; graphicx: \\resizebox, which "
            "shrinks a table wider than the line to the line width)"
        ]
        if unmapped:
            names = ", ".join(
                f"U+{ord(c):04X} {unicodedata.name(c, '')}".rstrip() for c in sorted(unmapped)
            )
            head.append(f"% characters with no LaTeX mapping, printed as ?: {names}")
            warnings.warn(
                f"LaTeX table {self.title!r}: no LaTeX mapping for {names} (printed as ?); "
                "add them to cppo.pipeline.tables.LATEX_CHARS",
                stacklevel=2,
            )
        return "\n".join(head + out) + "\n"

    def html(self) -> str:
        def cell(text: str, b: bool) -> str:
            t = html.escape(text)
            return f"<td><b>{t}</b></td>" if b else f"<td>{t}</td>"

        # label columns are left-aligned, numbers right-aligned (as in Markdown and LaTeX)
        k = self.n_label_cols
        labels = (
            "td:first-child,th:first-child"
            if k == 1
            else f"td:nth-child(-n+{k}),th:nth-child(-n+{k})"
        )
        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            "<style>table{border-collapse:collapse;font-family:sans-serif}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
            f"{labels}{{text-align:left}}</style></head><body>",
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
    counts = {m: len(seeds_of(manifest, m)) for m in manifest["models"]}
    if set(counts.values()) == {1}:
        seeds = sorted({seeds_of(manifest, m)[0] for m in counts})
        return f"One seed ({', '.join(map(str, seeds))}): no interval, no ranking; values in %."
    if len(set(counts.values())) == 1:
        over = f"n = {next(iter(counts.values()))} seeds"
    else:
        over = (
            "n seeds per column ("
            + ", ".join(f"{manifest['models'][m]['label']}: {n}" for m, n in counts.items())
            + ")"
        )
    return (
        f"Mean ± half-width of the 95% Student-t interval over {over} (a cell with "
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
    ("mean", "mean in (0, T_stop]"),
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

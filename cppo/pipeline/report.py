"""The Markdown summary of a results directory (results/<profile>/summary.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from cppo.pipeline.layout import seeds_of


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def _status_lines(status: pd.DataFrame) -> list[str]:
    lines = []
    for row in status.itertuples(index=False):
        problems = []
        if not bool(row.done):
            problems.append("not finished")
        if int(row.n_validations or 0) == 0:
            problems.append("no validation records")
        if not pd.isna(row.collapse_step):
            problems.append(f"collapsed at step {int(row.collapse_step)} (config `collapse`)")
        if problems:
            lines.append(f"- {row.model} / {row.method} / seed {row.seed}: {', '.join(problems)}")
    return lines


def write_summary(
    manifest: dict[str, Any], tables: list[str], figures: list[str], out: str | Path
) -> Path:
    """tables/figures: the table names (tables/<name>.md) and figure names (figures/<name>.png)."""
    out = Path(out)
    root = Path(manifest["results_dir"])
    lines = [f"# {manifest['title']}", ""]
    if manifest.get("description"):
        lines += [manifest["description"].strip(), ""]
    models = ", ".join(
        f"{m['label']} (seeds {', '.join(map(str, seeds_of(manifest, name)))})"
        for name, m in manifest["models"].items()
    )
    methods = ", ".join(m["label"] for m in manifest["methods"].values())
    lines += [
        f"- models: {models}",
        f"- methods: {methods}",
        f"- runs: {len(manifest['runs'])}",
        f"- validation: {', '.join(manifest['validation']['benchmarks'])}, "
        f"Avg@{manifest['validation']['k']} every {manifest['validation']['every']} iterations",
        "",
    ]
    status_path = root / "tables" / "run_status.csv"
    if status_path.exists():
        problems = _status_lines(pd.read_csv(status_path))
        if problems:
            lines += ["## Runs needing attention", "", *problems, ""]
    lines += ["## Tables", ""]
    for name in tables:
        md = root / "tables" / f"{name}.md"
        if md.exists():
            lines += [md.read_text().strip(), ""]
            lines += [
                f"(CSV: `{_rel(root / 'tables' / (name + '.csv'), out.parent)}`, LaTeX: "
                f"`{_rel(root / 'tables' / (name + '.tex'), out.parent)}`)",
                "",
            ]
    lines += ["## Figures", ""]
    for name in figures:
        png = root / "figures" / f"{name}.png"
        lines += [f"![{name}]({_rel(png, out.parent)})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out

"""The rendered tables as their readers see them: the Markdown parsed as tables, every .tex
compiled by pdflatex, every .html parsed and drawn by headless Chromium.

The grids carry the labels of the real configs (config/*.yaml and the methods catalogue): Greek
letters, math symbols, underscores, long model headers, plus one label with a pipe and the other
characters a config label may hold. pdflatex and Chromium are optional: the tests that need them
skip where they are not installed (.ci/run installs both).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_pipeline_aggregate import A_VALS, config, train_recs, write_run

from cppo.pipeline import aggregate, report, tables
from cppo.pipeline.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
PDFLATEX = shutil.which("pdflatex")
CHROMIUM = next(
    (p for p in ("/usr/bin/chromium", shutil.which("chromium")) if p and Path(p).exists()), None
)
needs_pdflatex = pytest.mark.skipif(
    PDFLATEX is None,
    reason="pdflatex not installed (Debian: apt-get install texlive-latex-base "
    "texlive-latex-recommended)",
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (Debian: apt-get install chromium)"
)

# A label no config holds yet but any may: a pipe, the math a rule's parameters are written in
# and LaTeX's special characters.
EXTRA_LABEL = "clip |ρ − 1| ≤ ε, μ/π/σ/τ → ∞ (× 2, ≥ 1, ≠ 0) 100% & #1 {x}^2 ~ <a> $5"
LATEX_SPECIALS = set("\\&%$#_{}~^|<>")
# the widest a table may overflow the text width of the wrapper's article class (rounding)
OVERFULL_TOLERANCE_PT = 1.0


def config_labels() -> tuple[list[dict], list[str]]:
    """The model entries (label, stands_for) and method labels of every file in config/."""
    models, methods = [], []
    for path in sorted((ROOT / "config").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        for entry in (cfg.get("models") or {}).values():
            if isinstance(entry, dict) and entry.get("label"):
                models.append({k: entry[k] for k in ("label", "stands_for") if k in entry})
        for entry in (cfg.get("methods") or {}).values():
            if isinstance(entry, dict) and entry.get("label"):
                methods.append(entry["label"])
    return models, list(dict.fromkeys(methods))


def awkward(label: str) -> bool:
    return not label.isascii() or bool(LATEX_SPECIALS & set(label))


def awkward_labels() -> tuple[list[dict], list[str]]:
    """Two model entries (the longest headers) and the method labels with characters that need
    escaping, the two longest ones and EXTRA_LABEL."""
    models, methods = config_labels()

    def header(m):
        return len(m["label"]) + len(m.get("stands_for", ""))

    unique = {(m["label"], m.get("stands_for")): m for m in models}
    models = sorted(unique.values(), key=header, reverse=True)[:2]
    chosen = [m for m in methods if awkward(m)] + sorted(methods, key=len, reverse=True)[:2]
    return models, list(dict.fromkeys([*chosen, EXTRA_LABEL]))


def _build_results(root: Path) -> tuple[dict, dict[str, pd.DataFrame]]:
    """tests/test_pipeline_aggregate.py's synthetic run matrix (model m, methods a and b, three
    seeds, one collapse), aggregated; run from `root` (the manifest's paths are relative)."""
    plan = Plan(config())
    toy = root / plan.matrix.toy_data_dir
    toy.mkdir(parents=True)
    for name, n in (("val", 5), ("test", 3)):
        (toy / f"{name}.jsonl").write_text(
            "".join(json.dumps({"id": str(i)}) + "\n" for i in range(n))
        )
    for seed, vals in A_VALS.items():
        write_run(Path(plan.matrix.run_dir("m", "a", seed)), vals, train_recs())
    for seed in (0, 1, 2):
        vals = {s: (0.2 + 0.01 * seed, 0.2) for s in (0, 2, 4, 6, 8)}
        vals[4] = (0.6 + 0.08 * seed, 0.4)
        write_run(
            Path(plan.matrix.run_dir("m", "b", seed)),
            vals,
            train_recs(broken_from=3 if seed == 2 else None),
        )
    manifest = plan.manifest()
    Path(plan.matrix.manifest_path).parent.mkdir(parents=True, exist_ok=True)
    Path(plan.matrix.manifest_path).write_text(json.dumps(manifest))
    frames = aggregate.collect(manifest)
    return manifest, frames


def _relabel(manifest: dict, frames: dict[str, pd.DataFrame]) -> tuple[dict, dict]:
    """The manifest and frames with the awkward labels: two models, one method per label, each
    (model, method) a copy of the data of method a or b (so some cells carry collapse notes)."""
    models, labels = awkward_labels()
    man = json.loads(json.dumps(manifest))
    base_model = man["models"]["m"]
    man["models"] = {f"m{i}": {**base_model, **entry} for i, entry in enumerate(models)}
    source = {f"x{i}": "ab"[i % 2] for i in range(len(labels))}
    man["methods"] = {
        key: {**manifest["methods"][source[key]], "label": label}
        for key, label in zip(source, labels, strict=True)
    }
    out = {}
    for name, df in frames.items():
        if "model" not in df.columns:
            out[name] = df
            continue
        parts = []
        for model in man["models"]:
            for key, src in source.items():
                part = df[(df.model == "m") & (df.method == src)].copy()
                part["model"], part["method"] = model, key
                parts.append(part)
        out[name] = pd.concat(parts, ignore_index=True)
    # a post-hoc evaluation of both checkpoints (the synthetic runs have none)
    t4 = out["table4"]
    out["posthoc"] = pd.concat(
        [t4[t4.benchmark == "test"].assign(checkpoint=c) for c in ("best", "final")],
        ignore_index=True,
    )
    return man, out


def _paper_diff(man: dict) -> pd.DataFrame:
    rows = []
    for i, (model, meth) in enumerate((mo, me) for mo in man["models"] for me in man["methods"]):
        for bench in ("aime24", "mean"):
            collapsed = i % 5 == 4
            rows.append(
                {
                    "model": model,
                    "method": meth,
                    "benchmark": bench,
                    "reported": float("nan") if collapsed else 30.0 + i,
                    "reported_status": "collapse" if collapsed else "ok",
                    "reproduced": 31.5 + i,
                    "half_width": 1.25,
                    "n_seeds": 3,
                    "reproduced_status": "ok",
                    "diff": float("nan") if collapsed else 1.5,
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """name -> {"grid", "md", "tex", "html": paths} for every table of tables.TABLES, written
    to <results>/tables/<name>.* as the pipeline writes them, and the summary.md that embeds
    them."""
    root = tmp_path_factory.mktemp("rendering")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        manifest, frames = _build_results(root)
    man, frames = _relabel(manifest, frames)
    man["results_dir"] = str(root / "results")
    status = frames["run_status"]
    out: dict = {}
    for name, table in tables.TABLES.items():
        df = _paper_diff(man) if name == "paper_diff" else frames[name]
        grid = table.grid(df, status, man)
        md, tex, htm = tables.write_grid(grid, root / "results" / "tables" / name)
        out[name] = {"grid": grid, "md": md, "tex": tex, "html": htm}
    out["summary"] = report.write_summary(man, list(tables.TABLES), [], root / "summary.md")
    return out


def test_the_grids_carry_the_awkward_labels(rendered):
    grid = rendered["binding"]["grid"]
    labels = {row[1] for row in grid.rows}
    assert EXTRA_LABEL in labels
    assert any(not label.isascii() for label in labels - {EXTRA_LABEL}), "no config label"
    assert any("(collapse" in c or "collapse," in c for row in grid.rows for c in row)
    assert "mean |ρ − 1|" in grid.header
    assert "≈" in rendered["table1"]["grid"].header[1]
    assert all(len(r["grid"].rows) >= 2 for n, r in rendered.items() if n != "summary")


# -- Markdown ------------------------------------------------------------------------------------

UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The pipe tables of a Markdown text: each a list of rows of cells, split on unescaped
    pipes (the delimiter row included)."""
    found, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = UNESCAPED_PIPE.split(line.strip())
            assert cells[0] == "" and cells[-1] == "", f"a row must start and end with |: {line!r}"
            row = [c.strip() for c in cells[1:-1]]
            if current is None:
                current = []
                found.append(current)
            current.append(row)
        else:
            current = None
    return found


def check_markdown_table(rows: list[list[str]], n_cols: int, where: str) -> None:
    header, delimiter, *body = rows
    assert len(header) == n_cols, f"{where}: header has {len(header)} cells, not {n_cols}"
    assert all(re.fullmatch(r":?-{3,}:?", c) for c in delimiter), f"{where}: {delimiter}"
    assert len(delimiter) == n_cols, f"{where}: delimiter row has {len(delimiter)} cells"
    for row in body:
        assert len(row) == n_cols, f"{where}: {len(row)} cells, not {n_cols}: {row}"


@pytest.mark.parametrize("name", list(tables.TABLES))
def test_markdown_rows_have_as_many_cells_as_the_header(rendered, name):
    grid = rendered[name]["grid"]
    found = markdown_tables(rendered[name]["md"].read_text())
    assert len(found) == 1
    check_markdown_table(found[0], len(grid.header), name)
    assert len(found[0]) == 2 + len(grid.rows)
    # the cells read back as the grid's text (the pipes unescaped)
    assert [c.replace("\\|", "|") for c in found[0][0]] == grid.header


def test_summary_embeds_valid_markdown_tables(rendered):
    text = rendered["summary"].read_text()
    found = markdown_tables(text)
    assert len(found) == len(tables.TABLES)
    for name, rows in zip(tables.TABLES, found, strict=True):
        check_markdown_table(rows, len(rendered[name]["grid"].header), f"summary.md, {name}")


def test_a_markdown_parser_reads_every_table(rendered):
    """markdown-it (CommonMark with GFM tables) makes a table of each: a header row whose cell
    count differs from the delimiter row's is no table at all in GFM."""
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark").enable("table")
    page = Page.parse(md.render(rendered["summary"].read_text()))
    assert len(page.tables) == len(tables.TABLES)
    for name, table in zip(tables.TABLES, page.tables, strict=True):
        grid = rendered[name]["grid"]
        assert table[0] == grid.header, name
        assert [len(r) for r in table] == [len(grid.header)] * (1 + len(grid.rows)), name


def test_markdown_without_pipes_is_unchanged():
    """Escaping touches the pipes only: a table without them renders as it always did."""
    grid = tables.Grid(
        title="T",
        header=["Model", "a_b ≈ 1"],
        rows=[["x *y*", "1.00 ± 0.50"]],
        bold=[[False, True]],
        notes=["note | with a pipe outside the table"],
    )
    assert grid.markdown() == (
        "**T**\n\n| Model | a_b ≈ 1 |\n|---|---:|\n| x *y* | **1.00 ± 0.50** |\n\n"
        "note | with a pipe outside the table\n"
    )
    grid.header[1] = "|ρ − 1|"
    assert "| Model | \\|ρ − 1\\| |" in grid.markdown()


# -- LaTeX ---------------------------------------------------------------------------------------

REQUIRES = re.compile(r"^% requires (\\usepackage\{[a-z,]+\})")


def latex_requirements(tex: str) -> str | None:
    """The preamble line a .tex file asks for in its first line's comment."""
    m = REQUIRES.match(tex)
    return m.group(1) if m else None


def test_latex_is_ascii_and_states_its_packages(rendered):
    for name in tables.TABLES:
        tex = rendered[name]["tex"].read_text()
        bad = sorted({f"{c!r} (U+{ord(c):04X})" for c in tex if not c.isascii()})
        assert not bad, f"{name}.tex: characters with no LaTeX mapping: {', '.join(bad)}"
        assert latex_requirements(tex) == r"\usepackage{booktabs,graphicx}", (
            f"{name}.tex: the first line must say what the including document loads"
        )


def test_latex_caption_does_not_repeat_the_table_number(rendered):
    tex = rendered["table1"]["tex"].read_text()
    caption = re.search(r"\\caption\{(.*)\}", tex).group(1)
    assert not re.match(r"Table\s*\d+\s*:", caption), caption
    assert caption.startswith("best ")
    assert rendered["table1"]["grid"].title.startswith("Table 1: best ")
    assert "<h3>Table 1: best " in rendered["table1"]["html"].read_text()
    assert rendered["table1"]["md"].read_text().startswith("**Table 1: best ")


def compile_latex(tex_path: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    """pdflatex on a minimal article that loads what the .tex asks for (booktabs where it does
    not say) and inputs it."""
    tex = tex_path.read_text()
    (tmp_path / "table.tex").write_text(tex)
    doc = tmp_path / "doc.tex"
    doc.write_text(
        "\\documentclass{article}\n"
        + (latex_requirements(tex) or "\\usepackage{booktabs}")
        + "\n\\begin{document}\n\\input{table}\n\\end{document}\n"
    )
    proc = subprocess.run(
        [PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", doc.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
    )
    log = (tmp_path / "doc.log").read_text(errors="replace")
    return proc, log


def overfull_hboxes(log: str) -> list[float]:
    """The overflow in pt of each 'Overfull \\hbox (X pt too wide)' of a pdflatex log."""
    return [float(x) for x in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]


@needs_pdflatex
@pytest.mark.parametrize("name", list(tables.TABLES))
def test_latex_compiles_and_fits_the_text_width(rendered, name, tmp_path):
    proc, log = compile_latex(rendered[name]["tex"], tmp_path)
    errors = [ln for ln in log.splitlines() if ln.startswith("!")]
    assert proc.returncode == 0 and (tmp_path / "doc.pdf").exists(), (
        f"{name}.tex does not compile: {errors[:3]}\n{log[-1500:]}"
    )
    too_wide = [pt for pt in overfull_hboxes(log) if pt > OVERFULL_TOLERANCE_PT]
    assert not too_wide, f"{name}.tex: Overfull \\hbox, {too_wide} pt too wide"


@needs_pdflatex
def test_every_latex_character_mapping_compiles(tmp_path):
    """Each entry of the mapping table is valid LaTeX in text and inside \\textbf."""
    chars = "".join(tables.LATEX_CHARS)
    grid = tables.Grid(
        title="Table 9: every mapped character",
        header=["Label", *chars[:4]],
        rows=[[chars, *chars[4:8]], ["[ours] a label", "[1]", "[2]", "[3]", "[4]"]],
        bold=[[False, True, False, True, False], [False] * 5],
        notes=[chars],
    )
    path = tmp_path / "chars.tex"
    path.write_text(grid.latex())
    assert path.read_text().isascii()
    proc, log = compile_latex(path, tmp_path)
    assert proc.returncode == 0, [ln for ln in log.splitlines() if ln.startswith("!")][:3]


def test_unmapped_characters_are_named_not_passed_through():
    """A character outside the mapping table never reaches pdflatex as raw UTF-8: accented
    letters become accent commands, anything else '?' and a comment at the top names it."""
    grid = tables.Grid("t", ["Méthode", "中"], [["Čech", "x"]], [[False, False]], [])
    with pytest.warns(UserWarning, match="U\\+4E2D"):
        tex = grid.latex()
    assert tex.isascii()
    assert r"M\'{e}thode" in tex and r"\v{C}ech" in tex
    assert r"M\'{e}thode & ? \\" in tex
    assert "U+4E2D" in tex.splitlines()[1] and tex.splitlines()[1].startswith("%")


# -- HTML in a browser ---------------------------------------------------------------------------


class Page(HTMLParser):
    """The tables of an HTML page: each a list of rows of cell texts."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    @classmethod
    def parse(cls, text: str) -> Page:
        page = cls()
        page.feed(text)
        return page

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120)


def check_screenshot(png: Path) -> None:
    from PIL import Image

    assert png.exists() and png.stat().st_size > 0, "no screenshot"
    with Image.open(png) as im:
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 1, f"{png.name} is blank"


# appended to a copy of a table's page: the text-align Chromium computes for every cell, as
# JSON in a <pre> that --dump-dom then prints
ALIGNMENT_PROBE = """<script>
const rows = [...document.querySelectorAll("tr")].map(
  (tr) => [...tr.children].map((c) => getComputedStyle(c).textAlign));
const pre = document.createElement("pre");
pre.id = "alignment";
pre.textContent = JSON.stringify(rows);
document.body.appendChild(pre);
</script>"""


@needs_chromium
@pytest.mark.parametrize("name", list(tables.TABLES))
def test_html_table_as_the_browser_parses_it(rendered, name, tmp_path):
    """Chromium's DOM after parsing: one table, the header and every row with one cell per
    column, the labels as written; label columns left-aligned and numbers right-aligned as
    the browser computes them; and a screenshot that is not blank."""
    grid = rendered[name]["grid"]
    probe = tmp_path / f"{name}.html"
    probe.write_text(
        rendered[name]["html"].read_text().replace("</body>", ALIGNMENT_PROBE + "</body>")
    )
    proc = chromium("--dump-dom", probe.as_uri(), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = Page.parse(proc.stdout)
    assert len(page.tables) == 1
    table = page.tables[0]
    assert table[0] == grid.header
    assert [r[: grid.n_label_cols] for r in table[1:]] == [
        r[: grid.n_label_cols] for r in grid.rows
    ]
    assert [len(r) for r in table] == [len(grid.header)] * (1 + len(grid.rows))
    m = re.search(r'<pre id="alignment">(.*?)</pre>', proc.stdout, re.S)
    assert m, "the alignment probe did not run"
    k, n = grid.n_label_cols, len(grid.header)
    expected = ["left"] * k + ["right"] * (n - k)
    for i, row in enumerate(json.loads(html.unescape(m.group(1)))):
        assert row == expected, f"{name}: row {i} aligned {row}, not {expected}"
    png = tmp_path / f"{name}.png"
    url = rendered[name]["html"].as_uri()
    chromium(f"--screenshot={png}", "--window-size=1400,900", url, tmp_path=tmp_path)
    check_screenshot(png)


@needs_chromium
def test_summary_as_html_in_the_browser(rendered, tmp_path):
    """summary.md as a Markdown viewer shows it (markdown-it, GFM tables), drawn by Chromium:
    every table is a table with one cell per column in every row."""
    markdown_it = pytest.importorskip("markdown_it")
    body = (
        markdown_it.MarkdownIt("commonmark").enable("table").render(rendered["summary"].read_text())
    )
    page = tmp_path / "summary.html"
    page.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{body}</body></html>"
    )
    proc = chromium("--dump-dom", page.as_uri(), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = Page.parse(proc.stdout).tables
    assert len(found) == len(tables.TABLES)
    for name, table in zip(tables.TABLES, found, strict=True):
        n = len(rendered[name]["grid"].header)
        assert {len(r) for r in table} == {n}, name
    png = tmp_path / "summary.png"
    chromium(f"--screenshot={png}", "--window-size=1400,900", page.as_uri(), tmp_path=tmp_path)
    check_screenshot(png)

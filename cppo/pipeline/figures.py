"""The paper's figures from the run directories (matplotlib, PNG + PDF).

x axes are in iterations (the paper's "training step" = one rollout batch); the trainer logs
optimizer steps, divided here by the model's updates per iteration. Each method keeps one colour
in every figure (the manifest's colour map). With several seeds a line is the mean over seeds
and the shaded band its 95% Student-t interval (cppo.pipeline.stats).

Which figures a results directory has, and what each shows, is figure_specs (Fig. 4, 2, 7, the
rule-binding figure, Fig. 8-11 diagnostics per model and the configured Fig. 5/6 ablations).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from cppo.pipeline.layout import expand_runs, seeds_of
from cppo.pipeline.stats import seed_stat
from cppo.run.metrics import RunMetrics, read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PANEL_W, PANEL_H = 4.2, 3.0
DEVIATION_RE = re.compile(r"^deviation/bin(\d+)/(mean|top10)$")


@cache
def _pyplot() -> ModuleType:
    """pyplot on the Agg backend, loaded by the first drawing: listing the figures (which the
    workflow does when it parses) must not load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _runs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return expand_runs(manifest)


@cache
def _metrics(path: str) -> RunMetrics | None:
    p = Path(path)
    return read_metrics(p) if p.exists() else None


def run_metrics(run: dict[str, Any]) -> RunMetrics | None:
    return _metrics(str(Path(run["run_dir"]) / "metrics.jsonl"))


def seed_metrics(manifest: dict[str, Any], model: str, method: str) -> list[RunMetrics]:
    """The metrics of every seed of (model, method) that has any."""
    runs = _runs(manifest)
    found = (run_metrics(r) for r in runs if r["model"] == model and r["method"] == method)
    return [m for m in found if m is not None]


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average s_t = alpha s_{t-1} + (1 - alpha) x_t, started at x_0."""
    out: list[float] = []
    s: float | None = None
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        s = v if s is None else alpha * s + (1 - alpha) * v
        out.append(s)
    return out


def _number(x: Any) -> float | None:
    if isinstance(x, int | float) and not isinstance(x, bool):
        return float(x)
    return None


def prefix_share(rec: dict[str, Any]) -> float | None:
    """Share of the masked tokens that the prefix budget (not the token threshold) masked.

    The trainer logs mask/prefix_fraction and mask/fraction as shares of all eligible tokens.
    """
    prefix, total = _number(rec.get("mask/prefix_fraction")), _number(rec.get("mask/fraction"))
    if prefix is None or total is None or total <= 0:
        return None
    return prefix / total


Key = str | Callable[[dict[str, Any]], float | None]


def _value(rec: dict[str, Any], key: Key) -> float | None:
    return key(rec) if callable(key) else _number(rec.get(key))


def seed_curves(
    manifest: dict[str, Any],
    model: str,
    method: str,
    records: str,
    key: Key,
    scale: float = 1.0,
    smoothing: float = 0.0,
    per_iteration: bool = False,
    floor: float | None = None,
) -> tuple[list[float], list[float], list[float], list[float]] | None:
    """x (iterations), mean over seeds and its 95% t interval (lo, hi; the mean itself with
    one seed) of one metric; None when no seed logged it. `per_iteration` first averages each
    seed's optimizer steps within an iteration (x = 1, 2, ...); `floor` clips the band below
    (e.g. 0 for shares)."""
    upi = manifest["models"][model]["updates_per_iter"]
    per_step: dict[int, list[float]] = defaultdict(list)
    for m in seed_metrics(manifest, model, method):
        recs = m.validation if records == "validation" else m.train
        pts = [(int(r["step"]), v) for r in recs if (v := _value(r, key)) is not None]
        if per_iteration:
            by_iter: dict[int, list[float]] = defaultdict(list)
            for step, v in pts:
                by_iter[-(-step // upi) * upi].append(v)
            pts = [(step, sum(vs) / len(vs)) for step, vs in sorted(by_iter.items())]
        if not pts:
            continue
        ys = [y * scale for _, y in pts]
        if smoothing > 0:
            ys = ema(ys, smoothing)
        for (step, _), y in zip(pts, ys, strict=True):
            per_step[step].append(y)
    if not per_step:
        return None
    steps = sorted(per_step)
    xs = [s / upi for s in steps]

    mean, lo, hi = [], [], []
    for s in steps:
        m, hw = seed_stat([v if math.isfinite(v) else math.nan for v in per_step[s]])
        hw = 0.0 if math.isnan(hw) else hw
        mean.append(m)
        lo.append(m - hw if floor is None else max(floor, m - hw))
        hi.append(m + hw)
    return xs, mean, lo, hi


def _grid(n_panels: int, ncols: int | None = None, nrows: int = 1) -> tuple[Figure, list]:
    ncols = ncols or max(1, n_panels)
    # at least ~8 inches wide so that the method legend below the panels fits
    width = max(PANEL_W * ncols, 8.0)
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, PANEL_H * nrows + 0.8), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _no_data(ax, what: str) -> None:
    ax.text(
        0.5,
        0.5,
        f"no {what} logged",
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="#777777",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_method_curves(
    ax,
    manifest: dict[str, Any],
    model: str,
    methods: list[str],
    records: str,
    key: Key,
    *,
    scale: float = 1.0,
    smoothing: float = 0.0,
    marker: str | None = None,
    **curve_kw: Any,
) -> bool:
    plotted = False
    for meth in methods:
        cur = seed_curves(manifest, model, meth, records, key, scale, smoothing, **curve_kw)
        if cur is None:
            continue
        xs, mean, lo, hi = cur
        color = manifest["methods"][meth]["color"]
        ax.plot(
            xs,
            mean,
            color=color,
            lw=1.6,
            marker=marker,
            ms=3,
            label=manifest["methods"][meth]["label"],
        )
        if len(seeds_of(manifest, model)) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, lw=0)
        plotted = True
    return plotted


def _style(ax, title: str, xlabel: str | None, ylabel: str | None) -> None:
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _legend(fig: Figure, manifest: dict[str, Any], methods: list[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D(
            [],
            [],
            color=manifest["methods"][m]["color"],
            lw=2,
            label=manifest["methods"][m]["label"],
        )
        for m in methods
    ]
    per_row = max(2, int(fig.get_figwidth() / 1.7))
    rows = -(-len(handles) // per_row)
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(len(handles), per_row),
        frameon=False,
        fontsize=9,
        bbox_to_anchor=(0.5, 0.0),
    )
    bottom = (0.32 * rows + 0.1) / fig.get_figheight()
    fig.tight_layout(rect=(0, bottom, 1, 1))


def _tstop(ax, manifest: dict[str, Any], model: str) -> None:
    t = manifest["models"][model]["t_stop"]
    ax.axvline(t, color="#555555", ls="--", lw=1)
    ax.text(t, 0.02, " T_stop", transform=ax.get_xaxis_transform(), fontsize=8, color="#555555")


def _val_label(manifest: dict[str, Any], names: list[str] | None = None) -> str:
    names = names or manifest["validation"]["benchmarks"]
    return "/".join(manifest["benchmarks"][b]["label"] for b in names)


def fig_validation(
    manifest: dict[str, Any], methods: list[str] | None = None, title: str | None = None
) -> Figure:
    """Fig. 4 (and the ablation figures): validation mean per model, one line per method."""
    methods = methods or list(manifest["methods"])
    models = list(manifest["models"])
    fig, axes = _grid(len(models))
    k = manifest["validation"]["k"]
    for i, (ax, model) in enumerate(zip(axes, models, strict=True)):
        ok = _plot_method_curves(
            ax, manifest, model, methods, "validation", "val/mean", scale=100, marker="o"
        )
        if not ok:
            _no_data(ax, "validation")
            continue
        _tstop(ax, manifest, model)
        _style(
            ax,
            manifest["models"][model]["label"],
            "training step (iteration)",
            f"{_val_label(manifest)} Avg@{k} (%)" if i == 0 else None,
        )
    if title:
        fig.suptitle(title, fontsize=11)
    _legend(fig, manifest, methods)
    return fig


# Training panels of the diagnostics figure (Fig. 8-11 first, then what explains them):
# metric key, title, y label, EMA smoothing (None = the config's figures.smoothing), scale.
DIAGNOSTIC_PANELS: list[tuple[str, str, str, float | None, float]] = [
    ("reward/mean", "training reward (EMA)", "reward", None, 1.0),
    ("length/mean", "mean response length", "tokens", 0.0, 1.0),
    ("logprob/rel_error", "relative log-prob error", "rollout vs trainer", 0.0, 1.0),
    ("entropy", "policy entropy (EMA)", "nats / token", None, 1.0),
    ("mask/fraction", "masked / clipped share (EMA)", "% of terms", None, 100.0),
    ("divergence/mean", "mean D_t (EMA; TV or KL by rule)", "D_t", None, 1.0),
]


def fig_diagnostics(manifest: dict[str, Any], model: str) -> Figure:
    """Fig. 8-11 for one model: validation per benchmark, then the training diagnostics.

    A training metric that no run logged is left out rather than drawn as an empty panel
    (e.g. the relative log-prob error needs a separate rollout engine such as vLLM).
    """
    methods = list(manifest["methods"])
    benches = list(manifest["validation"]["benchmarks"])
    k = manifest["validation"]["k"]
    smooth = float(manifest["figures"]["smoothing"])
    curves = {
        key: [seed_curves(manifest, model, m, "train", key) for m in methods]
        for key, *_ in DIAGNOSTIC_PANELS
    }
    panels = [p for p in DIAGNOSTIC_PANELS if any(c is not None for c in curves[p[0]])]
    n = len(benches) + max(1, len(panels))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = _grid(n, ncols=ncols, nrows=nrows)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax, b in zip(axes, benches, strict=False):
        ok = _plot_method_curves(
            ax, manifest, model, methods, "validation", f"val/{b}", scale=100, marker="o"
        )
        if not ok:
            _no_data(ax, f"val/{b}")
            continue
        _tstop(ax, manifest, model)
        _style(ax, f"{manifest['benchmarks'][b]['label']} Avg@{k}", "iteration", "accuracy (%)")
    rest = axes[len(benches) : n]
    if not panels:
        _no_data(rest[0], "training metric")
    for ax, (key, title, ylabel, sm, scale) in zip(rest, panels, strict=False):
        _plot_method_curves(
            ax,
            manifest,
            model,
            methods,
            "train",
            key,
            scale=scale,
            smoothing=smooth if sm is None else sm,
        )
        _style(ax, title, "iteration", ylabel)
    fig.suptitle(f"{manifest['models'][model]['label']}: training diagnostics", fontsize=11)
    _legend(fig, manifest, methods)
    return fig


def fig_prefix_budget(manifest: dict[str, Any]) -> Figure:
    """Fig. 7: effective delta_b and the share of masks from the prefix budget, per model."""
    models = list(manifest["models"])
    fig, axes = _grid(2 * len(models), ncols=len(models), nrows=2)
    methods = list(manifest["methods"])
    used: set[str] = set()
    rows: list[tuple[Key, str, str]] = [
        ("cppo/delta_b_eff", "mean effective δ_b", "δ_b"),
        (prefix_share, "prefix-budget share of masks", "share of masked tokens"),
    ]
    for r, (key, title, ylabel) in enumerate(rows):
        for c, model in enumerate(models):
            ax = axes[r * len(models) + c]
            have = [m for m in methods if seed_curves(manifest, model, m, "train", key) is not None]
            if not have:
                _no_data(ax, title)
                continue
            used.update(have)
            # markers: the share is undefined on steps that mask nothing, so points can be sparse
            _plot_method_curves(ax, manifest, model, have, "train", key, marker=".")
            if key is prefix_share:
                ax.set_ylim(-0.02, 1.02)
            _style(
                ax,
                f"{manifest['models'][model]['label']}: {title}",
                "iteration",
                ylabel if c == 0 else None,
            )
    _legend(fig, manifest, [m for m in methods if m in used] or methods)
    return fig


def fig_binding(manifest: dict[str, Any]) -> Figure:
    """How much each rule binds, per model: the masked / clipped share of terms over training
    (mean over seeds, 95% band), and the run mean of each rule's own measure (cppo.rules
    Rule.binding) per method with the 95% interval over seeds, hatched where that measure is
    not the masked share of terms (capped IS weights, rejected responses, a soft gate)."""
    from cppo.pipeline.aggregate import binding_values

    models, methods = list(manifest["models"]), list(manifest["methods"])
    fig, axes = _grid(2 * len(models), ncols=len(models), nrows=2)
    for c, model in enumerate(models):
        ax = axes[c]
        ok = _plot_method_curves(
            ax, manifest, model, methods, "train", "mask/fraction", scale=100,
            per_iteration=True, floor=0.0,
        )  # fmt: skip
        if not ok:
            _no_data(ax, "mask/fraction")
        _style(ax, f"{manifest['models'][model]['label']}: masked / clipped share", "iteration",
               "% of terms (iteration mean)" if c == 0 else None)  # fmt: skip
        ax = axes[len(models) + c]
        for i, meth in enumerate(methods):
            binds = manifest["methods"][meth].get("binding")
            runs = [binding_values(m.train, binds) for m in seed_metrics(manifest, model, meth)]
            vals = [r["binds"] for r in runs if "binds" in r]
            if not vals:
                continue
            hatched = binds != "mask/fraction"
            mean, hw = seed_stat(vals)
            hw = 0.0 if math.isnan(hw) else hw
            ax.bar(
                i,
                mean,
                yerr=[[min(hw, mean)], [hw]],  # shares are >= 0
                color=manifest["methods"][meth]["color"],
                hatch="//" if hatched else None,
                edgecolor="white" if hatched else None,
                capsize=3,
            )
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([manifest["methods"][m]["label"] for m in methods], rotation=45,
                           ha="right", fontsize=8)  # fmt: skip
        _style(ax, "run mean of the rule's own measure (hatched: not a mask)", None,
               "%" if c == 0 else None)  # fmt: skip
    _legend(fig, manifest, methods)
    return fig


def deviation_profile(
    manifest: dict[str, Any], model: str, method: str
) -> dict[str, list[float]] | None:
    """Per-bin |pi - mu| averaged over training steps and seeds: {'mean': [...], 'top10': [...]}."""
    sums: dict[tuple[str, int], list[float]] = defaultdict(list)
    for m in seed_metrics(manifest, model, method):
        for rec in m.train:
            for key, value in rec.items():
                match = DEVIATION_RE.match(key)
                if match and isinstance(value, int | float) and math.isfinite(value):
                    sums[(match.group(2), int(match.group(1)))].append(float(value))
    if not sums:
        return None
    n_bins = max(i for _, i in sums) + 1
    out: dict[str, list[float]] = {}
    for stat in ("mean", "top10"):
        vals = [sums.get((stat, i)) for i in range(n_bins)]
        out[stat] = [sum(v) / len(v) if v else math.nan for v in vals]
    return out


def position_threshold(delta: float, w_min: float, n_bins: int) -> tuple[list[float], list[float]]:
    """CPPO's per-token limit delta / w_t at the bin centres, w linear from 1 to w_min."""
    xs = [(i + 0.5) / n_bins for i in range(n_bins)]
    return xs, [delta / (1 - (1 - w_min) * x) for x in xs]


def fig_position_deviation(manifest: dict[str, Any]) -> Figure:
    """Fig. 2: position-conditioned deviation with the CPPO threshold."""
    models = list(manifest["models"])
    methods = list(manifest["methods"])
    fig, axes = _grid(len(models))
    used = []
    for c, (ax, model) in enumerate(zip(axes, models, strict=True)):
        any_data = False
        for meth in methods:
            prof = deviation_profile(manifest, model, meth)
            if prof is None:
                continue
            any_data = True
            used.append(meth)
            n = len(prof["mean"])
            xs = [(i + 0.5) / n for i in range(n)]
            color = manifest["methods"][meth]["color"]
            ax.plot(xs, prof["mean"], color=color, lw=1.6, marker="o", ms=3)
            ax.plot(xs, prof["top10"], color=color, lw=1.2, ls="--")
        if not any_data:
            _no_data(ax, "deviation/bin*")
            continue
        params = _cppo_params(manifest, model)
        if params is not None:
            tx, ty = position_threshold(params["delta"], params["w_min"], 20)
            ax.plot(tx, ty, color="black", ls=":", lw=1.4, label="δ / w_t")
        # deviations are often orders of magnitude below the threshold: log scale shows both
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)):
            ax.set_yscale("log")
        _style(
            ax,
            manifest["models"][model]["label"],
            "relative token position",
            "|π(y_t) − μ(y_t)|" if c == 0 else None,
        )
        ax.text(
            0.02,
            0.97,
            "solid: mean, dashed: top-10%, dotted: δ / w_t",
            transform=ax.transAxes,
            fontsize=7,
            va="top",
            color="#444444",
        )
    _legend(fig, manifest, list(dict.fromkeys(used)) or methods)
    return fig


def _cppo_params(manifest: dict[str, Any], model: str) -> dict[str, float] | None:
    for run in _runs(manifest):
        if run["model"] != model:
            continue
        params = run.get("method_params", {})
        if manifest["methods"][run["method"]]["rule"] == "cppo" and {"delta", "w_min"} <= set(
            params
        ):
            return {"delta": float(params["delta"]), "w_min": float(params["w_min"])}
    return None


def save(fig: Figure, prefix: str | Path, dpi: int) -> list[Path]:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [prefix.with_name(f"{prefix.name}.png"), prefix.with_name(f"{prefix.name}.pdf")]
    fig.savefig(paths[0], dpi=dpi)
    # no creation date: the same results give the same bytes (the PNG carries none)
    fig.savefig(paths[1], metadata={"CreationDate": None})
    _pyplot().close(fig)
    return paths


@dataclass(frozen=True)
class FigureSpec:
    """A figure of a results directory: what it shows (its report caption) and its drawing."""

    caption: str
    draw: Callable[[], Figure]


VALIDATION_CAPTION = (
    "Fig. 4: validation mean Avg@k against the training step (iteration), one panel per model "
    "and one line per method (the mean over seeds); the dashed line is T_stop. With several "
    "seeds the band is the 95% Student-t interval of the mean."
)
BINDING_CAPTION = (
    "How much each rule binds: the share of terms it masked or clipped over training (top; mean "
    "over seeds with its 95% interval) and the run mean of each rule's own measure with its 95% "
    "interval over seeds (bottom; hatched bars: a measure other than the masked share of terms, "
    "such as CISPO's capped importance weights, TRM's rejected responses or SAPO's gate; no bar "
    "for the no-trust-region control)."
)
POSITION_DEVIATION_CAPTION = (
    "Fig. 2: deviation abs(pi(y_t) - mu(y_t)) of the sampled token by relative position (solid: "
    "mean, dashed: mean of the top 10%), beside CPPO's per-token limit delta / w_t (dotted)."
)
PREFIX_BUDGET_CAPTION = (
    "Fig. 7: mean effective delta_b per step (top) and the share of tokens the prefix budget "
    "(rather than the token-level threshold) masked (bottom); CPPO-family methods only."
)
DIAGNOSTICS_CAPTION = (
    "Fig. 8-11 style diagnostics of one model: per-benchmark validation curves, training reward "
    "(EMA-smoothed), mean response length, the relative log-prob error between the rollout "
    "engine and the trainer (only logged with a separate rollout engine, e.g. vLLM; left out "
    "otherwise), policy entropy, the share of terms each rule masked or clipped, and the mean "
    "divergence D_t."
)
ABLATION_CAPTION = (
    "Ablation (Fig. 5/6 style): validation mean Avg@k of the listed variants against iteration."
)


def figure_specs(manifest: dict[str, Any]) -> dict[str, FigureSpec]:
    """The figures of a results directory, in report order: the one list of figure names
    (the workflow's figure jobs and the summary read it from here)."""
    out = {
        "fig4_validation": FigureSpec(VALIDATION_CAPTION, lambda: fig_validation(manifest)),
        "binding": FigureSpec(BINDING_CAPTION, lambda: fig_binding(manifest)),
        "fig2_position_deviation": FigureSpec(
            POSITION_DEVIATION_CAPTION, lambda: fig_position_deviation(manifest)
        ),
        "fig7_prefix_budget": FigureSpec(
            PREFIX_BUDGET_CAPTION, lambda: fig_prefix_budget(manifest)
        ),
    }
    for model in manifest["models"]:
        out[f"diagnostics_{model}"] = FigureSpec(
            DIAGNOSTICS_CAPTION, lambda model=model: fig_diagnostics(manifest, model)
        )
    for spec in manifest["figures"]["ablations"]:
        out[spec["name"]] = FigureSpec(
            ABLATION_CAPTION,
            lambda spec=spec: fig_validation(manifest, spec["methods"], spec["title"]),
        )
    return out


def figure_names(manifest: dict[str, Any]) -> list[str]:
    return list(figure_specs(manifest))


def make_figure(manifest: dict[str, Any], name: str, prefix: str | Path) -> list[Path]:
    specs = figure_specs(manifest)
    if name not in specs:
        raise KeyError(f"unknown figure {name!r}; known: {', '.join(specs)}")
    return save(specs[name].draw(), prefix, int(manifest["figures"]["dpi"]))

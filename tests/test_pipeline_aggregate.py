"""Aggregation, tables and figures on synthetic run directories, checked against hand values."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pandas as pd
import pytest

from cppo.pipeline import aggregate, figures, report, stats, tables
from cppo.pipeline.layout import expand_runs
from cppo.pipeline.plan import Plan
from cppo.run import directory
from cppo.run import metrics as run_metrics

K = 4
N_VAL, N_TEST = 5, 3


def config(seeds=(0, 1, 2), methods=("a", "b")) -> dict:
    return {
        "profile": "synth",
        "seeds": list(seeds),
        "run": {"models": ["m"], "methods": list(methods)},
        "data": {"train": {"source": "toy"}},
        "benchmarks": {
            "val": {"source": "toy", "label": "Val"},
            "test": {"source": "toy", "label": "Test"},
        },
        "validation": {"benchmarks": ["val", "test"], "every": 1, "k": K},
        "evaluation": {"benchmarks": ["test"], "checkpoints": ["best", "final"], "k": 8},
        "models": {
            "m": {
                "label": "Model M",
                "source": "toy",
                "toy": {"preset": "toy-s", "flavour": "base"},
                "schedule": {
                    "prompts_per_iter": 4,
                    "n": 2,
                    "minibatch": 2,
                    "updates_per_iter": 2,
                    "iterations": 4,
                    "max_prompt_length": 64,
                    "max_completion_length": 32,
                },
                "trust_region": {
                    "delta": 0.15,
                    "delta_b": 0.02,
                    "adaptive_delta_b": True,
                    "w_min": 0.8,
                },
                "t_stop": 3,
            }
        },
        "methods": {
            "a": {"rule": "grpo", "label": "Method A", "color": "#0000ff"},
            "b": {
                "rule": "cppo",
                "label": "Method B",
                "color": "#ff0000",
                "from_model": ["delta", "delta_b", "adaptive_delta_b", "w_min"],
            },
        },
    }


def write_run(
    run_dir: Path,
    val: dict[int, tuple[float, float]],
    train: list[dict],
    checkpoints=(2, 4, 6, 8),
    final=True,
) -> None:
    """val: step -> (val/val, val/test); val/mean is their mean."""
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = []
    for step in sorted(set(val) | {r["step"] for r in train}):
        recs += [{"kind": "train", **r} for r in train if r["step"] == step]
        if step in val:
            v, t = val[step]
            recs.append(
                {
                    "kind": "validation",
                    "step": step,
                    "val/val": v,
                    "val/test": t,
                    "val/mean": (v + t) / 2,
                    "val/k": K,
                }
            )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for s in checkpoints:
        (run_dir / f"checkpoint-{s}").mkdir(exist_ok=True)
    if final:
        (run_dir / "final").mkdir(exist_ok=True)
    steps = max((r["step"] for r in train), default=0)
    (run_dir / "DONE").write_text(json.dumps({"steps": steps}))


def train_recs(steps=range(1, 9), broken_from=None, **extra) -> list[dict]:
    out = []
    for s in steps:
        bad = broken_from is not None and s >= broken_from
        out.append(
            {
                "step": s,
                "reward/mean": None if bad else 0.1 * s,
                "grad_norm": 1.0,
                "length/mean": 10.0 * s,
                "mask/fraction": 0.2,
                "mask/prefix_fraction": 0.05,
                **extra,
            }
        )
    return out


# best val/mean within [0, T_stop = 3 iterations = 6 steps]; step 8 is outside the window
A_VALS = {
    0: {0: (0.1, 0.1), 2: (0.4, 0.2), 4: (0.2, 0.4), 6: (0.2, 0.2), 8: (0.9, 0.9)},  # tie 2/4
    1: {0: (0.1, 0.1), 2: (0.3, 0.3), 4: (0.5, 0.3), 6: (0.1, 0.1), 8: (0.0, 0.0)},
    2: {0: (0.1, 0.1), 2: (0.2, 0.2), 4: (0.3, 0.3), 6: (0.6, 0.4), 8: (0.0, 0.0)},
}
# expected best (step, mean %, val %, test %) per seed for method a
A_BEST = {0: (2, 30.0, 40.0, 20.0), 1: (4, 40.0, 50.0, 30.0), 2: (6, 50.0, 60.0, 40.0)}


@pytest.fixture
def synth(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = Plan(config())
    toy = tmp_path / plan.matrix.toy_data_dir
    toy.mkdir(parents=True)
    (toy / "val.jsonl").write_text("".join(json.dumps({"id": str(i)}) + "\n" for i in range(N_VAL)))
    (toy / "test.jsonl").write_text(
        "".join(json.dumps({"id": str(i)}) + "\n" for i in range(N_TEST))
    )
    for seed, vals in A_VALS.items():
        write_run(Path(plan.matrix.run_dir("m", "a", seed)), vals, train_recs())
    # method b: seed 2 collapses at step 3 (reward null from then on), others are fine
    for seed in (0, 1, 2):
        vals = {s: (0.2 + 0.01 * seed, 0.2) for s in (0, 2, 4, 6, 8)}
        vals[4] = (0.6 + 0.08 * seed, 0.4)
        broken = 3 if seed == 2 else None
        extra = {f"deviation/bin{i}/mean": 0.01 * (i + 1) + 0.001 * seed for i in range(2)}
        extra |= {f"deviation/bin{i}/top10": 0.05 * (i + 1) for i in range(2)}
        extra |= {"cppo/delta_b_eff": 0.02 + 0.001 * seed}
        write_run(
            Path(plan.matrix.run_dir("m", "b", seed)), vals, train_recs(broken_from=broken, **extra)
        )
    manifest = plan.manifest()
    Path(plan.matrix.manifest_path).parent.mkdir(parents=True, exist_ok=True)
    Path(plan.matrix.manifest_path).write_text(json.dumps(manifest))
    return plan, manifest


def test_table1_and_table4_pick_best_within_t_stop(synth):
    plan, manifest = synth
    frames = aggregate.collect(manifest)
    t1 = frames["table1"].set_index(["method", "seed"])
    for seed, (step, mean, _, _) in A_BEST.items():
        row = t1.loc[("a", seed)]
        assert row["benchmark"] == "mean" and row["step"] == step
        assert row["value"] == pytest.approx(mean)
        assert row["n_samples"] == K * (N_VAL + N_TEST)
    t4 = frames["table4"].set_index(["method", "seed", "benchmark"])
    for seed, (step, _, v, t) in A_BEST.items():
        assert t4.loc[("a", seed, "val")]["value"] == pytest.approx(v)
        assert t4.loc[("a", seed, "test")]["value"] == pytest.approx(t)
        assert t4.loc[("a", seed, "val")]["n_samples"] == K * N_VAL
        assert t4.loc[("a", seed, "test")]["step"] == step
    assert list(frames["table1"].columns) == aggregate.LONG_COLUMNS
    # every validation record: 5 steps x (2 benchmarks + mean) x 6 runs
    assert len(frames["validation_long"]) == 5 * 3 * 6
    status = frames["run_status"].set_index(["method", "seed"])
    assert status.loc[("b", 2)]["collapse_step"] == 3
    assert pd.isna(status.loc[("b", 0)]["collapse_step"])
    assert bool(status.loc[("a", 0)]["done"]) and status.loc[("a", 0)]["last_step"] == 8


def test_table1_rendering_mean_and_ci_over_seeds(synth):
    plan, manifest = synth
    aggregate.write_all(plan.matrix.manifest_path, plan.matrix.path("tables"))
    tables.render(manifest, plan.matrix.path("tables"), "table1")
    md = Path(plan.matrix.path("tables", "table1.md")).read_text()
    # method a: seeds 30, 40, 50 -> mean 40, sd 10, half-width t(0.975, 2) 10 / sqrt(3)
    hw = 4.303 * 10 / math.sqrt(3)
    assert f"| Method A | 40.00 ± {hw:.2f} |" in md
    # method b: seeds 50, 54, 58 %; seed 2 collapsed at step 3 = iteration 1 but keeps its
    # best within T_stop (reached before the collapse) in the mean
    b = [(0.6 + 0.08 * s + 0.4) / 2 * 100 for s in range(3)]
    hw_b = 4.303 * statistics.stdev(b) / math.sqrt(3)
    assert f"| Method B | {sum(b) / 3:.2f} ± {hw_b:.2f} (1/3 collapse, first it. 1) |" in md
    # the intervals [15.2, 64.8] and [44.1, 63.9] overlap: nothing is bold
    assert "**Method" not in md and "| **" not in md
    tex = Path(plan.matrix.path("tables", "table1.tex")).read_text()
    assert r"\toprule" in tex and r"40.00 $\pm$" in tex
    assert "<table>" in Path(plan.matrix.path("tables", "table1.html")).read_text()


def test_seed_stat_against_hand_values():
    assert stats.seed_stat([1.0]) == (1.0, pytest.approx(math.nan, nan_ok=True))
    mean, hw = stats.seed_stat([2.0, 4.0, 6.0, 8.0])
    sd = math.sqrt((3**2 + 1 + 1 + 3**2) / 3)
    assert mean == 5.0 and hw == pytest.approx(3.182 * sd / 2)
    assert stats.t975(40) == 1.96


def test_bold_only_when_intervals_do_not_overlap():
    S = tables.Stat
    # 50 ± 2 vs 45 ± 2: [48, 52] above [43, 47] -> the best is singled out
    assert tables.separated_best({"a": S(50, 2, 3), "b": S(45, 2, 3), "c": S(10, 1, 3)}) == "a"
    # 50 ± 3 vs 45 ± 2.5: [47, 53] touches [42.5, 47.5] -> inside the noise
    assert tables.separated_best({"a": S(50, 3, 3), "b": S(45, 2.5, 3)}) is None
    # one seed: no interval, no ranking
    nan = math.nan
    assert tables.separated_best({"a": S(50, nan, 1), "b": S(10, nan, 1)}) is None
    # a cell whose every seed collapsed is not ranked; the next one is compared instead
    cells = {"x": S(90, 1, 3, n_collapsed=3, collapse_iter=4), "a": S(50, 1, 3), "b": S(40, 1, 3)}
    assert tables.separated_best(cells) == "a"
    assert tables.fmt_cell(cells["x"]) == "90.00 ± 1.00 (3/3 collapse, first it. 4)"
    assert tables.fmt_cell(S(34.4, nan, 1, 1, 8)) == "34.40 (collapse, it. 8)"
    assert tables.fmt_cell(S(50, 2, 2, n_seeds=3)) == "50.00 ± 2.00 (n=2)"  # a seed is missing
    # two of three seeds collapsed, one of them without a value: not all collapsed
    two = S(40, nan, 1, n_collapsed=2, collapse_iter=3, n_seeds=3)
    assert not two.collapsed
    assert tables.fmt_cell(two) == "40.00 (n=1) (2/3 collapse, first it. 3)"


def test_validation_collapse_rule():
    recs = [{"step": s, "val/mean": v} for s, v in [(0, 0.4), (5, 0.3), (10, 0.19), (15, 0.25)]]
    # below 0.5 x 0.4 = 0.2 once (step 10), then back above: no collapse with 2 in a row
    assert aggregate.validation_collapse_step(recs, 0.5, 2) is None
    assert aggregate.validation_collapse_step(recs, 0.5, 1) == 10
    recs += [{"step": 20, "val/mean": 0.1}, {"step": 25, "val/mean": None}]
    # 0.1 and a missing value (counts as below) at steps 20, 25: collapse from step 20
    assert aggregate.validation_collapse_step(recs, 0.5, 2) == 20
    assert aggregate.validation_collapse_step(recs, 0.8, 2) == 5  # below 0.32 from step 5 on
    assert aggregate.validation_collapse_step(recs, None, 2) is None
    assert aggregate.validation_collapse_step(recs[1:], 0.5, 2) is None  # no step-0 reference


def test_all_seeds_collapsed_shows_collapse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = Plan(config(seeds=(0,), methods=("a",)))
    write_run(Path(plan.matrix.run_dir("m", "a", 0)), A_VALS[0], train_recs(broken_from=5))
    manifest = plan.manifest()
    frames = aggregate.collect(manifest)
    grid = tables.table1_grid(frames["table1"], frames["run_status"], manifest)
    assert grid.rows == [["Method A", "30.00 (collapse, it. 2)"]]
    # a collapse after T_stop (6 steps) does not count
    write_run(Path(plan.matrix.run_dir("m", "a", 0)), A_VALS[0], train_recs(broken_from=7))
    frames = aggregate.collect(manifest)
    grid = tables.table1_grid(frames["table1"], frames["run_status"], manifest)
    assert grid.rows == [["Method A", "30.00"]]


def test_a_column_with_its_own_seeds(tmp_path, monkeypatch):
    """models.<m>.seeds: that column's runs, cells and notes count its seeds, not the top-level."""
    import copy

    monkeypatch.chdir(tmp_path)
    cfg = config(methods=("a",))
    cfg["models"]["m2"] = copy.deepcopy(cfg["models"]["m"])
    cfg["models"]["m2"].update(label="Model M2", seeds=[0, 1, 2, 3, 4])
    cfg["run"]["models"] = ["m", "m2"]
    plan = Plan(cfg)
    assert plan.matrix.seeds_of("m") == [0, 1, 2] and plan.matrix.seeds_of("m2") == [0, 1, 2, 3, 4]
    assert plan.matrix.seeds == [0, 1, 2, 3, 4]
    assert sorted((mo, s) for mo, _, s in plan.matrix.runs) == [("m", s) for s in range(3)] + [
        ("m2", s) for s in range(5)
    ]
    # m2: best within T_stop (steps 0-6) of val/mean = 0.1 * (seed + 1), at step 2
    for seed in range(5):
        vals = {st: (0.0, 0.0) for st in (0, 4, 6, 8)} | {2: (0.1 * (seed + 1),) * 2}
        write_run(Path(plan.matrix.run_dir("m2", "a", seed)), vals, train_recs())
    for seed in range(3):
        write_run(Path(plan.matrix.run_dir("m", "a", seed)), A_VALS[seed], train_recs())
    manifest = plan.manifest()
    assert manifest["models"]["m2"]["seeds"] == [0, 1, 2, 3, 4]
    frames = aggregate.collect(manifest)
    grid = tables.table1_grid(frames["table1"], frames["run_status"], manifest)
    # m: 30, 40, 50 (t over 3 seeds); m2: 10..50 (t over 5 seeds: t_{0.975,4} = 2.776)
    hw3, hw5 = 4.303 * 10 / math.sqrt(3), 2.776 * statistics.stdev([10, 20, 30, 40, 50]) / 5**0.5
    assert grid.rows == [["Method A", f"40.00 ± {hw3:.2f}", f"30.00 ± {hw5:.2f}"]]
    assert "over n seeds per column (Model M: 3, Model M2: 5)" in " ".join(grid.notes)
    # a missing run of m2 shows as n=4 of its 5, not of the top-level 3
    import shutil

    shutil.rmtree(plan.matrix.run_dir("m2", "a", 4))
    frames = aggregate.collect(manifest)
    grid = tables.table1_grid(frames["table1"], frames["run_status"], manifest)
    assert "n=4" in grid.rows[0][2]


def test_posthoc_rows_from_summaries(synth):
    plan, manifest = synth
    for run in expand_runs(manifest):
        sel = {"best": {"step": 2, "path": "x"}, "final": {"step": 8, "path": "y"}}
        Path(run["selection"]).parent.mkdir(parents=True, exist_ok=True)
        Path(run["selection"]).write_text(json.dumps(sel))
        for ckpt, summaries in run["eval"].items():
            for path in summaries.values():
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                value = 0.25 if ckpt == "best" else 0.5
                Path(path).write_text(json.dumps({"avg_at_k": value, "n_samples": 24}))
    post = aggregate.collect(manifest)["posthoc"]
    row = post[
        (post.method == "a")
        & (post.seed == 1)
        & (post.checkpoint == "final")
        & (post.benchmark == "test")
    ].iloc[0]
    assert row["value"] == 50.0 and row["step"] == 8 and row["n_samples"] == 24
    assert set(post.benchmark) == {"test"}  # one benchmark: no separate mean row
    grid = tables.posthoc_grid(post, aggregate.collect(manifest)["run_status"], manifest)
    assert grid.header == ["Model", "Method", "best: Test", "final: Test"]
    assert grid.rows[0] == ["Model M", "Method A", "25.00 ± 0.00", "50.00 ± 0.00"]


def test_paper_diff_against_reported_numbers():
    manifest = {
        "seeds": [0],
        "models": {
            "Qwen3-1.7B": {"label": "Qwen3-1.7B", "t_stop_steps": 100, "updates_per_iter": 2},
            "Qwen3-30B-A3B-Base": {"label": "30B", "t_stop_steps": 100, "updates_per_iter": 8},
        },
        "methods": {"cppo": {"label": "CPPO"}, "cispo": {"label": "CISPO"}},
    }
    t1 = pd.DataFrame(
        [
            {
                "model": "Qwen3-1.7B",
                "method": "cppo",
                "seed": 0,
                "benchmark": "mean",
                "step": 10,
                "value": 33.0,
                "n_samples": 1440,
            },
            {
                "model": "Qwen3-30B-A3B-Base",
                "method": "cispo",
                "seed": 0,
                "benchmark": "mean",
                "step": 10,
                "value": 40.0,
                "n_samples": 1440,
            },
        ]
    )
    t4 = pd.DataFrame(
        [
            {
                "model": "Qwen3-1.7B",
                "method": "cppo",
                "seed": 0,
                "benchmark": "aime24",
                "step": 10,
                "value": 30.0,
                "n_samples": 480,
            }
        ]
    )
    status = pd.DataFrame(
        [{"model": "Qwen3-1.7B", "method": "cppo", "seed": 0, "collapse_step": None}]
    )
    diff = tables.paper_diff(t1, t4, status, manifest).set_index(["model", "method", "benchmark"])
    row = diff.loc[("Qwen3-1.7B", "cppo", "mean")]
    assert row["reported"] == 31.88 and row["reproduced"] == 33.0
    assert row["diff"] == pytest.approx(1.12)
    assert diff.loc[("Qwen3-1.7B", "cppo", "aime24")]["diff"] == pytest.approx(30.0 - 34.79)
    assert diff.loc[("Qwen3-1.7B", "cppo", "aime25")]["reproduced_status"] == "missing"
    cispo = diff.loc[("Qwen3-30B-A3B-Base", "cispo", "mean")]
    assert cispo["reported_status"] == "collapse" and math.isnan(cispo["diff"])
    # 7 (model, method) pairs of the paper are in the manifest's 2 x 2 matrix? only these 2 x 4
    assert len(diff) == 2 * 2 * 4
    md = tables.paper_diff_grid(diff.reset_index(), manifest).markdown()
    assert "| Qwen3-1.7B | CPPO | mean | 31.88 | 33.00 | +1.12 |" in md


def test_figures_plot_the_seed_mean(synth):
    plan, manifest = synth
    fig = figures.fig_validation(manifest)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    a = lines["Method A"]
    # x in iterations (steps / 2); y = mean over seeds of val/mean in %
    assert list(a.get_xdata()) == [0, 1, 2, 3, 4]
    expected = [
        sum((A_VALS[s][st][0] + A_VALS[s][st][1]) / 2 for s in A_VALS) / 3 * 100
        for st in (0, 2, 4, 6, 8)
    ]
    assert list(a.get_ydata()) == pytest.approx(expected)
    assert figures.figure_names(manifest) == [
        "fig4_validation",
        "binding",
        "fig2_position_deviation",
        "fig7_prefix_budget",
        "diagnostics_m",
    ]
    for name in figures.figure_names(manifest):
        paths = figures.make_figure(manifest, name, Path(plan.matrix.path("figures", name)))
        assert [p.suffix for p in paths] == [".png", ".pdf"]
        assert all(p.stat().st_size > 5000 for p in paths), name


def test_figure_helpers_by_hand():
    assert figures.ema([1.0, 3.0, 3.0], 0.5) == [1.0, 2.0, 2.5]
    assert figures.ema([1.0, float("nan"), 3.0], 0.0)[2] == 3.0
    xs, ys = figures.position_threshold(0.15, 0.8, 2)
    assert xs == [0.25, 0.75]
    assert ys == pytest.approx([0.15 / 0.95, 0.15 / 0.85])
    assert figures.prefix_share({"mask/prefix_fraction": 0.05, "mask/fraction": 0.2}) == 0.25
    assert figures.prefix_share({"mask/prefix_fraction": None, "mask/fraction": 0.2}) is None
    assert figures.prefix_share({"mask/prefix_fraction": 0.0, "mask/fraction": 0.0}) is None


def test_deviation_profile_and_delta_b_curves(synth):
    plan, manifest = synth
    prof = figures.deviation_profile(manifest, "m", "b")
    # bin i mean = 0.01 (i + 1) + 0.001 seed, averaged over seeds 0..2 -> + 0.001
    assert prof["mean"] == pytest.approx([0.011, 0.021])
    assert prof["top10"] == pytest.approx([0.05, 0.10])
    assert figures.deviation_profile(manifest, "m", "a") is None
    xs, mean, lo, hi = figures.seed_curves(manifest, "m", "b", "train", "cppo/delta_b_eff")
    # delta_b 0.020, 0.021, 0.022 over seeds: band = mean -+ t(0.975, 2) sd / sqrt(3)
    hw = 4.303 * 0.001 / math.sqrt(3)
    assert xs[0] == 0.5 and mean[0] == pytest.approx(0.021)
    assert (lo[0], hi[0]) == (pytest.approx(0.021 - hw), pytest.approx(0.021 + hw))


def test_summary_markdown(synth):
    plan, manifest = synth
    aggregate.write_all(plan.matrix.manifest_path, plan.matrix.path("tables"))
    for name in ("table1", "table4"):
        tables.render(manifest, plan.matrix.path("tables"), name)
    out = report.write_summary(
        manifest, ["table1", "table4"], ["fig4_validation"], plan.matrix.path("summary.md")
    )
    text = out.read_text()
    assert "Table 1" in text and "Table 4" in text
    assert "![fig4_validation](figures/fig4_validation.png)" in text
    assert "- m / b / seed 2: collapsed at step 3 (config `collapse`)" in text


def test_read_metrics_resume_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"kind": "train", "step": 1, "x": 1}\n{"kind": "train", "step": 2, "x": 2}\n'
        '{"kind": "train", "step": 2, "x": 20}\n{"kind": "validation", "step": 2, "val/mean": 0.5}\n'
        '{"kind": "train", "st'
    )
    m = run_metrics.read_metrics(path)
    assert [r["x"] for r in m.train] == [1, 20] and m.last_step == 2
    assert m.validation[0]["val/mean"] == 0.5
    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        run_metrics.read_metrics(path)


def test_collapse_needs_a_persistent_break():
    recs = [
        {"step": 1, "g": 1.0},
        {"step": 2, "g": None},
        {"step": 3, "g": 1.0},
        {"step": 4, "g": float("nan")},
        {"step": 5, "g": None},
    ]
    assert aggregate.collapse_step(recs, ["g"]) == 4
    assert aggregate.collapse_step(recs[:4] + [{"step": 5, "g": 2.0}], ["g"]) is None
    assert aggregate.collapse_step(recs, ["missing"]) is None


def test_select_checkpoints(tmp_path):
    run = tmp_path / "run"
    write_run(run, {0: (0.1, 0.1), 2: (0.5, 0.5), 4: (0.2, 0.2), 8: (0.9, 0.9)}, train_recs())
    sel = directory.select_checkpoints(run, 6, "init-model")
    assert sel["best"] == {"step": 2, "val_mean": 0.5, "path": str(run / "checkpoint-2")}
    assert sel["final"] == {"step": 8, "path": str(run / "final")}
    # best at step 0 -> the initial model (with its hub revision)
    write_run(run, {0: (0.9, 0.9), 2: (0.5, 0.5)}, train_recs())
    sel = directory.select_checkpoints(run, 6, "Qwen/X", "a" * 40)
    assert sel["best"] == {"step": 0, "val_mean": 0.9, "path": "Qwen/X", "revision": "a" * 40}
    # a best step without a saved checkpoint is an error naming what exists
    write_run(run / ".." / "run2", {0: (0.1, 0.1), 2: (0.5, 0.5)}, train_recs(), checkpoints=(4,))
    with pytest.raises(
        FileNotFoundError,
        match=r"step 2 has no snapshots/step-2/ or checkpoint-2/ \(saved: \[4\]\)",
    ):
        directory.select_checkpoints(tmp_path / "run2", 6, "init")
    write_run(tmp_path / "run3", {2: (0.5, 0.5)}, train_recs(), final=False)
    with pytest.raises(directory.RunIntegrityError, match="final is missing"):
        directory.select_checkpoints(tmp_path / "run3", 6, "init")


def test_evaluate_run_evaluates_each_step_once(tmp_path):
    from cppo.pipeline.jobs import evaluate_run

    # a stand-in evaluation CLI: records its arguments and writes a summary
    fake = tmp_path / "fake_eval.py"
    fake.write_text(
        "import json, sys, pathlib\n"
        "a = sys.argv[1:]\n"
        "out = pathlib.Path(a[a.index('--out') + 1]); out.mkdir(parents=True)\n"
        "(out / 'b.summary.json').write_text(json.dumps({'args': a}))\n"
        "with open(sys.argv[0] + '.calls', 'a') as fh: fh.write(' '.join(a) + '\\n')\n"
    )
    cmd = [sys.executable, str(fake), "--k", "4"]
    sel = tmp_path / "s.json"
    sel.write_text(
        json.dumps(
            {
                "run_dir": "runs/x",
                "best": {"step": 0, "path": "Qwen/X", "revision": "abc"},
                "final": {"step": 8, "path": "runs/x/final"},
            }
        )
    )
    assert evaluate_run(sel, ["best", "final"], tmp_path / "ev", cmd) == 0
    calls = (tmp_path / "fake_eval.py.calls").read_text().splitlines()
    assert calls == [
        f"--k 4 --model Qwen/X --revision abc --model-name runs/x:best --out {tmp_path}/ev/best",
        f"--k 4 --model runs/x/final --model-name runs/x:final --out {tmp_path}/ev/final",
    ]
    # best at the final step: one evaluation, the other checkpoint's outputs are a copy
    sel.write_text(
        json.dumps(
            {
                "run_dir": "runs/y",
                "best": {"step": 8, "path": "runs/y/checkpoint-8"},
                "final": {"step": 8, "path": "runs/y/final"},
            }
        )
    )
    (tmp_path / "fake_eval.py.calls").unlink()
    assert evaluate_run(sel, ["best", "final"], tmp_path / "ev2", cmd) == 0
    assert len((tmp_path / "fake_eval.py.calls").read_text().splitlines()) == 1
    best = json.loads((tmp_path / "ev2/best/b.summary.json").read_text())
    final = json.loads((tmp_path / "ev2/final/b.summary.json").read_text())
    assert best["args"] == final["args"]  # the same evaluation
    assert final["model"] == "runs/y:final" and final["copied_from"] == "best"


def test_publish_to_wandb_offline(synth, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from cppo.pipeline.publish import publish

    monkeypatch.setenv("WANDB_SILENT", "true")
    plan, manifest = synth
    written = aggregate.write_all(plan.matrix.manifest_path, plan.matrix.path("tables"))
    figs = {
        "fig4_validation": figures.make_figure(
            manifest, "fig4_validation", Path(plan.matrix.path("figures", "fig4_validation"))
        )[0]
    }
    out = tmp_path / "wandb.json"
    info = publish(
        manifest,
        written,
        figs,
        project="p",
        entity=None,
        mode="offline",
        tags=["test"],
        out=out,
        wandb_dir=tmp_path,
    )
    assert json.loads(out.read_text())["id"] == info["id"]
    files = Path(info["dir"])
    assert not files.is_absolute() and files.is_dir()  # relative: the results directory moves
    table1 = next(files.glob("media/table/tables/table1_*.table.json"))
    data = json.loads(table1.read_text())
    assert data["columns"] == aggregate.LONG_COLUMNS and len(data["data"]) == 6
    assert next(files.glob("media/images/figures/fig4_validation_*.png")).stat().st_size > 5000
    assert list(files.glob("media/table/curves/m_table_*.table.json"))


def test_stability_and_binding_values_by_hand():
    val = [
        {"step": 0, "val/mean": 0.30},
        {"step": 4, "val/mean": 0.50},
        {"step": 8, "val/mean": 0.40},
        {"step": 12, "val/mean": 0.20},
    ]
    got = aggregate.stability_values(val, t_stop_steps=8)
    want = {"start": 30.0, "best": 50.0, "gain": 20.0, "final": 20.0, "last2": 30.0, "net": -10.0}
    want["mean"] = 45.0  # steps 4 and 8: the validations after the start within T_stop
    assert got == pytest.approx(want)
    train = [
        {"step": 1, "mask/fraction": 0.0, "mask/prefix_fraction": 0.0, "ratio/abs_dev_mean": 0.0},
        {"step": 2, "mask/fraction": 0.02, "mask/prefix_fraction": 0.01, "ratio/abs_dev_mean": 0.1},
        {"step": 3, "mask/fraction": 0.04, "mask/prefix_fraction": 0.0, "ratio/abs_dev_mean": 0.2},
    ]
    got = aggregate.binding_values(train, "mask/fraction")
    # masked: mean of 0, 2, 4 %, also the rule's own measure; prefix share: 1 % of 6 % masked;
    # |rho - 1|: mean 0.1
    want = {"binds": 2.0, "masked": 2.0, "prefix_share": 100 / 6, "abs_dev": 0.1}
    assert got == pytest.approx(want)
    # a rule that declares another measure: CISPO's capped share (TIS is CISPO at C = 2)
    train = [{"step": 1, "cispo/capped_fraction": 0.5, "mask/fraction": 0.0},
             {"step": 2, "cispo/capped_fraction": 0.25, "mask/fraction": 0.0}]  # fmt: skip
    got = aggregate.binding_values(train, "cispo/capped_fraction")
    assert got == {"binds": 37.5, "masked": 0.0}
    assert aggregate.binding_values(train, None) == {"masked": 0.0}  # the `none` control
    got = aggregate.binding_values([{"step": 1, "ratio/capped_fraction": 0.01}], None)
    assert got == {"capped": 1.0}
    # a broken last validation counts as 0 in final, last2 and net
    val = [
        {"step": 0, "val/mean": 0.3},
        {"step": 4, "val/mean": 0.5},
        {"step": 8, "val/mean": None},
    ]
    got = aggregate.stability_values(val, t_stop_steps=8)
    assert (got["final"], got["last2"], got["net"], got["mean"]) == (0.0, 25.0, -30.0, 25.0)


def test_stability_and_binding_tables(synth):
    plan, manifest = synth
    aggregate.write_all(plan.matrix.manifest_path, plan.matrix.path("tables"))
    for name in ("stability", "binding"):
        tables.render(manifest, plan.matrix.path("tables"), name)
    stab = pd.read_csv(plan.matrix.path("tables", "stability.csv"))
    a0 = stab[(stab.method == "a") & (stab.seed == 0)].set_index("metric")["value"]
    # A_VALS seed 0: start 10 %, best within T_stop 30 % (step 2), final 90 % (step 8), mean of
    # steps 2, 4, 6 (T_stop = 6 steps) 80 / 3 %
    assert a0.to_dict() == pytest.approx(
        {"start": 10.0, "best": 30.0, "gain": 20.0, "mean": 80 / 3, "final": 90.0,
         "last2": 55.0, "net": 80.0}, abs=1e-4  # the CSV keeps 4 decimals
    )  # fmt: skip
    md = Path(plan.matrix.path("tables", "stability.md")).read_text()
    row_a = next(line for line in md.splitlines() if line.startswith("| Model M | Method A |"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    finals = [90.0, 0.0, 0.0]  # method a's last validations
    hw = 4.303 * statistics.stdev(finals) / math.sqrt(3)
    assert cells[header.index("final")] == f"30.00 ± {hw:.2f}"
    binding = Path(plan.matrix.path("tables", "binding.md")).read_text()
    header = [c.strip() for c in binding.splitlines()[2].strip("|").split("|")]
    row_b = next(ln for ln in binding.splitlines() if ln.startswith("| Model M | Method B |"))
    cells = [c.strip() for c in row_b.strip("|").split("|")]
    # every run logs mask/fraction 0.2 and prefix 0.05: 20 % masked, 25 % of it by the budget
    assert (
        cells[header.index("masked / clipped (% of terms)")]
        == "20.000 ± 0.000 (1/3 collapse, first it. 1)"
    )
    assert cells[header.index("prefix-budget share of masks (%)")].startswith("25.000 ± 0.000")


def test_every_table_is_rendered_from_its_aggregate_csv(synth):
    """tables.TABLES names the tables; the aggregate step writes each one's CSV."""
    plan, manifest = synth
    written = aggregate.write_all(plan.matrix.manifest_path, plan.matrix.path("tables"))
    names = tables.table_names(manifest)
    assert names == ["table1", "table4", "stability", "binding", "posthoc"]
    assert set(aggregate.output_csvs(manifest)) <= set(written)
    for name in names:
        paths = tables.render(manifest, plan.matrix.path("tables"), name)
        assert [p.suffix for p in paths] == [".md", ".tex", ".html"]
    # posthoc only with an evaluation, paper_diff only with the comparison
    other = {**manifest, "evaluation": {**manifest["evaluation"], "checkpoints": []}}
    other["paper_comparison"] = True
    assert tables.table_names(other) == ["table1", "table4", "stability", "binding", "paper_diff"]
    with pytest.raises(ValueError, match="unknown table"):
        tables.render(manifest, plan.matrix.path("tables"), "table2")

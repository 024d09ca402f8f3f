"""The whole DAG end to end.

With stand-in CLIs (tests/pipeline_fakes: same arguments and file formats as cppo.toy,
cppo.train and evaluation) the pipeline's own logic runs in well under a minute: wiring, resume
of a crashed training job, adding a baseline, tables, figures, the HTML report. The last tests
run the real packages on config/ci.yaml (CPU, a few minutes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pipeline_helpers import FAKES, ROOT, SNAKEFILE, env, job_counts, snakemake

CI = ROOT / "config" / "ci.yaml"
METHODS = ["grpo", "cispo", "minpro", "dppo", "trm_max", "trm_avg", "cppo", "none"]
LABELS = [
    "GRPO (clip-higher)", "CISPO", "MinPRO", "DPPO", "TRM-Max", "TRM-Avg", "CPPO",
    "no trust region",
]  # fmt: skip

pytestmark = pytest.mark.slow


def overlay(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def test_fake_dag_tables_figures_report(tmp_path):
    fakes = overlay(tmp_path, "fakes", FAKES)
    ok(snakemake(tmp_path, "--cores", "2", configfiles=[CI, fakes]))
    root = tmp_path / "results" / "ci"
    t1 = pd.read_csv(root / "tables" / "table1.csv")
    assert len(t1) == 8 and set(t1.benchmark) == {"mean"}
    assert t1.value.between(0, 100).all() and (t1.n_samples == 2 * 16).all()
    md = (root / "tables" / "table1.md").read_text()
    assert all(f"| {label} |" in md for label in LABELS)
    t4 = pd.read_csv(root / "tables" / "table4.csv")
    assert len(t4) == 8 and set(t4.benchmark) == {"val"}
    post = pd.read_csv(root / "tables" / "posthoc.csv")
    assert len(post) == 8 and set(post.checkpoint) == {"best"} and set(post.benchmark) == {"test"}
    for name in ("stability", "binding"):
        assert "| toy-s Base | GRPO (clip-higher) |" in (root / "tables" / f"{name}.md").read_text()
    for name in (
        "fig4_validation",
        "binding",
        "fig2_position_deviation",
        "fig7_prefix_budget",
        "diagnostics_toy-s-base",
    ):
        for ext in ("png", "pdf"):
            assert (root / "figures" / f"{name}.{ext}").stat().st_size > 5000
    summary = (root / "summary.md").read_text()
    assert "Table 1" in summary and "fig4_validation.png" in summary
    # the selected checkpoint was evaluated: the fake evaluator names it in the summary
    sel = json.loads((root / "selection" / "toy-s-base" / "cppo" / "seed0.json").read_text())
    summ = json.loads((root / "eval/toy-s-base/cppo/seed0/best/test.summary.json").read_text())
    assert summ["model"] == "results/ci/runs/toy-s-base/cppo/seed0:best"
    assert (tmp_path / sel["best"]["path"]).is_dir()
    # nothing is redone on a second invocation
    proc = snakemake(tmp_path, "-n", configfiles=[CI, fakes])
    ok(proc)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    # the self-contained HTML report with the annotated tables and figures
    ok(snakemake(tmp_path, "--report", "report.html", configfiles=[CI, fakes]))
    html = (tmp_path / "report.html").read_text(errors="replace")
    assert "fig4_validation" in html and "table1" in html
    # as a reader sees it: the report's page, drawn by headless Chromium, is not blank
    from test_table_rendering import CHROMIUM, check_screenshot, chromium

    if CHROMIUM is not None:
        png = tmp_path / "report.png"
        url = (tmp_path / "report.html").as_uri()
        proc = chromium(f"--screenshot={png}", "--window-size=1400,900", url, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        check_screenshot(png)


def test_crashed_training_job_resumes(tmp_path):
    fakes = overlay(tmp_path, "fakes", FAKES)
    small = overlay(
        tmp_path,
        "small",
        {
            "run": {"methods": ["grpo", "cppo"]},
            "models": {"toy-s-base": {"schedule": {"iterations": 4}, "t_stop": 4}},
        },
    )
    cfgs = [CI, fakes, small]
    crash = env(FAKE_TRAIN_FAIL_AT="4")  # after checkpoint-4 of 8 steps
    proc = snakemake(tmp_path, "--cores", "2", "--keep-going", configfiles=cfgs, environ=crash)
    assert proc.returncode != 0
    run = tmp_path / "results/ci/runs/toy-s-base/cppo/seed0"
    assert not (run / "DONE").exists()
    assert (run / "checkpoint-4").is_dir() and (run / "metrics.jsonl").exists()
    first = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(first[-1])["step"] == 4
    # the rerun resumes from the surviving state instead of starting over
    ok(snakemake(tmp_path, "--cores", "2", configfiles=cfgs, environ=crash))
    done = json.loads((run / "DONE").read_text())
    assert done["resumed_from"] == 4
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(first)] == first
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "train"]
    assert steps == list(range(1, 9))
    log = (tmp_path / "results/ci/logs/train/toy-s-base/cppo/seed0.log").read_text()
    assert "seed0: resume" in log and "from step 4 to 8" in log
    attempts = (run / "pipeline_attempts.log").read_text().splitlines()
    assert [a.split(" ", 1)[1] for a in attempts] == [
        "start (fresh)",
        "exit 3",
        "start (resume)",
        "exit 0",
    ]
    # a changed run config does not resume into the old state: it is moved aside
    changed = overlay(tmp_path, "changed", {"methods": {"cppo": {"params": {"gate": "soft"}}}})
    ok(snakemake(tmp_path, "--cores", "2", configfiles=[*cfgs, changed]))
    stale = list(run.parent.glob("seed0.stale-*"))
    assert len(stale) == 1 and (stale[0] / "checkpoint-4").is_dir()
    assert json.loads((run / "DONE").read_text())["resumed_from"] is None


def test_sigterm_stops_the_running_trainings_and_says_no_job_failed(tmp_path):
    # Snakemake alone would wait for every running training, then report that a job failed
    fakes = overlay(tmp_path, "fakes", FAKES)
    small = overlay(tmp_path, "small", {"run": {"methods": ["grpo", "cppo"]}})
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(tmp_path),
           "--cores", "2", "--configfile", str(CI), str(fakes), str(small)]  # fmt: skip
    slow = env(FAKE_TRAIN_STEP_SLEEP="30")  # 6 steps: 3 minutes per training
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=slow, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    runs = tmp_path / "results/ci/runs/toy-s-base"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(runs.glob("*/seed0/metrics.jsonl"))) < 2:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    started = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert time.time() - started < 60, "the trainings ran on after SIGTERM"
    assert proc.returncode != 0
    assert "stopped on SIGTERM" in out and "no job failed" in out
    assert not list(runs.glob("*/seed0/DONE"))
    # the same command continues: the trainings resume and the DAG completes
    ok(snakemake(tmp_path, "--cores", "2", configfiles=[CI, fakes, small]))
    assert len(list(runs.glob("*/seed0/DONE"))) == 2


def test_add_a_baseline_in_one_file_and_one_config_entry(tmp_path):
    pytest.importorskip("cppo.rules")
    fakes = overlay(tmp_path, "fakes", FAKES)
    base = overlay(tmp_path, "base", {"run": {"methods": ["grpo"]}})
    environ = env(tmp_path, FAKE_TRAIN_CHECK_RULE="1")
    ok(snakemake(tmp_path, "--cores", "2", configfiles=[CI, fakes, base], environ=environ))
    # the one file: a rule registered under a new name
    (tmp_path / "my_baseline.py").write_text(
        "from cppo.rules import get_rule, register_rule\n\n"
        "_grpo = get_rule('grpo')\n\n\n"
        "@register_rule('my_baseline')\n"
        "def my_baseline(batch, cfg):\n"
        "    return _grpo.fn(batch, _grpo.resolve({}))\n"
    )
    # the one config entry (plus naming it in run.methods)
    entry = overlay(
        tmp_path,
        "entry",
        {
            "methods": {
                "mine": {"rule": "my_baseline", "module": "my_baseline", "label": "My baseline"}
            },
            "run": {"methods": ["grpo", "mine"]},
        },
    )
    cfgs = [CI, fakes, entry]
    proc = snakemake(tmp_path, "-n", configfiles=cfgs, environ=environ)
    ok(proc)
    assert job_counts(proc.stdout)["train"] == 1  # only the new method trains
    ok(snakemake(tmp_path, "--cores", "2", configfiles=cfgs, environ=environ))
    root = tmp_path / "results" / "ci"
    t1 = pd.read_csv(root / "tables" / "table1.csv")
    assert sorted(t1.method) == ["grpo", "mine"]
    assert "| My baseline |" in (root / "tables" / "table1.md").read_text()
    cfg = yaml.safe_load((root / "configs/toy-s-base/mine/seed0.yaml").read_text())
    assert cfg["method"] == {"rule": "my_baseline", "loss_agg_mode": "token-mean", "horizon": 72}
    assert cfg["imports"] == ["my_baseline"] and len(cfg["rule_code"]) == 16
    # the rule's code is an input of its runs: an edit of the file retrains this method only
    proc = snakemake(tmp_path, "-n", configfiles=cfgs, environ=environ)
    assert "Nothing to be done" in proc.stdout + proc.stderr
    with (tmp_path / "my_baseline.py").open("a") as fh:
        fh.write("# tuned\n")
    proc = snakemake(tmp_path, "-n", configfiles=cfgs, environ=environ)
    ok(proc)
    assert job_counts(proc.stdout)["train"] == 1
    assert "results/ci/runs/toy-s-base/mine/seed0/DONE" in proc.stdout


# --- the real packages -------------------------------------------------------------------------


def _real_stack_missing() -> str | None:
    for module in ("cppo.toy.__main__", "cppo.train", "evaluation.__main__", "cppo.rules"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ModuleNotFoundError:
            return module
    return None


real = pytest.mark.skipif(_real_stack_missing() is not None, reason="toy/train/eval CLIs missing")


@real
def test_ci_config_runs_the_real_dag(tmp_path):
    start = time.perf_counter()
    proc = snakemake(tmp_path, "--cores", "2", configfiles=[CI], timeout=1800)
    print(f"CI-sized end-to-end run: {time.perf_counter() - start:.0f} s")
    ok(proc)
    root = tmp_path / "results" / "ci"
    t1 = pd.read_csv(root / "tables" / "table1.csv")
    assert sorted(t1.method) == sorted(METHODS)
    assert t1.value.between(0, 100).all()
    # the code under test acts: every run learns from groups with reward variance from its
    # first step, gets a non-zero gradient, and every rule binds somewhere (its own measure)
    manifest = json.loads((root / "manifest.json").read_text())
    for method in METHODS:
        path = root / "runs" / "toy-s-base" / method / "seed0" / "metrics.jsonl"
        train = [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]
        assert train[0]["groups/zero_std_fraction"] < 1.0, method
        # the first update is on-policy (rho = 1): nothing is masked, the gradient is the
        # advantage-weighted score and must not vanish
        assert train[0]["grad_norm"] > 0, (method, [r["grad_norm"] for r in train])
        binds = manifest["methods"][method]["binding"]
        if binds is None:
            assert method == "none"
            continue
        assert max(r[binds] or 0.0 for r in train) > 0, (method, binds)
    binding = pd.read_csv(root / "tables" / "binding.csv")
    assert set(binding[binding.metric == "binds"].method) == set(METHODS) - {"none"}
    assert (binding[binding.metric == "binds"].value > 0).all()
    md = (root / "tables" / "table1.md").read_text()
    assert all(f"| {label} |" in md for label in LABELS)
    for name in ("fig4_validation", "diagnostics_toy-s-base", "fig7_prefix_budget"):
        assert (root / "figures" / f"{name}.png").stat().st_size > 5000
    status = pd.read_csv(root / "tables" / "run_status.csv")
    assert status.done.all() and (status.n_validations >= 2).all()


@real
def test_killed_real_training_job_resumes(tmp_path):
    longer = overlay(
        tmp_path,
        "longer",
        {
            "run": {"methods": ["cppo"]},
            "models": {"toy-s-base": {"schedule": {"iterations": 8}, "t_stop": 8}},
            "evaluation": {"enabled": False},
        },
    )
    target = "results/ci/runs/toy-s-base/cppo/seed0/DONE"  # relative to the working directory
    run = tmp_path / "results/ci/runs/toy-s-base/cppo/seed0"
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(SNAKEFILE),
        "-d",
        str(tmp_path),
        "--cores",
        "2",
        target,
        "--configfile",
        str(CI),
        str(longer),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    from cppo.training.checkpoints import is_complete

    def saved_steps() -> list[int]:
        # complete checkpoints only: a kill while one is being written leaves a partial one,
        # which a resume rightly ignores
        return sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if is_complete(p))

    deadline = time.time() + 1200
    try:
        while time.time() < deadline and not saved_steps():
            if proc.poll() is not None:
                pytest.fail("snakemake ended before the first checkpoint")
            time.sleep(0.2)
        assert saved_steps(), "no checkpoint within the time limit"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a hard crash of snakemake and its job
        proc.wait()
    assert not (run / "DONE").exists()
    saved = saved_steps()
    # a hard kill leaves Snakemake's lock behind: unlock, then rerun the same command
    ok(snakemake(tmp_path, "--unlock", target, configfiles=[CI, longer]))
    proc = snakemake(
        tmp_path,
        "--cores",
        "2",
        "--rerun-incomplete",
        target,
        configfiles=[CI, longer],
        timeout=1800,
    )
    ok(proc)
    done = json.loads((run / "DONE").read_text())
    assert done["resumed_from"] is not None
    assert int(done["resumed_from"].split("-")[1]) >= saved[0]
    steps = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x)["kind"] == "train"
    ]
    assert steps == list(range(1, 17))

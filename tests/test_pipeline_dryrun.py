"""Snakemake dry runs of every shipped config, lint, config errors, the SLURM profile."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pipeline_helpers import ROOT, job_counts, snakemake

EXPECTED = {
    # config: the job counts that define its matrix
    "toy": {
        "train": 48,
        "run_config": 48,
        "evaluate": 48,  # one job per run evaluates its best and final checkpoints
        "select_checkpoints": 48,
        "toy_warm_start": 1,  # shared by both columns
        "toy_init_model": 1,
        "figure": 6,
        "render_table": 5,
    },
    "toy-full": {
        "train": 96,
        "evaluate": 96,
        "toy_warm_start": 4,
        "toy_init_model": 3,
        "figure": 8,
        "render_table": 5,
    },
    "paper": {
        "train": 28,
        "evaluate": 28,
        "hub_prefetch": 4,
        "export_benchmark": 3,
        "dapo_math_17k": 1,
        "figure": 8,
        "render_table": 6,
    },
    "ablations": {"train": 30, "figure": 8, "render_table": 4},
    "conventions": {"train": 12, "figure": 6, "render_table": 4},
    "ci": {"train": 8, "evaluate": 8, "figure": 5, "render_table": 5},
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_dry_run(name, tmp_path):
    proc = snakemake(tmp_path, "-n", configfiles=[ROOT / "config" / f"{name}.yaml"])
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    counts = job_counts(proc.stdout)
    for rule, n in EXPECTED[name].items():
        assert counts.get(rule, 0) == n, (rule, counts)
    assert "evaluate" in counts or name in ("ablations", "conventions")
    assert counts["all"] == 1
    assert f"results/{name}/" in proc.stdout


def test_default_config_is_the_toy_one(tmp_path):
    proc = snakemake(tmp_path, "-n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results/toy/" in proc.stdout and "results/ci/" not in proc.stdout
    assert job_counts(proc.stdout)["train"] == 48


def test_configfile_replaces_the_default(tmp_path):
    # Snakemake would merge --configfile into the default; the Snakefile must not
    proc = snakemake(tmp_path, "-n", configfiles=[ROOT / "config" / "paper.yaml"])
    assert proc.returncode == 0
    assert "toy-s-2up" not in proc.stdout and "results/toy/" not in proc.stdout


@pytest.mark.parametrize("name", ["toy", "paper"])
def test_lint_is_clean(name, tmp_path):
    proc = snakemake(tmp_path, "--lint", configfiles=[ROOT / "config" / f"{name}.yaml"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_broken_config_stops_snakemake_naming_the_key(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "toy.yaml").read_text())
    cfg["models"]["toy-s-2up"]["schedule"]["prompt_per_iter"] = 16
    # an override of the catalogue's cppo entry
    cfg.setdefault("methods", {})["cppo"] = {"params": {"w_mni": 0.8}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", configfiles=[bad])
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "models.toy-s-2up.schedule: unknown key 'prompt_per_iter'" in out
    # schema errors are reported first; fix them and the rule's own check names the param
    del cfg["models"]["toy-s-2up"]["schedule"]["prompt_per_iter"]
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", configfiles=[bad])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "methods.cppo.params (model toy-s-2up)" in out and "w_mni" in out


def test_slurm_profile_dry_run(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["retries"] >= 1
    # the README's pip set-up has no conda: the profile as shipped asks for none
    assert "software-deployment-method" not in profile
    proc = snakemake(
        tmp_path, "-n", "--profile", str(ROOT / "profiles" / "slurm"),
        configfiles=[ROOT / "config" / "paper.yaml"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # the README's dry-run line states what this prints
    readme = (ROOT / "README.md").read_text()
    stated = re.search(r"--configfile config/paper.yaml\s+# (\d+) jobs, (\d+) trainings", readme)
    counts = job_counts(out)
    assert stated and (int(stated[1]), int(stated[2])) == (counts["total"], counts["train"])
    assert "gpu=8" in out and "slurm_partition=<GPU_PARTITION>" in out
    assert "runtime=2880" in out  # the training wall time from the config
    assert "accelerate launch --num_processes 8 --config_file" in out
    # the 30B model on verl: two 8-GPU nodes, one task per node (the Ray head and a worker),
    # the verl train command inside the Ray cluster, the verl env
    assert "gpu=16, nodes=2, tasks_per_node=1, cpus_per_task=64, mpi=srun" in out
    assert "-- bash cppo/backends/verl/ray_slurm.sh python -m cppo.backends.verl.train" in out
    assert "results/paper/runs/Qwen3-30B-A3B-Base/cppo/seed0/DONE" in out
    # the resource check ran at parse time and printed its table; every paper method runs on
    # verl (the Top-K ones through the Top-K route), so nothing is refused
    assert "Per-GPU memory of one training job" in proc.stderr
    assert "Qwen3-30B-A3B-Base  verl     2x8" in proc.stderr
    assert "refused" not in proc.stderr and "stop at start" not in proc.stderr


def test_infeasible_gpu_config_stops_snakemake_naming_the_model(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    cfg["models"]["Qwen3-8B-Base"]["schedule"]["micro_batch"] = 32  # the whole share per pass
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", configfiles=[bad])
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "models.Qwen3-8B-Base: needs" in out and "in the update phase" in out
    assert "lower models.Qwen3-8B-Base.schedule.micro_batch" in out


def test_local_profile_is_valid_yaml():
    profile = yaml.safe_load((ROOT / "profiles" / "local" / "config.yaml").read_text())
    assert profile["cores"] == "all" and profile["rerun-incomplete"] is True


def test_results_go_under_the_profile(tmp_path):
    proc = snakemake(tmp_path, "-n", "--config", "profile=my-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "results/my-run/tables/table1.md" in proc.stdout
    assert not Path(tmp_path / "results").exists()  # a dry run writes nothing

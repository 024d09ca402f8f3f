"""What a user gets for the slips a new user makes: a one-line error naming the file, key or
directory, or the behaviour they expect, never a traceback or a late failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cppo.pipeline.config import ConfigError, load_config, validate
from cppo.run.config import RunConfigError, load_run_config, validate_run_config

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / "config" / "ci.yaml"


def run_yaml(tmp_path: Path, **over) -> dict:
    cfg = {
        "output_dir": str(tmp_path / "run"),
        "model": str(tmp_path / "no-such-model"),
        "train_data": str(tmp_path / "train.jsonl"),
        "method": {"rule": "grpo"},
        "schedule": {"prompts_per_iter": 2, "n": 2, "minibatch": 1, "updates_per_iter": 2,
                     "iterations": 1, "max_completion_length": 8},
    }  # fmt: skip
    cfg.update(over)
    return cfg


def test_malformed_yaml_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("profile: x\nrun:\n  models: [a\n  methods: b\n")
    out = subprocess.run(
        [sys.executable, "-m", "cppo.pipeline", "validate", str(bad)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{bad}:4:" in out.stderr and "not valid YAML" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 2  # the header and the one problem
    (tmp_path / "run.yaml").write_text("output_dir: [x\n")
    with pytest.raises(RunConfigError, match=r"run.yaml: .*run.yaml:2:\d+: not valid YAML"):
        load_run_config(tmp_path / "run.yaml")


def test_a_yaml_1_2_float_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) and Snakemake's reader leave 2e-5 a string; it is a number here
    over = tmp_path / "lr.yaml"
    over.write_text("schedule:\n  learning_rate: 2e-5\n")
    assert validate(load_config(CI, over))["schedule"]["learning_rate"] == 2e-5
    raw = load_config(CI)
    raw["schedule"]["learning_rate"] = "2e-5"  # as Snakemake's --configfile reader leaves it
    assert validate(raw)["schedule"]["learning_rate"] == 2e-5
    raw["schedule"]["learning_rate"] = "fast"  # not a number at all: still an error by key
    with pytest.raises(ConfigError, match="schedule.learning_rate: expected"):
        validate(raw)
    cfg = run_yaml(tmp_path)
    cfg["schedule"]["learning_rate"] = "3e-4"
    assert validate_run_config(cfg)["schedule"]["learning_rate"] == 3e-4
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_yaml(tmp_path)).replace(
        "iterations: 1", "iterations: 1\n  learning_rate: 1E-3"))  # fmt: skip
    assert load_run_config(tmp_path / "run.yaml")["schedule"]["learning_rate"] == 1e-3


def test_a_toy_preset_typo_fails_validation_not_the_run():
    raw = load_config(CI)
    raw["models"]["toy-s-base"]["toy"]["preset"] = "toy-xs"
    with pytest.raises(ConfigError, match=r"models.toy-s-base.toy.preset: 'toy-xs' is not one"):
        validate(raw)
    raw["models"]["toy-s-base"]["toy"].update(preset="toy-s", flavour="chat")
    with pytest.raises(ConfigError, match=r"models.toy-s-base.toy.flavour: 'chat' is not one"):
        validate(raw)


def test_a_missing_local_model_directory_is_named(tmp_path):
    from cppo.hub import resolve_model

    missing = tmp_path / "models" / "warm" / "toy-s-base-s0"
    with pytest.raises(ValueError, match=rf"model directory '{missing}' does not exist"):
        resolve_model(str(missing), None)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is not a directory"):
        resolve_model(str(tmp_path / "file"), None)


def test_a_failed_start_does_not_lock_the_run_directory(tmp_path):
    # the first start fails (no model); the corrected run.yaml is not refused as "another
    # configuration": no checkpoint ties the directory to the first one
    pytest.importorskip("trl")
    from cppo.training.run import run_training

    first = validate_run_config(run_yaml(tmp_path))
    with pytest.raises(RunConfigError, match="does not exist"):
        run_training(first)
    assert (tmp_path / "run" / "config.resolved.yaml").exists()
    fixed = validate_run_config(run_yaml(tmp_path, seed=7))
    with pytest.raises(RunConfigError, match="does not exist"):  # still no model, but not refused
        run_training(fixed)
    assert yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())["seed"] == 7


def test_publish_goes_online_once_wandb_has_credentials(tmp_path, monkeypatch):
    from cppo.pipeline.publish import resolve_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_mode("auto") == "offline"
    # what `wandb login` writes
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password k" + "0" * 39)
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"  # an explicit mode is kept
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    (tmp_path / ".netrc").unlink()
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"
    cfg = validate(load_config(ROOT / "config" / "toy.yaml"))
    assert cfg["publish"]["wandb"]["mode"] == "auto"


def test_the_readme_example_run_yaml_reads_what_the_parts_commands_write():
    import re
    import shlex

    readme = (ROOT / "README.md").read_text()
    parts = readme.split("## The parts, one command each", 1)[1].split("```", 2)[1]
    outs = {}
    for line in parts.splitlines():
        if not line.startswith("python -m cppo.toy"):
            continue
        words = shlex.split(line.split("#")[0])
        if "--out" in words:
            outs[words[3]] = words[words.index("--out") + 1]
    example = re.search(r"python -m cppo.train --config (\S+)", parts)[1]
    cfg = load_run_config(ROOT / example)
    assert cfg["model"] == outs["warm-start"]
    assert cfg["train_data"] == f"{outs['data']}/train.jsonl"
    assert cfg["validation"]["benchmarks"] == [f"{outs['data']}/val.jsonl"]

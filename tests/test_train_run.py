"""Run directory, kill-and-resume, in-loop validation and the CLI on a tiny model (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import RULE_EXTRA_KEYS, metrics_records
from transformers import AutoModelForCausalLM, TrainerCallback

from cppo.run.config import validate_run_config
from cppo.run.metrics import TRAIN_KEYS
from cppo.training.run import run_training
from evaluation.testing import make_tiny_model, write_train_jsonl

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = root / "model"
    make_tiny_model(model, hidden_size=32, num_hidden_layers=2)
    data = write_train_jsonl(root / "train.jsonl", 8)  # 2 iterations per epoch: runs cross epochs
    bench = root / "val.jsonl"
    bench.write_text(
        "".join(
            json.dumps({"id": str(i), "problem": f"{i}+1", "answer": str(i + 1)}) + "\n"
            for i in range(3)
        )
    )
    return model, data, bench


def parity_reward(prompts, completions, completion_ids, **kwargs):
    return [1.0 if ids[0] % 2 == 0 else -1.0 for ids in completion_ids]


def config(assets, out, **over):
    model, data, _ = assets
    raw = {
        "output_dir": str(out),
        "model": str(model),
        "train_data": str(data),
        "method": {"rule": "cppo"},
        "schedule": {
            "prompts_per_iter": 4,
            "n": 4,
            "minibatch": 2,
            "updates_per_iter": 2,
            "iterations": 4,
            "max_completion_length": 8,
            "micro_batch": 4,
            "learning_rate": 2e-2,
        },
        "save_every": 2,
        "diagnostics": {"deviation_bins": 2},
    }
    raw.update(over)
    return validate_run_config(raw)


class CrashAfter(TrainerCallback):
    """Simulates a killed job: dies right after step `step` was logged (after its metrics record)."""

    def __init__(self, step):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step and logs and "loss" in logs:
            raise KeyboardInterrupt("simulated kill")


def stub_validation(model, tokenizer, benchmarks, **kw):
    # consumes RNG on purpose: validation must not perturb the training streams
    torch.rand(1000)
    value = float(sum(p.double().abs().sum() for p in model.parameters())) % 1.0
    return {"stub": {"avg_at_k": value}}


def strip_time(records):
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records
    ]


def test_kill_and_resume_gives_identical_metrics(assets, tmp_path):
    val = {"every": 2, "benchmarks": ["stub"], "k": 2}
    full = run_training(
        config(assets, tmp_path / "full", validation=val),
        validation_fn=stub_validation,
        reward_funcs=[parity_reward],
        progress=False,
    )
    plain = run_training(
        config(assets, tmp_path / "plain"), reward_funcs=[parity_reward], progress=False
    )
    cfg = config(assets, tmp_path / "killed", validation=val)
    with pytest.raises(KeyboardInterrupt):
        # dies in the second epoch (step 5), one step after checkpoint-4
        run_training(
            cfg,
            validation_fn=stub_validation,
            reward_funcs=[parity_reward],
            callbacks=[CrashAfter(5)],
            progress=False,
        )
    assert not (tmp_path / "killed" / "DONE").exists()
    assert max(r["step"] for r in metrics_records(tmp_path / "killed" / "metrics.jsonl")) == 5
    run_training(cfg, validation_fn=stub_validation, reward_funcs=[parity_reward], progress=False)

    ref = metrics_records(full / "metrics.jsonl")
    got = metrics_records(tmp_path / "killed" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in ref] == [(r["kind"], r["step"]) for r in got]
    assert strip_time(ref) == strip_time(got)
    assert [r["step"] for r in ref if r["kind"] == "validation"] == [0, 2, 4, 6, 8]
    # validation did not change training (its RNG use is isolated)
    train_ref = [r for r in strip_time(ref) if r["kind"] == "train"]
    assert train_ref == strip_time(metrics_records(plain / "metrics.jsonl"))
    # the run learned something: the policy moved
    assert any(r["ratio/abs_dev_mean"] > 0 for r in train_ref)
    done = json.loads((tmp_path / "killed" / "DONE").read_text())
    assert done["steps"] == 8 and done["resumed_from"] == "checkpoint-4"
    m1 = AutoModelForCausalLM.from_pretrained(full / "final")
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "killed" / "final")
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


def test_validation_through_the_evaluation_package(assets, tmp_path):
    pytest.importorskip("evaluation.runner")
    _, _, bench = assets
    cfg = config(
        assets,
        tmp_path / "run",
        schedule={
            "prompts_per_iter": 4,
            "n": 4,
            "minibatch": 2,
            "updates_per_iter": 2,
            "iterations": 1,
            "max_completion_length": 8,
            "micro_batch": 8,
        },
        validation={
            "every": 1,
            "benchmarks": [str(bench)],
            "k": 2,
            "max_new_tokens": 6,
            "batch_size": 8,
        },
    )
    run_dir = run_training(cfg, progress=False)
    vals = [r for r in metrics_records(run_dir / "metrics.jsonl") if r["kind"] == "validation"]
    assert [v["step"] for v in vals] == [0, 1, 2]
    for v in vals:
        assert set(v) == {"kind", "step", "val/val", "val/mean", "val/k"}
        assert v["val/k"] == 2 and 0.0 <= v["val/val"] <= 1.0 and v["val/mean"] == v["val/val"]


def test_resume_refuses_a_different_config(assets, tmp_path):
    from cppo.run.config import RunConfigError, dump_run_config

    cfg = config(assets, tmp_path / "run")
    (tmp_path / "run").mkdir()
    other = dict(cfg, seed=1)
    dump_run_config(other, tmp_path / "run" / "config.resolved.yaml")
    # a complete checkpoint ties the directory to its configuration (a directory without one,
    # a failed start, takes the new configuration: tests/test_user_errors.py)
    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir()
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json"):  # fmt: skip
        (ckpt / name).write_text("{}")
    with pytest.raises(RunConfigError, match=r"\['seed'\]"):
        run_training(cfg, progress=False)


def _cli(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [sys.executable, "-m", "cppo.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_end_to_end(assets, tmp_path):
    cfg = config(
        assets,
        tmp_path / "run",
        schedule={
            "prompts_per_iter": 4,
            "n": 4,
            "minibatch": 2,
            "updates_per_iter": 2,
            "iterations": 2,
            "max_completion_length": 8,
        },
    )
    raw = {k: v for k, v in cfg.items() if k not in ("run_name", "method_name")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    res = _cli(["--config", "run.yaml", "--no-progress"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    for name in (
        "metrics.jsonl",
        "config.resolved.yaml",
        "DONE",
        "checkpoint-4",
        "final",
    ):
        assert (run / name).exists(), name
    # keep_checkpoints: 1 rotated checkpoint-2 away
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"]
    records = metrics_records(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert set(records[0]) == {
        "kind",
        "step",
        *TRAIN_KEYS,
        *(f"deviation/bin{i}/{s}" for i in range(2) for s in ("mean", "top10")),
        *RULE_EXTRA_KEYS["cppo"],
    }
    assert (
        yaml.safe_load((run / "config.resolved.yaml").read_text())["run_name"] == "model__cppo__s0"
    )
    AutoModelForCausalLM.from_pretrained(run / "final")
    again = _cli(["--config", "run.yaml"], tmp_path)  # already done: a no-op
    assert again.returncode == 0 and len(metrics_records(run / "metrics.jsonl")) == 4

    raw["schedule"]["minibach"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    bad = _cli(["--config", "bad.yaml"], tmp_path)
    assert bad.returncode == 2 and "schedule: unknown key 'minibach'" in bad.stderr
    assert "did you mean 'minibatch'" in bad.stderr


def test_wandb_offline_run_is_named_and_resumable(assets, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    # another test in this process may have set up wandb already: start from a clean library state
    wandb.teardown()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = config(
        assets,
        tmp_path / "run",
        report_to="wandb",
        schedule={
            "prompts_per_iter": 4,
            "n": 4,
            "minibatch": 2,
            "updates_per_iter": 2,
            "iterations": 1,
            "max_completion_length": 8,
            "micro_batch": 8,
        },
    )
    run_dir = run_training(cfg, reward_funcs=[parity_reward], progress=False)
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(os.environ["WANDB_RUN_ID"])
    assert cfg["run_name"] == "model__cppo__s0"

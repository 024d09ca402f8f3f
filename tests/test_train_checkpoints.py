"""What a run keeps on disk: rotated full checkpoints, model-only snapshots at validated steps,
resume after rotation, and the post-hoc selection of best / final (tiny model, CPU)."""

from __future__ import annotations

import filecmp
import json
import os
import sys

import pytest
import torch
from conftest import metrics_records
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from cppo.pipeline import jobs
from cppo.run import directory as runs
from cppo.run.config import RunConfigError, validate_run_config
from cppo.training.checkpoints import CHECKPOINT_FILES as FILES
from cppo.training.checkpoints import (
    CheckpointPolicy,
    last_checkpoint,
    missing_files,
    prune_to_best,
    rotate_checkpoints,
    snapshot_steps,
    validated_step,
)
from cppo.training.run import run_training
from evaluation.testing import make_tiny_model, write_train_jsonl

torch.set_num_threads(1)

SCHEDULE = {
    "prompts_per_iter": 4,
    "n": 4,
    "minibatch": 2,
    "updates_per_iter": 2,
    "iterations": 4,  # 8 optimizer steps
    "max_completion_length": 8,
    "micro_batch": 4,
    "learning_rate": 2e-2,
}
VALIDATION = {"every": 2, "benchmarks": ["stub"], "k": 2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = root / "model"
    make_tiny_model(model, hidden_size=32, num_hidden_layers=2)
    data = write_train_jsonl(root / "train.jsonl", 8)
    return model, data


def config(assets, out, **over):
    model, data = assets
    raw = {
        "output_dir": str(out),
        "model": str(model),
        "train_data": str(data),
        "method": {"rule": "cppo"},
        "schedule": dict(SCHEDULE),
        "validation": dict(VALIDATION),
        "save_every": 2,
        "diagnostics": {"deviation_bins": 2},
    }
    raw.update(over)
    return validate_run_config(raw)


def parity_reward(prompts, completions, completion_ids, **kwargs):
    return [1.0 if ids[0] % 2 == 0 else -1.0 for ids in completion_ids]


def weights_validation(model, tokenizer, benchmarks, **kw):
    """A deterministic function of the weights (so a resumed run scores a step the same)."""
    value = float(sum(p.double().abs().sum() for p in model.parameters())) % 1.0
    return {"stub": {"avg_at_k": value}}


def scripted_validation(values):
    """Validation means in call order (steps 0, 2, 4, ...)."""
    it = iter(values)

    def fn(model, tokenizer, benchmarks, **kw):
        return {"stub": {"avg_at_k": next(it)}}

    return fn


class CrashAfter(TrainerCallback):
    """A killed job: dies right after step `step` was logged (before its validation and save)."""

    def __init__(self, step):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step and logs and "loss" in logs:
            raise KeyboardInterrupt("simulated kill")


def train(cfg, validation_fn=weights_validation, callbacks=None):
    return run_training(
        cfg,
        validation_fn=validation_fn,
        reward_funcs=[parity_reward],
        callbacks=callbacks,
        progress=False,
    )


def checkpoint_dirs(run_dir):
    return sorted(p.name for p in run_dir.glob("checkpoint-*"))


def tensors(path):
    return load_file(path / "model.safetensors")


def no_time(records):
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in records
    ]


# --- units -----------------------------------------------------------------------------------


CHECKPOINT_FILES = (
    "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
)  # fmt: skip


def _fake_checkpoint(run_dir, step, complete=True):
    d = run_dir / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name in CHECKPOINT_FILES if complete else CHECKPOINT_FILES[:2]:
        (d / name).write_text("{}")
    return d


@pytest.mark.parametrize("lost", ["optimizer.pt", "model.safetensors", "scheduler.pt"])
def test_a_checkpoint_missing_a_file_is_refused_and_the_previous_one_used(tmp_path, lost, caplog):
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 8)
    (tmp_path / "checkpoint-8" / lost).unlink()
    assert missing_files(tmp_path / "checkpoint-8") == [
        next(" or ".join(n) for _, n in FILES if lost in n)
    ]
    with caplog.at_level("WARNING"):
        assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert "checkpoint-8 lacks" in caplog.text and lost in caplog.text
    assert "previous complete checkpoint" in caplog.text
    # a save cut by a kill (no trainer_state.json yet) is passed over silently
    caplog.clear()
    (tmp_path / "checkpoint-8" / "trainer_state.json").unlink()
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4" and "lacks" not in caplog.text
    # DeepSpeed keeps its optimizer shards in global_step*/ instead of optimizer.pt
    ds = _fake_checkpoint(tmp_path, 12)
    (ds / "optimizer.pt").unlink()
    (ds / "global_step12").mkdir()
    assert missing_files(ds) == [] and last_checkpoint(tmp_path) == ds


def test_rotation_keeps_the_newest_complete_checkpoints_by_step(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False), (8, False), (10, True)):
        _fake_checkpoint(tmp_path, step, complete)
    (tmp_path / "checkpoint-x").mkdir()  # not a trainer checkpoint: left alone
    (tmp_path / "snapshots" / "step-2").mkdir(parents=True)
    # mtimes opposite to the steps: the order must come from the step numbers
    for i, step in enumerate((10, 8, 6, 4, 2)):
        os.utime(tmp_path / f"checkpoint-{step}", (1_000_000 + i * 100, 1_000_000 + i * 100))
    assert rotate_checkpoints(tmp_path, None) == []
    assert len(list(tmp_path.glob("checkpoint-*"))) == 6
    removed = rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert checkpoint_dirs(tmp_path) == ["checkpoint-10", "checkpoint-4", "checkpoint-x"]
    assert [p.name for p in rotate_checkpoints(tmp_path, 1)] == ["checkpoint-4"]
    assert checkpoint_dirs(tmp_path) == ["checkpoint-10", "checkpoint-x"]
    assert (tmp_path / "snapshots" / "step-2").is_dir()


def test_prune_to_best_keeps_the_selection_s_best(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    vals = {0: 0.2, 2: 0.5, 4: 0.5, 6: 0.9, 8: None}
    metrics.write_text(
        "".join(
            json.dumps({"kind": "validation", "step": s, "val/mean": v}) + "\n"
            for s, v in vals.items()
        )
    )
    for s in (2, 4, 6):
        runs.snapshot_dir(tmp_path, s).mkdir(parents=True)
    # records up to step 4: 2 and 4 tie at 0.5, the earliest wins; 6 is not committed yet
    assert prune_to_best(tmp_path, metrics, 4, None) == [4]
    assert snapshot_steps(tmp_path) == [2, 6]
    # a window ending before 6 keeps 2 although 6 scores higher
    assert prune_to_best(tmp_path, metrics, 8, 5) == [6]
    assert snapshot_steps(tmp_path) == [2]
    # the initial model is the best: no snapshot is needed
    metrics.write_text(json.dumps({"kind": "validation", "step": 0, "val/mean": 1.0}) + "\n")
    assert prune_to_best(tmp_path, metrics, 8, None) == [2]
    assert snapshot_steps(tmp_path) == []


def test_snapshot_steps_are_the_validated_steps_before_the_last():
    val = {"every": 4, "benchmarks": ["b"]}
    assert [s for s in range(11) if validated_step(s, 10, val)] == [4, 8, 10]
    assert not any(validated_step(s, 10, {"every": 0, "benchmarks": ["b"]}) for s in range(11))
    assert not any(validated_step(s, 10, {"every": 4, "benchmarks": []}) for s in range(11))

    def policy(mode, within):
        return CheckpointPolicy(
            None,
            None,
            keep_checkpoints=1,
            snapshots=mode,
            snapshot_dtype=torch.float32,
            best_within=within,
            validation=val,
            metrics_path=None,
        )

    def wanted(p):
        return [s for s in range(11) if p.wants_snapshot(s, 10)]

    assert wanted(policy("all", 4)) == [4, 8]  # 10 is final/
    assert wanted(policy("best", None)) == [4, 8]
    assert wanted(policy("best", 5)) == [4]  # 8 is outside the selection window
    assert wanted(policy("none", None)) == []


def test_run_config_keys():
    base = {
        "output_dir": "o",
        "model": "m",
        "train_data": "d",
        "method": {"rule": "cppo"},
        "schedule": dict(SCHEDULE),
    }
    cfg = validate_run_config(base)
    assert (cfg["keep_checkpoints"], cfg["snapshots"], cfg["snapshot_best_within"]) == (
        1,
        "best",
        None,
    )
    assert cfg["snapshot_dtype"] == "float32"  # auto on an fp32 (CPU) run
    gpu = validate_run_config({**base, "bf16": True, "use_cpu": False})
    assert gpu["snapshot_dtype"] == "bfloat16"
    assert validate_run_config({**base, "keep_checkpoints": "all"})["keep_checkpoints"] == "all"
    for bad in (0, "some"):
        with pytest.raises(
            RunConfigError, match=r"keep_checkpoints: .* is not a valid value \(a positive number"
        ):
            validate_run_config({**base, "keep_checkpoints": bad})
    with pytest.raises(RunConfigError, match=r"snapshots: 'every' is not one of"):
        validate_run_config({**base, "snapshots": "every"})
    with pytest.raises(RunConfigError, match=r"snapshot_dtype: 'float16' is not one of"):
        validate_run_config({**base, "snapshot_dtype": "float16"})
    with pytest.raises(RunConfigError, match=r"'save_total_limit' is now 'keep_checkpoints'"):
        validate_run_config({**base, "save_total_limit": 2})


# --- runs ------------------------------------------------------------------------------------


def test_snapshots_equal_the_checkpointed_weights_and_rotation_changes_nothing(assets, tmp_path):
    every = train(config(assets, tmp_path / "all", keep_checkpoints="all", snapshots="all"))
    rotated = train(config(assets, tmp_path / "rotated", snapshots="all"))

    val_steps = [
        r["step"] for r in metrics_records(every / "metrics.jsonl") if r["kind"] == "validation"
    ]
    assert val_steps == [0, 2, 4, 6, 8]
    assert checkpoint_dirs(every) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
        "checkpoint-8",
    ]
    assert checkpoint_dirs(rotated) == ["checkpoint-8"]  # keep_checkpoints: 1
    # a snapshot at every validated step but the first (the initial model) and the last (final/)
    assert snapshot_steps(every) == snapshot_steps(rotated) == [2, 4, 6]
    # what is kept on disk does not change the run
    assert no_time(metrics_records(every / "metrics.jsonl")) == no_time(
        metrics_records(rotated / "metrics.jsonl")
    )
    for step in (2, 4, 6):
        snap = runs.snapshot_dir(rotated, step)
        got, ref = tensors(snap), tensors(every / f"checkpoint-{step}")
        assert set(got) == set(ref)
        for name, tensor in got.items():
            # fp32 run -> fp32 snapshot, bit for bit the weights of the full checkpoint
            assert tensor.dtype == torch.float32 and torch.equal(tensor, ref[name]), name
        assert json.loads((snap / "config.json").read_text())["dtype"] == "float32"
        # byte for byte the model part of the full checkpoint: the toy evaluation of a snapshot
        # reads exactly what it read from checkpoint-<step>/ before
        files = sorted(p.name for p in snap.iterdir())
        assert "model.safetensors" in files and "tokenizer.json" in files
        for name in files:
            assert filecmp.cmp(snap / name, every / f"checkpoint-{step}" / name, shallow=False)
        tok = AutoTokenizer.from_pretrained(snap)
        assert tok.get_vocab() == AutoTokenizer.from_pretrained(assets[0]).get_vocab()
    assert not list((rotated / "snapshots").glob(".*"))  # no temporary directories left


def test_bf16_snapshot(assets, tmp_path):
    cfg = config(
        assets,
        tmp_path / "run",
        schedule={**SCHEDULE, "iterations": 2},
        keep_checkpoints="all",
        snapshots="all",
        snapshot_dtype="bfloat16",
    )
    run = train(cfg)
    assert snapshot_steps(run) == [2]
    snap = runs.snapshot_dir(run, 2)
    got, ref = tensors(snap), tensors(run / "checkpoint-2")
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, ref[name].to(torch.bfloat16)), name
    assert json.loads((snap / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(snap, dtype="auto")
    assert model.dtype == torch.bfloat16
    # tied embeddings stay tied: one tensor on disk, as in the checkpoint
    assert set(got) == set(ref) and "lm_head.weight" not in got


def test_best_snapshot_is_what_the_selection_evaluates(assets, tmp_path):
    # validation means at steps 0, 2, 4, 6, 8; T_stop = 4 optimizer steps
    values = [0.1, 0.3, 0.5, 0.9, 0.2]
    cfg = config(assets, tmp_path / "run", snapshot_best_within=4)
    run = train(cfg, validation_fn=scripted_validation(values))
    assert snapshot_steps(run) == [4]  # 6 scores higher but lies outside [0, T_stop]
    assert checkpoint_dirs(run) == ["checkpoint-8"]

    sel = runs.select_checkpoints(run, 4, "init-model")
    assert sel["best"] == {"step": 4, "val_mean": 0.5, "path": str(run / "snapshots" / "step-4")}
    assert sel["final"] == {"step": 8, "path": str(run / "final")}
    # selecting over the whole run would ask for step 6, which the window let go
    with pytest.raises(FileNotFoundError, match="step 6 has no snapshots/step-6/"):
        runs.select_checkpoints(run, 8, "init-model")

    # evaluate-run hands the snapshot and final/ to the evaluation command
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps(sel))
    log = tmp_path / "calls.jsonl"
    record = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')"
    code = jobs.evaluate_run(
        selection, ["best", "final"], tmp_path / "eval", [sys.executable, "-c", record, str(log)]
    )
    assert code == 0
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    models = [c[c.index("--model") + 1] for c in calls]
    assert models == [str(run / "snapshots" / "step-4"), str(run / "final")]
    for path in models:
        AutoModelForCausalLM.from_pretrained(path)


class SnapshotsAtStart(TrainerCallback):
    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.seen = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.seen = snapshot_steps(self.run_dir)


def test_resume_after_rotation_and_an_unsaved_snapshot(assets, tmp_path):
    for mode in ("all", "best"):
        ref = train(config(assets, tmp_path / f"{mode}-full", snapshots=mode))
        cfg = config(assets, tmp_path / f"{mode}-killed", snapshots=mode)
        with pytest.raises(KeyboardInterrupt):
            # killed after step 6 was logged: its snapshot is written, checkpoint-6 is not
            train(cfg, callbacks=[CrashAfter(6)])
        killed = tmp_path / f"{mode}-killed"
        assert checkpoint_dirs(killed) == ["checkpoint-4"]  # checkpoint-2 rotated away
        assert 6 in snapshot_steps(killed)
        probe = SnapshotsAtStart(killed)
        train(cfg, callbacks=[probe])
        # the snapshot of the step being redone is dropped before training resumes
        assert probe.seen is not None and max(probe.seen, default=0) <= 4
        done = json.loads((killed / "DONE").read_text())
        assert done["resumed_from"] == "checkpoint-4" and done["steps"] == 8
        assert no_time(metrics_records(killed / "metrics.jsonl")) == no_time(
            metrics_records(ref / "metrics.jsonl")
        )
        assert checkpoint_dirs(killed) == checkpoint_dirs(ref) == ["checkpoint-8"]
        assert snapshot_steps(killed) == snapshot_steps(ref)
        for step in snapshot_steps(ref):
            a = tensors(runs.snapshot_dir(ref, step))
            b = tensors(runs.snapshot_dir(killed, step))
            assert all(torch.equal(a[k], b[k]) for k in a), (mode, step)
        records = [r for r in metrics_records(ref / "metrics.jsonl") if r["kind"] == "validation"]
        if mode == "best":
            # by hand: the highest mean, the earliest step on ties; step 0 is the initial model
            # and step 8 is final/, neither needs a snapshot
            top = max(r["val/mean"] for r in records)
            best = min(r["step"] for r in records if r["val/mean"] == top)
            assert snapshot_steps(ref) == ([best] if 0 < best < 8 else [])
        else:
            assert snapshot_steps(ref) == [r["step"] for r in records if 0 < r["step"] < 8]


def test_pipeline_run_config_sets_the_best_window_only_when_t_stop_ends_early():
    from pathlib import Path

    from cppo.pipeline.config import load_config
    from cppo.pipeline.plan import Plan

    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "toy.yaml")
    model, method = Plan(cfg).matrix.models[0], Plan(cfg).matrix.methods[0]
    run = Plan(cfg).resolver.run_config(model, method, 0)
    # T_stop == the whole run (toy and paper configs): run.yaml is unchanged
    assert "snapshot_best_within" not in run
    assert validate_run_config(run)["snapshots"] == "best"
    iterations = Plan(cfg).resolver.schedule(model)["iterations"]
    upi = Plan(cfg).resolver.updates_per_iter(model)
    cfg["models"][model]["t_stop"] = iterations // 2
    run = Plan(cfg).resolver.run_config(model, method, 0)
    assert run["snapshot_best_within"] == (iterations // 2) * upi
    assert validate_run_config(run)["snapshot_best_within"] == (iterations // 2) * upi

"""A finished run directory must hold what its DONE marker says: a damaged one (truncated or torn
metrics.jsonl, no final/) is named and refused by the checkpoint selection, the trainer and the
aggregation, never read as if it were complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cppo.run.directory import (
    RunIntegrityError,
    check_integrity,
    integrity_problems,
    select_checkpoints,
    write_done,
)


def finished_run(root: Path, steps: int = 8, every: int = 2) -> Path:
    """A run directory as the trainer leaves it: train records 1..steps, validations every
    `every` steps, final/, DONE."""
    run = root / "run"
    (run / "final").mkdir(parents=True)
    lines = []
    for step in range(steps + 1):
        if step:
            lines.append({"kind": "train", "step": step, "reward/mean": 0.1 * step})
        if step % every == 0:
            lines.append({"kind": "validation", "step": step, "val/mean": 0.3 + 0.01 * step})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_done(run, {"run_name": "x", "steps": steps})
    return run


def test_an_intact_run_has_no_problem(tmp_path):
    run = finished_run(tmp_path)
    assert integrity_problems(run) == []
    check_integrity(run)
    assert select_checkpoints(run, 8, "init")["best"]["step"] == 8
    assert integrity_problems(tmp_path / "unfinished") == []  # no DONE: nothing to check


def test_a_truncated_metrics_file_is_named_and_refused(tmp_path):
    run = finished_run(tmp_path, steps=112)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    cut = next(i for i, x in enumerate(lines) if json.loads(x)["step"] == 67)
    (run / "metrics.jsonl").write_text("\n".join(lines[: cut + 1]) + "\n")
    (problem,) = integrity_problems(run)
    assert problem.endswith("ends at train step 67, but DONE says 112")
    with pytest.raises(RunIntegrityError, match=r"finished run .*run is damaged.*delete"):
        select_checkpoints(run, 112, "init")


@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_torn_line_in_a_finished_run_is_refused(tmp_path, where):
    run = finished_run(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    i = 3 if where == "middle" else len(lines) - 1
    lines[i] = lines[i][: len(lines[i]) // 2]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    problems = integrity_problems(run)
    assert any(f"metrics.jsonl:{i + 1} is not a complete JSON record" in p for p in problems)
    with pytest.raises(RunIntegrityError):
        check_integrity(run)


def test_a_missing_final_or_a_bad_marker_is_named(tmp_path):
    run = finished_run(tmp_path)
    (run / "final").rmdir()
    assert integrity_problems(run) == [f"{run / 'final'} is missing"]
    (run / "DONE").write_text("done\n")
    assert "not the JSON marker" in integrity_problems(run)[0]


def test_the_select_command_says_what_is_wrong_in_one_line(tmp_path):
    run = finished_run(tmp_path)
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    out = subprocess.run(
        [sys.executable, "-m", "cppo.pipeline", "select", "--run-dir", str(run),
         "--t-stop-steps", "8", "--initial-model", "init", "--out", str(tmp_path / "s.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "ends at train step 1, but DONE says 8" in out.stderr


def test_the_trainer_refuses_to_call_a_damaged_run_done(tmp_path):
    pytest.importorskip("trl")
    from cppo.training.run import run_training

    run = finished_run(tmp_path)
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    with pytest.raises(RunIntegrityError, match="DONE says 8"):
        run_training({"output_dir": str(run)})


def test_the_aggregation_does_not_count_a_damaged_run_as_done(tmp_path, capsys):
    from cppo.pipeline.aggregate import RunReader
    from cppo.run.metrics import read_metrics

    manifest = {
        "benchmarks": {},
        "validation": {"k": 4, "benchmarks": []},
        "models": {"m": {"t_stop_steps": 8}},
        "collapse": {"nonfinite_keys": [], "val_fraction": None, "consecutive": 2},
    }
    run = finished_run(tmp_path)
    info = {"model": "m", "method": "a", "seed": 0, "run_dir": str(run)}
    key = {"model": "m", "method": "a", "seed": 0}
    reader = RunReader(manifest)
    assert reader.status_row(key, info, read_metrics(run / "metrics.jsonl"), None)["done"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")
    row = reader.status_row(key, info, read_metrics(run / "metrics.jsonl"), None)
    assert row["done"] is False
    assert "but DONE says 8 (not counted as done)" in capsys.readouterr().err

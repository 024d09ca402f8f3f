"""Runner, outputs, re-grading, in-memory evaluation and the CLI, end to end on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evaluation.backends import Sample
from evaluation.benchmarks import load_benchmark
from evaluation.cli import main as cli_main
from evaluation.runner import (
    SAMPLE_KEYS,
    SUMMARY_KEYS,
    evaluate_benchmark,
    evaluate_model,
    regrade,
    write_outputs,
)
from evaluation.testing import make_char_tokenizer, make_tiny_model

torch.set_num_threads(1)

# Three problems, k = 4 scripted completions each: (text, truncated).
SCRIPT = {
    "2": [
        ("So\nAnswer: 2", False),
        ("Thus $\\boxed{2}$.", False),  # right only for math-verify
        ("Answer: 3", False),
        ("2 + 2 = 4 and then", True),
    ],
    "5": [("Answer: 5", False), ("Answer: 5", False), ("Answer: 5", False), ("Answer: 05", False)],
    "\\frac{1}{2}": [("Answer: 1/3", False), ("", True), ("Answer: 0.5", False), ("nothing", True)],
}


class ScriptedBackend:
    """Returns SCRIPT's completions for each prompt (matched by problem text)."""

    def __init__(self, bench):
        self.tokenizer = make_char_tokenizer()
        self.by_problem = {r["problem"]: SCRIPT[r["answer"]] for r in bench.rows}
        self.name = "scripted"
        self.calls = []

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, seed):
        self.calls.append(dict(n=n, temperature=temperature, top_p=top_p, seed=seed))
        out = []
        for prompt in prompts:
            problem = next(p for p in self.by_problem if p in prompt)
            out.append([Sample(t, len(t) + 1, tr) for t, tr in self.by_problem[problem][:n]])
        return out


@pytest.fixture()
def toy_file(tmp_path) -> Path:
    rows = [
        {"id": "p0", "problem": "What is 1+1?", "answer": "2"},
        {"id": "p1", "problem": "What is 2+3?", "answer": "5"},
        {"id": "p2", "problem": "Half of one?", "answer": "\\frac{1}{2}"},
    ]
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_summary_values_by_hand(toy_file, tmp_path):
    bench = load_benchmark(toy_file)
    backend = ScriptedBackend(bench)
    result = evaluate_benchmark(backend, bench, k=4, max_new_tokens=64, seed=3)
    s = result.summary
    assert tuple(s) == SUMMARY_KEYS
    # both: p0 -> 2/4 (Answer: 2, boxed 2); p1 -> 4/4 (05 via math-verify); p2 -> 1/4 (0.5).
    assert s["avg_at_k"] == pytest.approx((2 / 4 + 4 / 4 + 1 / 4) / 3)
    assert s["pass_at_k"]["1"] == pytest.approx(s["avg_at_k"])
    assert s["pass_at_k"]["4"] == pytest.approx(1.0)
    assert (s["k"], s["n_problems"], s["n_samples"], s["n_truncated"]) == (4, 3, 12, 3)
    assert (s["n_grader_timeouts"], s["n_grader_errors"]) == (0, 0)
    assert (s["temperature"], s["top_p"], s["max_new_tokens"], s["seed"]) == (0.7, 0.95, 64, 3)
    assert s["model"] == "scripted" and s["benchmark"] == "val" and s["grading_mode"] == "both"
    assert s["ci95"][0] <= s["avg_at_k"] <= s["ci95"][1]
    assert backend.calls == [dict(n=4, temperature=0.7, top_p=0.95, seed=3)]

    strict = evaluate_benchmark(backend, bench, k=4, max_new_tokens=64, grading_mode="dapo-strict")
    # dapo-strict: p0 -> 1/4, p1 -> 3/4 ("05" != "5"), p2 -> 0/4.
    assert strict.summary["avg_at_k"] == pytest.approx((1 / 4 + 3 / 4 + 0) / 3)
    assert strict.summary["pass_at_k"]["4"] == pytest.approx(2 / 3)

    summary_path, samples_path = write_outputs(result, tmp_path / "out")
    assert summary_path.name == "val.summary.json" and samples_path.name == "val.samples.jsonl"
    assert json.loads(summary_path.read_text()) == s
    rows = [json.loads(line) for line in samples_path.read_text().splitlines()]
    assert len(rows) == 12 and all(tuple(r) == SAMPLE_KEYS for r in rows)
    assert [r["sample"] for r in rows[:4]] == [0, 1, 2, 3]
    first = rows[0]
    assert (first["id"], first["gold"], first["extracted"], first["correct"]) == (
        "p0",
        "2",
        "2",
        True,
    )

    again = regrade(samples_path)
    assert again.summary == s
    strict_again = regrade(samples_path, grading_mode="dapo-strict")
    assert strict_again.summary["avg_at_k"] == pytest.approx(strict.summary["avg_at_k"])
    assert strict_again.summary["grading_mode"] == "dapo-strict"
    assert strict_again.summary["seed"] == 3  # sampling settings come from the old summary


def test_evaluate_model_in_memory(toy_file):
    model, tok = make_tiny_model(seed=0)
    model.train()
    rng = torch.get_rng_state()
    evaluate_model(
        model,
        tok,
        [str(toy_file)],
        k=2,
        temperature=0.7,
        top_p=0.95,
        max_new_tokens=4,
        seed=0,
        batch_size=8,
    )  # warm: the grader pool starts once
    start = time.monotonic()
    out = evaluate_model(
        model,
        tok,
        [str(toy_file), "aime24"],
        k=4,
        temperature=0.7,
        top_p=0.95,
        max_new_tokens=16,
        seed=0,
        batch_size=64,
    )
    elapsed = time.monotonic() - start
    assert set(out) == {"val", "aime24"}
    assert out["aime24"]["n_samples"] == 120 and out["val"]["n_samples"] == 12
    assert all(tuple(s) == SUMMARY_KEYS for s in out.values())
    assert all(0.0 <= s["avg_at_k"] <= 1.0 for s in out.values())
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert elapsed < 60  # 132 samples of 16 tokens on one CPU thread


def test_cli_end_to_end(toy_file, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    make_tiny_model(model_dir)
    out = tmp_path / "eval"
    code = cli_main(
        [
            "--model", str(model_dir), "--benchmarks", "val,aime25",
            "--benchmark-file", str(toy_file), "--k", "2", "--max-new-tokens", "8",
            "--temperature", "0.7", "--top-p", "0.95", "--backend", "transformers",
            "--seed", "1", "--out", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    for name, n in (("val", 3), ("aime25", 30)):
        summary = json.loads((out / f"{name}.summary.json").read_text())
        assert summary["benchmark"] == name and summary["n_problems"] == n
        assert summary["seed"] == 1 and summary["model"] == str(model_dir)
        assert len((out / f"{name}.samples.jsonl").read_text().splitlines()) == 2 * n
    assert "mean (unweighted)" in capsys.readouterr().out

    regraded = tmp_path / "regraded"
    code = cli_main(
        ["--regrade", str(out / "val.samples.jsonl"), "--grading-mode", "math-verify",
         "--out", str(regraded), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert json.loads((regraded / "val.summary.json").read_text())["grading_mode"] == "math-verify"


def test_evaluate_run_in_process_writes_what_the_subprocess_writes(toy_file, tmp_path, monkeypatch):
    """The pipeline runs the default evaluate command (`python -m evaluation`) in its own
    process; the outputs of two checkpoints in a row equal those of one subprocess each."""
    from cppo.pipeline import jobs

    model_dir = tmp_path / "tiny"
    make_tiny_model(model_dir)
    sel = tmp_path / "selection.json"
    sel.write_text(
        json.dumps(
            {
                "run_dir": "runs/x",
                "best": {"step": 2, "path": str(model_dir)},
                "final": {"step": 4, "path": str(model_dir)},
            }
        )
    )
    args = [
        "--benchmark-file", str(toy_file), "--k", "3", "--max-new-tokens", "8",
        "--temperature", "0.9", "--backend", "transformers", "--sampler", "kv_loop",
        "--seed", "5", "--no-progress",
    ]  # fmt: skip
    calls = []
    real_call = jobs.subprocess.call
    monkeypatch.setattr(jobs.subprocess, "call", lambda cmd: calls.append(cmd) or real_call(cmd))
    inproc, sub = tmp_path / "inproc", tmp_path / "sub"
    assert jobs.evaluate_run(sel, ["best", "final"], inproc, [*jobs.EVALUATION_CLI, *args]) == 0
    assert calls == []
    python = [sys.executable, "-m", "evaluation"]
    assert jobs.evaluate_run(sel, ["best", "final"], sub, [*python, *args]) == 0
    assert len(calls) == 2
    for ckpt in ("best", "final"):
        files = sorted(p.name for p in (sub / ckpt).iterdir())
        assert files == sorted(p.name for p in (inproc / ckpt).iterdir()) and files
        for name in files:
            assert (inproc / ckpt / name).read_text() == (sub / ckpt / name).read_text(), name
    assert jobs.evaluate_run(sel, ["best"], tmp_path / "bad", [*jobs.EVALUATION_CLI, "--k"]) == 2


def test_cli_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "evaluation", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "--benchmark-file" in done.stdout

"""lm-eval-harness tasks aime{24,25,26}_avg16 and the aime_avg16 group."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import evaluation
from evaluation.lm_eval_tasks import utils as task_utils

TASK_DIR = Path(evaluation.__file__).resolve().parent / "lm_eval_tasks"


class _Loader(yaml.SafeLoader):
    pass


_Loader.add_constructor(
    "!function", lambda loader, node: f"!function {loader.construct_scalar(node)}"
)


def _load(name: str) -> dict:
    return yaml.load((TASK_DIR / name).read_text(), Loader=_Loader)


@pytest.mark.parametrize("year", ["24", "25", "26"])
def test_task_yaml_follows_the_paper_protocol(year):
    cfg = _load(f"aime{year}_avg16.yaml")
    assert cfg["task"] == f"aime{year}_avg16"
    assert cfg["repeats"] == 16 and cfg["num_fewshot"] == 0
    gen = cfg["generation_kwargs"]
    assert gen["do_sample"] is True and gen["temperature"] == 0.7 and gen["top_p"] == 0.95
    assert gen["top_k"] == 0
    assert cfg["filter_list"][0]["filter"] == [{"function": "take_first_k", "k": 16}]
    assert cfg["custom_dataset"] == f"!function utils.load_aime{year}"
    assert cfg["process_results"] == "!function utils.process_results"
    assert {m["metric"] for m in cfg["metric_list"]} >= {"avg_at_16", "pass_at_16"}


def test_group_is_the_unweighted_mean():
    cfg = _load("aime_avg16.yaml")
    assert cfg["task"] == ["aime24_avg16", "aime25_avg16", "aime26_avg16"]
    (agg,) = cfg["aggregate_metric_list"]
    assert agg["metric"] == "avg_at_16" and agg["weight_by_size"] is False


def test_task_data_is_the_bundled_set():
    ds = task_utils.load_aime25()["test"]
    assert len(ds) == 30 and ds[0]["answer"] == "70"
    assert task_utils.doc_to_text(ds[0]).startswith("Solve the following math problem")


def test_process_results_grades_all_sixteen():
    doc = {"answer": "204"}
    completions = ["Answer: 204"] * 3 + ["\\boxed{204}"] * 2 + ["Answer: 205"] * 11
    got = task_utils.process_results(doc, [completions])
    assert got == {"avg_at_16": 5 / 16, "pass_at_16": 1.0, "grader_failures": 0.0}
    wrong = task_utils.process_results(doc, [["Answer: 1"] * 16])
    assert wrong["avg_at_16"] == 0.0 and wrong["pass_at_16"] == 0.0


@pytest.mark.slow
def test_lm_eval_runs_the_group_on_a_tiny_cpu_model(tmp_path):
    from evaluation.testing import make_tiny_model

    model_dir = tmp_path / "tiny"
    make_tiny_model(model_dir)
    out = tmp_path / "lm_eval_out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "lm_eval",
        "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32",
        "--device", "cpu",
        "--include_path", str(TASK_DIR),
        "--tasks", "aime_avg16",
        "--limit", "1",
        "--apply_chat_template",
        "--gen_kwargs", "max_gen_toks=12",
        "--batch_size", "16",
        "--output_path", str(out),
        "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    for year in ("24", "25", "26"):
        task = results[f"aime{year}_avg16"]
        assert task["sample_len"] == 1
        assert 0.0 <= task["avg_at_16,all16"] <= 1.0
    assert "avg_at_16,all16" in results["aime_avg16"]

    samples_file = next(out.rglob("samples_aime24_avg16_*.jsonl"))
    (sample,) = [json.loads(line) for line in samples_file.read_text().splitlines()]
    prompt = sample["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|im_start|>user\nSolve the following math problem")
    assert prompt.endswith("<|im_start|>assistant\n")
    (responses,) = sample["resps"]
    assert len(responses) == 16
    assert len(set(responses)) > 1  # sampled, not greedy
    # The logged metric is our grader's verdict on the logged responses.
    expected = task_utils.process_results(sample["doc"], [responses])["avg_at_16"]
    assert sample["avg_at_16"] == pytest.approx(expected)

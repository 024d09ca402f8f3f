"""The toy task generator: determinism, disjoint splits, correct worked solutions."""

from __future__ import annotations

import json
import re

import pytest

from cppo.toy.task import (
    Problem,
    TaskConfig,
    check_disjoint,
    generate_splits,
    read_jsonl,
    verify_data_dir,
    write_data,
)
from evaluation.dapo import dapo_correct, dapo_reward, extract_answer, format_prompt

SIZES = {"train": 400, "val": 60, "test": 60}


@pytest.fixture(scope="module")
def splits():
    return generate_splits(TaskConfig(), SIZES, seed=11)


def test_deterministic():
    a = generate_splits(TaskConfig(), SIZES, seed=5)
    b = generate_splits(TaskConfig(), SIZES, seed=5)
    c = generate_splits(TaskConfig(), SIZES, seed=6)
    assert a == b
    assert a["train"] != c["train"]


def test_eval_splits_do_not_depend_on_train_size():
    a = generate_splits(TaskConfig(), {"train": 10, "val": 20, "test": 20}, seed=5)
    b = generate_splits(TaskConfig(), {"train": 500, "val": 20, "test": 20}, seed=5)
    assert a["val"] == b["val"] and a["test"] == b["test"]


def test_sizes_and_disjoint(splits):
    assert {k: len(v) for k, v in splits.items()} == SIZES
    texts = [p.text for v in splits.values() for p in v]
    assert len(set(texts)) == len(texts)


def test_check_disjoint_detects_overlap():
    check_disjoint({"train": ["a", "b"], "val": ["c"]})
    with pytest.raises(ValueError, match="train and val"):
        check_disjoint({"train": ["a", "b"], "val": ["b"]})
    with pytest.raises(ValueError, match="twice"):
        check_disjoint({"train": ["a", "a"]})


def test_tiny_task_space_is_an_error():
    cfg = TaskConfig(min_terms=2, max_terms=2, max_operand=2)
    with pytest.raises(ValueError, match="too small"):
        generate_splits(cfg, {"train": 100, "val": 0, "test": 0}, seed=0)


def _terms_from_text(text: str) -> list[int]:
    expr = re.fullmatch(r"What is ([0-9+\-]+)\?", text).group(1)
    return [int(t) for t in re.findall(r"[+-]?\d+", expr)]


def test_problem_text_and_answer_independent(splits):
    for p in [*splits["train"], *splits["val"]]:
        terms = _terms_from_text(p.text)
        assert terms == list(p.terms)
        # reference value by plain left-to-right evaluation of the expression string
        expr = p.text[len("What is ") : -1]
        value, sign, i = 0, 1, 0
        while i < len(expr):
            if expr[i] in "+-":
                sign = 1 if expr[i] == "+" else -1
                i += 1
            value += sign * int(expr[i])
            i += 1
        assert value == p.answer


def _fold_reference(terms: list[int]) -> list[list[int]]:
    """Independent reference for the rewrite style: the term lists line by line."""
    out = [list(terms)]
    while len(out[-1]) > 1:
        a, b, *rest = out[-1]
        out.append([a + b, *rest])
    return out


def test_rewrite_solution_lines_are_right():
    rewrite = generate_splits(TaskConfig(style="rewrite"), SIZES, seed=11)
    for p in rewrite["train"]:
        *lines, answer_line = p.solution.split("\n")
        assert answer_line == f"Answer: {p.answer}"
        assert lines[0] == p.text[len("What is ") : -1]
        assert all(line.startswith("= ") for line in lines[1:])
        parsed = [
            [int(t) for t in re.findall(r"[+-]?\d+", line.removeprefix("= "))] for line in lines
        ]
        assert parsed == _fold_reference(list(p.terms))
        assert all(line[0] >= 0 for line in parsed)  # running totals never go negative


def test_running_solution_steps_are_right():
    cfg = TaskConfig(style="running")
    for p in generate_splits(cfg, {"train": 200}, seed=4)["train"]:
        body, answer_line = p.solution.rsplit("\n", 1)
        assert answer_line == f"Answer: {p.answer}"
        steps = body.split(" ")
        assert len(steps) == len(p.terms) - 1
        total = p.terms[0]
        for step, t in zip(steps, p.terms[1:], strict=True):
            a, op, b, c = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)\.", step).groups()
            assert int(a) == total
            assert (1 if op == "+" else -1) * int(b) == t
            assert int(c) == int(a) + t
            total = int(c)
            assert total >= 0
        assert dapo_correct(p.solution, str(p.answer))


def test_every_solution_grades_correct_and_corruptions_wrong(splits):
    for p in [*splits["train"], *splits["val"], *splits["test"]]:
        gold = str(p.answer)
        assert dapo_correct(p.solution, gold)
        assert dapo_reward(p.solution, gold) == 1.0
        assert extract_answer(p.solution) == gold
        wrong = p.solution.rsplit("Answer: ", 1)[0] + f"Answer: {p.answer + 1}"
        assert not dapo_correct(wrong, gold)
        assert dapo_reward(wrong, gold) == -1.0
        assert not dapo_correct(p.solution.rsplit("\n", 1)[0], gold)  # no answer line
        # a wrong intermediate line does not matter to the grader, only the answer line
        assert dapo_correct("= 999\n" + p.solution, gold)


def test_difficulty_knob():
    easy = generate_splits(TaskConfig.from_difficulty("easy"), {"train": 300}, seed=0)["train"]
    hard = generate_splits(TaskConfig.from_difficulty("hard"), {"train": 300}, seed=0)["train"]
    cfg_e, cfg_h = TaskConfig.from_difficulty("easy"), TaskConfig.from_difficulty("hard")
    assert all(cfg_e.min_terms <= len(p.terms) <= cfg_e.max_terms for p in easy)
    assert all(cfg_h.min_terms <= len(p.terms) <= cfg_h.max_terms for p in hard)
    mean = lambda ps: sum(len(p.solution) for p in ps) / len(ps)  # noqa: E731
    assert mean(hard) > 1.5 * mean(easy)
    assert TaskConfig.from_difficulty("medium", max_terms=6).max_terms == 6
    with pytest.raises(KeyError):
        TaskConfig.from_difficulty("impossible")
    with pytest.raises(ValueError):
        TaskConfig(min_terms=5, max_terms=4)


def test_write_data(tmp_path):
    meta = write_data(tmp_path / "a", seed=2, n_train=50, n_val=10, n_test=10)
    write_data(tmp_path / "b", seed=2, n_train=50, n_val=10, n_test=10)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert meta["sizes"] == {"train": 50, "val": 10, "test": 10}
    verify_data_dir(tmp_path / "a")
    train = read_jsonl(tmp_path / "a" / "train.jsonl")
    r = train[0]
    assert set(r) >= {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert r["prompt"] == [{"role": "user", "content": format_prompt(r["problem"])}]
    assert r["ability"] == "MATH" and r["reward_model"]["style"] == "rule"
    assert dapo_correct(r["solution"], r["reward_model"]["ground_truth"])
    assert isinstance(r["extra_info"]["index"], str)
    val = read_jsonl(tmp_path / "a" / "val.jsonl")
    assert set(val[0]) >= {"id", "problem", "answer"}
    assert len({v["id"] for v in val}) == len(val)
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["disjoint_checked"]
    # a leaked problem is caught when the directory is re-checked
    leaked = dict(val[0], problem=train[3]["problem"])
    (tmp_path / "a" / "val.jsonl").write_text(json.dumps(leaked) + "\n")
    with pytest.raises(ValueError, match="train and val"):
        verify_data_dir(tmp_path / "a")


def test_problem_hand_checked():
    assert Problem((3, 4, -2), "rewrite").solution == "3+4-2\n= 7-2\n= 5\nAnswer: 5"
    assert Problem((3, 4, -2), "running").solution == "3+4=7. 7-2=5.\nAnswer: 5"
    assert Problem((3, 4, -2)).text == "What is 3+4-2?"
    with pytest.raises(ValueError, match="style"):
        TaskConfig(style="essay")

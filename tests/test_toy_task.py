"""The toy task generator: determinism, disjoint splits, correct worked solutions."""

from __future__ import annotations

import json
import random
import re

import pytest

from cppo.toy.task import (
    Problem,
    TaskConfig,
    check_disjoint,
    draw_slips,
    generate_splits,
    read_jsonl,
    verify_data_dir,
    worked_solution,
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
    m = re.fullmatch(r"What is the total of (.*)\?", text)
    items = m.group(1).split(" ")
    letters = items[0::2]
    assert letters == [f"{c})" for c in "abcdefghijklmnopqrstuvwxyz"[: len(letters)]]
    values = items[1::2]
    assert values[0].isdigit() and all(v[0] in "+-" for v in values[1:])
    return [int(v) for v in values]


def test_problem_text_and_answer_independent(splits):
    for p in [*splits["train"], *splits["val"]]:
        terms = _terms_from_text(p.text)
        assert terms == list(p.terms)
        # reference value by plain left-to-right evaluation of the problem text
        value = 0
        for item in p.text.rstrip("?").split(" "):
            if item[:1] in "+-" and item[1:].isdigit() or item.isdigit():
                value += int(item)
        assert value == p.answer
    plain = Problem((7, 5, -3), "plain")
    assert plain.text == "What is 7+5-3?" and plain.answer == 9


def _check_steps(p: Problem, lettered: bool) -> None:
    body, answer_line = p.solution.rsplit("\n", 1)
    assert answer_line == f"Answer: {p.answer}"
    pattern = r"([a-z])\) (\d+)([+-])(\d+)=(\d+)\." if lettered else r"()(\d+)([+-])(\d+)=(\d+)\."
    steps = re.findall(pattern, body)
    assert " ".join(f"{x}) " * lettered + f"{a}{o}{b}={c}." for x, a, o, b, c in steps) == body
    assert len(steps) == len(p.terms) - 1
    total = p.terms[0]
    for i, ((letter, a, op, b, c), t) in enumerate(zip(steps, p.terms[1:], strict=True), 1):
        if lettered:
            assert letter == "abcdefghijklmnopqrstuvwxyz"[i]
        assert int(a) == total
        assert (1 if op == "+" else -1) * int(b) == t
        assert int(c) == int(a) + t
        total = int(c)
        assert total >= 0  # running totals never go negative


def test_worked_solution_steps_are_right(splits):
    for p in splits["train"]:
        _check_steps(p, lettered=True)
    for p in generate_splits(TaskConfig(style="plain"), {"train": 200}, seed=4)["train"]:
        _check_steps(p, lettered=False)
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
    p = Problem((3, 4, -2))
    assert p.text == "What is the total of a) 3 b) +4 c) -2?"
    assert p.solution == "b) 3+4=7. c) 7-2=5.\nAnswer: 5"
    assert Problem((3, 4, -2), "plain").solution == "3+4=7. 7-2=5.\nAnswer: 5"
    assert Problem((3, 4, -2), "plain").text == "What is 3+4-2?"
    with pytest.raises(ValueError, match="style"):
        TaskConfig(style="essay")
    with pytest.raises(ValueError, match="at most 26"):
        TaskConfig(max_terms=27)


def _steps_with_totals(p: Problem):
    total = p.terms[0]
    for t in p.terms[1:]:
        yield t, total
        total += t


def test_sign_is_not_predictable_from_the_total():
    """Whenever the total is positive, "-" is drawn with p_minus whatever its size."""
    ps = generate_splits(TaskConfig(), {"train": 3000}, seed=1)["train"]
    small = [t < 0 for p in ps for t, tot in _steps_with_totals(p) if 0 < tot <= 3]
    large = [t < 0 for p in ps for t, tot in _steps_with_totals(p) if tot >= 10]
    assert abs(sum(small) / len(small) - 0.5) < 0.05
    assert abs(sum(large) / len(large) - 0.5) < 0.05


def _parsed_steps(solution: str) -> list[tuple[int, int, int]]:
    body = solution.rsplit("\n", 1)[0]
    steps = re.findall(r"([a-z])\) (\d+)([+-])(\d+)=(\d+)\.", body)
    return [(int(a), (1 if o == "+" else -1) * int(b), int(c)) for _, a, o, b, c in steps]


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_slipped_solutions(splits, rate):
    rng = random.Random(0)
    n_steps = n_wrong = 0
    for p in splits["train"][:400]:
        slips = draw_slips(p.terms, rng, rate)
        s = worked_solution(p.terms, "lettered", slips)
        steps = _parsed_steps(s)
        assert [t for _, t, _ in steps] == list(p.terms[1:])  # the terms are never changed
        assert steps[0][0] == p.terms[0]
        for (_, _, c_prev), (a_next, _, _) in zip(steps, steps[1:], strict=False):
            assert c_prev == a_next  # a wrong total is carried on
        wrong = {k: c - (a + t) for k, (a, t, c) in enumerate(steps) if a + t != c}
        assert wrong == slips
        assert all(d in (-2, -1, 1, 2) for d in wrong.values())
        assert all(c >= 0 for _, _, c in steps)
        assert s.endswith(f"Answer: {steps[-1][2]}")
        assert dapo_correct(s, str(p.answer)) == (sum(slips.values()) == 0)
        n_steps += len(steps)
        n_wrong += len(wrong)
    if rate == 1.0:
        # a step only escapes when every delta would push a later total below zero
        assert n_wrong > 0.95 * n_steps
    else:
        assert abs(n_wrong / n_steps - rate) < 0.03
    assert draw_slips((3, 4, 5), random.Random(1), 0.5) == draw_slips(
        (3, 4, 5), random.Random(1), 0.5
    )
    with pytest.raises(ValueError, match="step_rate"):
        draw_slips((3, 4), rng, 1.5)


def test_worked_solution_with_a_slip_hand_checked():
    assert worked_solution((3, 4, -2), slips={0: 1}) == "b) 3+4=8. c) 8-2=6.\nAnswer: 6"
    assert worked_solution((3, 4, -2), slips={1: -2}) == "b) 3+4=7. c) 7-2=3.\nAnswer: 3"

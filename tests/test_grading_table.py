"""Grading verdicts on a table of gold/completion pairs, per mode.

Each row: (gold, completion, dapo-strict, math-verify, both). The expected verdicts were worked
out by hand from the DAPO normalisation rules (evaluation/dapo.py) and math-verify's documented
extraction priorities (boxed before "answer:" anchors, right-most match, plain numbers need
whitespace before them), not by running the grader.
"""

from __future__ import annotations

import pytest

from evaluation.grading import MODES, check_gold, grade, grade_batch, grade_one

T, F = True, False

# fmt: off
CASES = [
 ("204", "Some work.\nAnswer: 204", T, T, T),
 ("204", "Some work.\nAnswer: 205", F, F, F),
 ("25", "Answer: 025", F, T, T),
 ("25", "Answer: 25.0", F, T, T),
 ("25", "Answer: $25$", T, T, T),
 ("25", "Answer: \\boxed{25}", T, T, T),
 ("\\frac{1}{2}", "Answer: \\frac{1}{2}", T, T, T),
 ("\\frac{1}{2}", "Answer: 1/2", F, T, T),
 ("\\frac{1}{2}", "Answer: 0.5", F, T, T),
 ("0.5", "Answer: $\\frac12$", F, T, T),
 ("\\frac{3}{4}", "The answer is $\\boxed{\\frac{3}{4}}$.", F, T, T),
 ("3", "\\boxed{3}", F, T, T),
 ("10", "Answer: 10 degrees", T, T, T),
 ("10", "Answer: $10^\\circ$", T, T, T),
 ("12", "Answer: 12 inches", T, T, T),
 ("5", "Answer: 5 \\text{ cm}", T, T, T),
 ("1000", "Answer: 1,000", T, T, T),
 # math-verify reads the "1" before "{,}" (no LaTeX delimiters), DAPO drops "{,}".
 ("1000", "Answer: 1{,}000", T, F, T),
 ("-3", "Answer: -3", T, T, T),
 ("-3", "Answer: 3", F, F, F),
 ("\\sqrt{2}", "Answer: $\\sqrt{2}$", T, T, T),
 ("\\sqrt{2}", "Answer: $\\sqrt2$", T, T, T),
 ("2\\sqrt{3}", "Answer: $\\sqrt{12}$", F, T, T),
 ("\\pi", "Answer: $\\pi$", T, T, T),
 ("2\\pi", "Answer: $6.28$", F, F, F),
 ("(3, -1)", "Answer: $(3,-1)$", T, T, T),
 ("(3, -1)", "Answer: $(-1, 3)$", F, F, F),
 ("3, 5", "Answer: $5, 3$", F, T, T),
 ("x^2+1", "Answer: $1+x^2$", F, T, T),
 ("\\frac{\\sqrt{3}}{2}", "Answer: $\\frac{\\sqrt3}{2}$", T, T, T),
 ("7", "The final answer is $7$. I hope it is correct.", F, T, T),
 ("7", "Answer: 7\n\nWait, that is wrong.\nAnswer: 8", F, F, F),
 ("8", "Answer: 7\n\nWait, that is wrong.\nAnswer: 8", T, T, T),
 ("7", "Answer: 7.", F, T, T),
 ("7", "", F, F, F),
 ("7", "I don't know.", F, F, F),
 ("7", "answer: 7", T, T, T),
 ("7", "ANSWER: 7", T, T, T),
 # math-verify's plain-number patterns need whitespace (or "=") before the number.
 ("7", "Answer:7", T, F, T),
 ("70", "Answer: 7", F, F, F),
 ("7", "Answer: 70", F, F, F),
 ("\\frac{14}{3}", "Answer: $\\dfrac{14}{3}$", F, T, T),
 # "\\%" (escaped) is not read as a percent sign by the plain-number pattern: 25 != 0.25.
 ("0.25", "Answer: 25\\%", F, F, F),
 ("204", "Answer: \\(204\\)", F, T, T),
 ("9", "Answer: $x = 9$", T, T, T),
 ("9", "Answer: $x=-9$", F, F, F),
 ("\\text{Evelyn}", "Answer: Evelyn", T, F, T),
 ("5", "Answer: 5 meters", T, T, T),
 ("5", "Answer: 5 apples", F, T, T),
 ("12", "\\boxed{13}", F, F, F),
 ("7", "So \\boxed{7}.\nAnswer: 8", F, T, T),
 ("1000000", "Answer: $10^6$", F, T, T),
 ("\\infty", "Answer: $\\infty$", T, T, T),
 ("2", "Answer: $\\frac{4}{2}$", F, T, T),
 ("3", "Answer: three", F, F, F),
 ("204", "Answer: 204 minutes", T, T, T),
 ("-\\frac{1}{2}", "Answer: $-0.5$", F, T, T),
 ("[-2,7]", "Answer: $[-2, 7]$", T, T, T),
 ("[-2,7]", "Answer: $(-2, 7)$", F, F, F),
 ("5", "Answer: 005", F, T, T),
 ("0", "Answer: 0", T, T, T),
 ("10", "Answer: $\\boxed{10}$", T, T, T),
 ("\\frac{1}{3}", "Answer: 0.333", F, F, F),
 ("4", "Answer: 2+2", F, T, T),
 ("113", "Let me compute m+n = 113.\n\nAnswer: 113", T, T, T),
 ("113", "m + n = 113, so\nAnswer: $\\boxed{113}$", T, T, T),
]
# fmt: on


@pytest.fixture(scope="module")
def verdicts():
    golds = [c[0] for c in CASES]
    completions = [c[1] for c in CASES]
    return {mode: grade_batch(completions, golds, mode=mode) for mode in MODES}


def test_table_is_large_and_mixed():
    assert len(CASES) >= 50
    for column in (2, 3, 4):
        values = {c[column] for c in CASES}
        assert values == {True, False}
    # The modes disagree somewhere in both directions, so the table separates them.
    assert any(c[2] and not c[3] for c in CASES)
    assert any(c[3] and not c[2] for c in CASES)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[repr(c[1][:30]) for c in CASES])
def test_verdict(verdicts, index):
    gold, completion, want_dapo, want_mv, want_both = CASES[index]
    got = {mode: verdicts[mode].results[index] for mode in MODES}
    assert got["dapo-strict"].correct is want_dapo, (gold, completion)
    assert got["math-verify"].correct is want_mv, (gold, completion)
    assert got["both"].correct is want_both, (gold, completion)
    for result in got.values():
        assert result.status == "ok"


def test_both_is_the_or_of_the_two_modes(verdicts):
    for i in range(len(CASES)):
        dapo = verdicts["dapo-strict"].results[i].correct
        mv = verdicts["math-verify"].results[i].correct
        assert verdicts["both"].results[i].correct is (dapo or mv)


def test_fast_path_skips_math_verify_when_dapo_matches(verdicts):
    for result in verdicts["both"].results:
        if result.dapo_correct:
            assert result.math_verify_correct is None
        else:
            assert result.math_verify_correct is not None
    assert all(r.math_verify_correct is None for r in verdicts["dapo-strict"].results)


def test_verify_argument_order_is_gold_first():
    # math-verify compares a relation with an interval only when the *prediction* is the set,
    # so these two verdicts flip if gold and prediction are swapped.
    assert grade("Answer: $1 < x < 2$", "(1,2)", mode="math-verify") is False
    assert grade("Answer: $(1,2)$", "1 < x < 2", mode="math-verify") is True


def test_grade_single_matches_batch():
    assert grade("Work.\nAnswer: 204", "204") is True
    assert grade("Work.\nAnswer: 205", "204") is False
    assert grade("so $\\boxed{\\frac{1}{2}}$", "0.5") is True
    result = grade_one("so $\\boxed{\\frac{1}{2}}$", "0.5", mode="math-verify")
    assert result.correct and result.extracted == "\\frac{1}{2}"


def test_unknown_mode_and_length_mismatch():
    with pytest.raises(ValueError, match="grading mode"):
        grade("Answer: 1", "1", mode="exact")
    with pytest.raises(ValueError, match="same length"):
        grade_batch(["a", "b"], ["1"])


def test_duplicates_are_graded_once_but_reported_per_item():
    report = grade_batch(["Answer: 0.5"] * 5 + ["Answer: 3"], ["\\frac{1}{2}"] * 5 + ["4"])
    assert report.correct == [True] * 5 + [False]
    assert len(report) == 6


@pytest.mark.parametrize("gold", ["", "   ", "\\text{}", "$$", "???", "\\frac{", "..."])
def test_unusable_gold_is_rejected(gold):
    with pytest.raises(ValueError):
        check_gold(gold)


def test_unparseable_gold_never_scores():
    # An empty model answer must not "equal" an empty gold.
    report = grade_batch(["Answer: ???", ""], ["???", "???"], mode="both")
    assert report.correct == [True, False]  # the DAPO string match still works for the first
    mv = grade_batch(["Answer: ???"], ["???"], mode="math-verify")
    assert mv.correct == [False] and mv.n_errors == 1

"""The DAPO prompt template and its "Answer:" line extraction.

This is the reward of the paper's training stack (verl's DAPO math scorer) restated: the last
"Answer:" line of a completion, normalised, compared as a string with the normalised gold answer.
Training rewards (toy and paper scale) and the `dapo-strict` grading mode both use it.
"""

from __future__ import annotations

import re

PROMPT_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
PROMPT_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'

# Scoring only looks at the tail of a completion: it bounds regex work on hostile outputs.
TAIL_CHARS = 300

_ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")

# fmt: off
_SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""),
    ("mbox", "text"), (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]
_REMOVED = [
    "square", "ways", "integers", "dollars", "mph", "inches", "hours", "km", "units", "\\ldots",
    "sue", "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds",
    "meters", "meals", "edges", "students", "childrentickets", "multiples", "\\text{s}",
    "\\text{.}", "\\text{\ns}", "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}",
    r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"', "\\dots",
]
# fmt: on


def format_prompt(problem: str) -> str:
    """The user turn of the DAPO-Math-17k prompt for one problem."""
    return f"{PROMPT_PREFIX}{problem}{PROMPT_SUFFIX}"


def normalize_answer(answer: str) -> str:
    """Normalise a final answer the way the DAPO scorer does (Minerva-style rules)."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def extract_answer(completion: str) -> str | None:
    """The normalised content of the last "Answer:" line, or None when there is none."""
    matches = _ANSWER_RE.findall(completion[-TAIL_CHARS:])
    if not matches:
        return None
    return normalize_answer(matches[-1])


def dapo_correct(completion: str, gold: str) -> bool:
    """True when the last "Answer:" line equals the gold answer after normalisation."""
    predicted = extract_answer(completion)
    return predicted is not None and predicted == normalize_answer(gold)


def dapo_reward(completion: str, gold: str) -> float:
    """The DAPO training reward: +1 for a correct answer line, -1 otherwise."""
    return 1.0 if dapo_correct(completion, gold) else -1.0

"""Hooks for the lm-eval-harness tasks aime{24,25,26}_avg16 (see the YAML files here).

Data: the package's bundled, validated AIME files (no network). Prompt: the DAPO template as
the user turn (run lm_eval with --apply_chat_template). Scoring: evaluation.grading in "both"
mode (DAPO answer line OR math-verify, hang-proof worker pool), averaged over the 16 samples.
"""

from __future__ import annotations

from evaluation.dapo import format_prompt
from evaluation.grading import grade_batch
from evaluation.metrics import pass_at_k_single

GRADING_MODE = "both"


def _dataset(name: str):
    import datasets

    from evaluation.benchmarks import load_benchmark

    rows = load_benchmark(name, source="bundled").rows
    keep = ("id", "problem", "answer")
    return {"test": datasets.Dataset.from_list([{k: r[k] for k in keep} for r in rows])}


def load_aime24(**kwargs):  # lm-eval passes task metadata
    return _dataset("aime24")


def load_aime25(**kwargs):
    return _dataset("aime25")


def load_aime26(**kwargs):
    return _dataset("aime26")


def doc_to_text(doc: dict) -> str:
    return format_prompt(doc["problem"])


def process_results(doc: dict, results: list) -> dict[str, float]:
    """Avg@k and pass@k of one problem from its k sampled completions."""
    # With the take_first_k filter lm-eval hands over [[c_1, ..., c_k]].
    completions = results[0] if results and isinstance(results[0], list) else list(results)
    report = grade_batch(completions, [doc["answer"]] * len(completions), mode=GRADING_MODE)
    n, c = len(completions), sum(report.correct)
    return {
        "avg_at_16": c / n,
        "pass_at_16": pass_at_k_single(n, c, min(16, n)),
        "grader_failures": (report.n_timeouts + report.n_errors) / n,
    }

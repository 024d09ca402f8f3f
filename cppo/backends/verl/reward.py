"""The training reward as a verl ``compute_score``: the DAPO answer-line check (+1 / -1).

verl calls ``compute_score(data_source=, solution_str=, ground_truth=, extra_info=)`` with the
decoded response (special tokens skipped), the scorer of the paper's stack; the dict's ``acc``
is what verl's validation reports as ``val-core/<data_source>/acc/mean@N``. Set with
``reward.custom_reward_function.path=<this file>`` and ``.name=compute_score``.
"""

from __future__ import annotations

from typing import Any

from evaluation.dapo import dapo_reward


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: str,
    extra_info: Any = None,
    **kwargs: Any,
) -> dict[str, float]:
    score = dapo_reward(solution_str, str(ground_truth))
    return {"score": float(score), "acc": float(score > 0)}

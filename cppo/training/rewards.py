"""The training reward: the DAPO answer-line check, +1 correct / -1 otherwise."""

from __future__ import annotations

from typing import Any

from evaluation.dapo import dapo_reward


class DapoReward:
    """TRL reward function: decodes each completion's token ids and scores it against its gold answer.

    Decoding the ids (special tokens skipped) rather than using TRL's parsed message content
    scores exactly the text the model produced, as verl's DAPO scorer does.
    """

    __name__ = "dapo"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        ground_truth: list[str],
        **kwargs: Any,
    ) -> list[float]:
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return [dapo_reward(text, gold) for text, gold in zip(texts, ground_truth, strict=True)]

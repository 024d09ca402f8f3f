"""Training prompts: DAPO-Math-17k-schema JSONL rows -> TRL's conversational "prompt" format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasets import Dataset


class TrainDataError(ValueError):
    """A malformed training row; the message names the file, line and field."""


def _row_to_example(row: dict[str, Any], where: str) -> dict[str, Any]:
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise TrainDataError(f"{where}: 'prompt' must be a non-empty list of chat messages")
    for msg in prompt:
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("role"), str)
            or not isinstance(msg.get("content"), str)
        ):
            raise TrainDataError(f"{where}: every prompt message needs string 'role' and 'content'")
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
        raise TrainDataError(f"{where}: missing 'reward_model.ground_truth'")
    gold = reward_model["ground_truth"]
    if not isinstance(gold, str | int):
        raise TrainDataError(f"{where}: 'reward_model.ground_truth' must be a string")
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
        "ground_truth": str(gold),
    }


def load_train_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a DAPO-schema JSONL file into [{"prompt": [...messages], "ground_truth": str}]."""
    rows = []
    with open(path) as fh:
        for i, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as err:
                raise TrainDataError(f"{path}:{i}: not valid JSON ({err})") from err
            rows.append(_row_to_example(raw, f"{path}:{i}"))
    if not rows:
        raise TrainDataError(f"{path}: no training rows")
    return rows


def build_train_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    max_prompt_length: int,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[Dataset, int]:
    """The training Dataset and the number of rows dropped for prompts over max_prompt_length tokens.

    Prompts are measured exactly as the trainer will tokenise them (chat template with the
    generation prompt); over-long ones are dropped, as verl's filter_overlong_prompts does.
    """
    rows = load_train_rows(path)
    kept = []
    for row in rows:
        ids = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True, **(chat_template_kwargs or {})
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        if len(ids) <= max_prompt_length:
            kept.append(row)
    if not kept:
        raise TrainDataError(
            f"{path}: every prompt is longer than schedule.max_prompt_length={max_prompt_length} tokens"
        )
    return Dataset.from_list(kept), len(rows) - len(kept)

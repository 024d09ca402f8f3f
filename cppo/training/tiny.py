"""Tiny Qwen3 models and tokenizers for the trainer's tests and benchmarks (no downloads), and
DAPO-schema training rows for them.

The models and tokenizers are evaluation.testing's (built by evaluation.tiny, the one builder);
this module keeps the trainer-side names. `vocab_size` pads the vocabulary with filler tokens
(e.g. to Qwen3's 151,936) to measure vocabulary-bound costs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evaluation.dapo import format_prompt
from evaluation.testing import make_char_tokenizer as build_tiny_tokenizer
from evaluation.testing import make_tiny_model, tiny_preset
from evaluation.tiny import build_model

__all__ = ["build_tiny_model", "build_tiny_tokenizer", "save_tiny", "write_train_jsonl"]


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised Qwen3 causal LM at the unit-test size."""
    preset = tiny_preset(hidden_size, num_hidden_layers, tie_word_embeddings)
    return build_model(preset, tokenizer, seed=seed, vocab_size=vocab_size)


def save_tiny(
    out_dir: str | Path, *, vocab_size: int | None = None, seed: int = 0, **kw: Any
) -> Path:
    """Build a tiny tokenizer + model and save both as one standard HF model directory."""
    make_tiny_model(out_dir, vocab_size=vocab_size, seed=seed, **kw)
    return Path(out_dir)


def write_train_jsonl(path: str | Path, n: int, *, start: int = 0, template: bool = False) -> Path:
    """n DAPO-schema training rows with trivial addition problems (gold = i + 1).

    template=True wraps each problem in the DAPO prompt template (~200 more characters).
    """
    path = Path(path)
    with open(path, "w") as fh:
        for i in range(start, start + n):
            row = {
                "data_source": "tiny",
                "prompt": [
                    {
                        "role": "user",
                        "content": format_prompt(f"{i}+1=?") if template else f"{i}+1=?",
                    }
                ],
                "ability": "MATH",
                "reward_model": {"ground_truth": str(i + 1), "style": "rule"},
                "extra_info": {"index": str(i)},
            }
            fh.write(json.dumps(row) + "\n")
    return path

"""A small word+character tokenizer for the toy task, saved as a standard transformers tokenizer.

Every word of the DAPO prompt template and of the task text is one token (with and without a
leading space), so the ~200-character template costs ~50 tokens instead of ~200. Everything else
(digits, operators, punctuation, spaces, newlines, unseen words) falls back to one token per
printable ASCII character, so any ASCII string round-trips through encode/decode.
Special tokens follow the Qwen chat format: <|im_start|>, <|im_end|> (eos), <|endoftext|> (pad).
This module picks the words; evaluation.tiny builds the tokenizer (shared with the tests).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from evaluation.dapo import PROMPT_PREFIX, PROMPT_SUFFIX
from evaluation.tiny import build_tokenizer

ROLE_WORDS = ["system", "user", "assistant"]

_WORD_RE = re.compile(r"[A-Za-z]+")


def collect_words(texts: Iterable[str], min_count: int = 1) -> list[str]:
    """Alphabetic words of the template, the chat roles and the given texts, sorted."""
    counts: dict[str, int] = {}
    for t in [PROMPT_PREFIX, PROMPT_SUFFIX, *ROLE_WORDS]:
        for w in _WORD_RE.findall(t):
            counts[w] = max(counts.get(w, 0), min_count)
    for t in texts:
        for w in _WORD_RE.findall(t):
            counts[w] = counts.get(w, 0) + 1
    # Single letters are already character tokens.
    return sorted(w for w, c in counts.items() if c >= min_count and len(w) > 1)


def build_from_data(data_dir: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer for a toy data directory: template words + words of the train split."""
    from .task import read_jsonl

    data_dir = Path(data_dir)
    if not (data_dir / "train.jsonl").exists():
        raise FileNotFoundError(
            f"{data_dir / 'train.jsonl'} not found; run `python -m cppo.toy data --out {data_dir}`"
        )
    texts: list[str] = []
    for r in read_jsonl(data_dir / "train.jsonl"):
        texts.append(r["problem"])
        texts.append(r["solution"])
    return build_tokenizer(collect_words(texts))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))

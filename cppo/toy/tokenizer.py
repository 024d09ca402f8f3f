"""A small word+character tokenizer for the toy task, saved as a standard transformers tokenizer.

Every word of the DAPO prompt template and of the task text is one token (with and without a
leading space), so the ~200-character template costs ~50 tokens instead of ~200. Everything else
(digits, operators, punctuation, spaces, newlines, unseen words) falls back to one token per
printable ASCII character, so any ASCII string round-trips through encode/decode.
Special tokens follow the Qwen chat format: <|im_start|>, <|im_end|> (eos), <|endoftext|> (pad).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from evaluation.dapo import PROMPT_PREFIX, PROMPT_SUFFIX

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK = "<unk>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, UNK]

ROLE_WORDS = ["system", "user", "assistant"]

# ChatML, as in Qwen; the assistant turn is wrapped in generation markers so that
# return_assistant_tokens_mask (TRL's assistant_only_loss) works.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORD_RE = re.compile(r"[A-Za-z]+")
# Characters that always get their own token: printable ASCII (incl. space) plus \n and \t.
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]


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


def _pattern(words: list[str]) -> str:
    # Longest first so that alternation prefers "Answer" over "An"; the look-ahead keeps a
    # word from matching the start of a longer unknown word (which falls back to characters).
    alts = "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))
    return rf" ?(?:{alts})(?![A-Za-z])|[\s\S]"


def build_tokenizer(words: list[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *CHARS, *words, *(" " + w for w in words)]:
        vocab.setdefault(tok, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_pattern(words)), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


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

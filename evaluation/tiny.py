"""The one builder of tiny tokenizers and tiny causal LMs, built locally (no downloads).

Used by the toy pipeline (cppo.toy: the word+character tokenizer and the preset models of
cppo/toy/presets.yaml), by the trainer's tests and benchmarks (cppo.training.tiny) and by
evaluation's tests (evaluation.testing). It lives in `evaluation` because cppo imports
evaluation and never the other way round, so both packages can import it.

Tokenizer: one WordLevel token per printable ASCII character plus, optionally, whole words
(with and without a leading space); anything else maps to <unk>. Special tokens follow the Qwen
chat format: <|im_start|>, <|im_end|> (eos), <|endoftext|> (pad).
Model: a randomly initialised Qwen3 or Qwen3-MoE causal LM from a size preset (a dict of config
keys, as in cppo/toy/presets.yaml).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
)

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNK = "<unk>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, UNK]

# Characters that always get their own token: printable ASCII (incl. space) plus \n and \t.
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]

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

_COMMON_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
)
_MOE_KEYS = (
    "moe_intermediate_size",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "decoder_sparse_step",
    "router_aux_loss_coef",
    "mlp_only_layers",
)


def _pattern(words: list[str]) -> str:
    if not words:
        return r"[\s\S]"  # character level
    # Longest first so that alternation prefers "Answer" over "An"; the look-ahead keeps a
    # word from matching the start of a longer unknown word (which falls back to characters).
    alts = "|".join(re.escape(w) for w in sorted(words, key=lambda w: (-len(w), w)))
    return rf" ?(?:{alts})(?![A-Za-z])|[\s\S]"


def build_tokenizer(
    words: Iterable[str] = (),
    *,
    vocab_size: int | None = None,
    model_max_length: int = 512,
    padding_side: str = "left",
    chat_template: str = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Specials, characters, then each word and " word"; `vocab_size` pads with filler tokens
    (e.g. to Qwen3's 151,936, to measure vocabulary-bound costs)."""
    words = list(words)
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *CHARS, *words, *(" " + w for w in words)]:
        vocab.setdefault(tok, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size must be >= {len(vocab)}, got {vocab_size}")
        for i in range(len(vocab), vocab_size):
            vocab[f"<filler{i}>"] = i
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
        padding_side=padding_side,
    )
    tok.chat_template = chat_template
    return tok


def make_config(
    preset: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    vocab_size: int | None = None,
) -> PretrainedConfig:
    """A Qwen3 / Qwen3-MoE config from a size preset; the vocabulary is the tokenizer's unless
    `vocab_size` is given."""
    p = dict(preset)
    arch = p.pop("architecture", "qwen3")
    known = set(_COMMON_KEYS) | {"rope_theta"} | (set(_MOE_KEYS) if arch == "qwen3_moe" else set())
    unknown = sorted(set(p) - known)
    if unknown:
        raise ValueError(f"unknown keys for a {arch} preset: {unknown}")
    kwargs: dict[str, Any] = {k: p[k] for k in p if k != "rope_theta"}
    kwargs["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": float(p.get("rope_theta", 1e4)),
    }
    kwargs.update(
        vocab_size=vocab_size or len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    if arch == "qwen3":
        return Qwen3Config(**kwargs)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**kwargs)
    raise ValueError(f"unknown architecture {arch!r} (qwen3 or qwen3_moe)")


def build_model(
    preset: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised float32 causal LM; the weights depend only on preset and seed."""
    config = make_config(preset, tokenizer, vocab_size=vocab_size)
    torch.manual_seed(seed)  # the only RNG the initialisation draws from
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return model


def save_pretrained_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path
) -> Path:
    """Model and tokenizer in one standard HF directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

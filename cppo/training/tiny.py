"""Tiny Qwen3 models and tokenizers built locally, for tests and benchmarks (no downloads).

The tokenizer is character-level over printable ASCII plus the Qwen chat special tokens, with a
ChatML chat template, so the trainer's real chat-template path runs. `vocab_size` can pad the
vocabulary with filler tokens (e.g. to Qwen3's 151,936) to measure vocabulary-bound costs.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, UNK]
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tiny_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Character-level tokenizer with ChatML specials; optionally padded to `vocab_size` ids."""
    vocab: dict[str, int] = {}
    for tok in [*SPECIAL_TOKENS, *CHARS]:
        vocab.setdefault(tok, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size must be >= {len(vocab)}, got {vocab_size}")
        for i in range(len(vocab), vocab_size):
            vocab[f"<filler{i}>"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=4096,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM sized for unit tests."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(out_dir: str | Path, *, vocab_size: int | None = None, seed: int = 0, **kw) -> Path:
    """Build a tiny tokenizer + model and save both as one standard HF model directory."""
    out = Path(out_dir)
    tok = build_tiny_tokenizer(vocab_size)
    model = build_tiny_model(tok, vocab_size=vocab_size, seed=seed, **kw)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_train_jsonl(path: str | Path, n: int, *, start: int = 0, template: bool = False) -> Path:
    """n DAPO-schema training rows with trivial addition problems (gold = i + 1).

    template=True wraps each problem in the DAPO prompt template (~200 more characters).
    """
    import json

    from evaluation.dapo import format_prompt

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

"""Test helpers: a tiny random Qwen3 model with a character-level tokenizer and a chat template
(smoke tests of backends and lm-eval tasks with no download; its outputs are noise), and a set
of hostile completions that have hung or crashed math graders.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_char_tokenizer():
    """A fast tokenizer with one token per printable ASCII character (others map to <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable))
    vocab = {"<unk>": 0}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(out_dir: str | Path | None = None, *, seed: int = 0, hidden_size: int = 32):
    """Build (model, tokenizer); save both as a standard HF directory when ``out_dir`` is given."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = make_char_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden_size // 2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return model, tokenizer


def hostile_completions() -> list[tuple[str, str, str]]:
    """(label, completion, gold) triples that have hung or crashed graders."""
    tower = "10^{10^{10^{10}}}"
    return [
        ("200k chars prose", "lorem ipsum " * 16_667 + "\nAnswer: 204", "204"),
        ("200k dollars", "$" * 200_000, "204"),
        ("200k open braces", "{" * 200_000, "204"),
        ("200k boxed opens", "\\boxed{" * 28_572, "204"),
        ("tower latex", f"Answer: ${tower}$", "204"),
        ("tower boxed", f"\\boxed{{{tower}}}", "204"),
        ("tower plain", "Answer: 10^10^10^10", "204"),
        ("python power", "Answer: 9**9**9**9", "204"),
        ("2-tower equal", "Answer: $2^{2^{2^{32}}}$", "2^{2^{2^{2^{5}}}}"),
        ("factorial", "Answer: $(10^{10})!$", "204"),
        ("binomial", "Answer: $\\binom{10^{10}}{10^{5}}$", "204"),
        ("huge sum", "Answer: $\\sum_{n=1}^{10^{100}} n^{n}$", "204"),
        ("exp tower", "Answer: $e^{e^{e^{e^{e^{e}}}}}$", "204"),
        ("unbalanced frac", "Answer: $\\frac{1}{2" + "{" * 5000 + "$", "204"),
        ("unbalanced left", "Answer: $" + "\\left(" * 3000 + "$", "204"),
        ("unbalanced close", "Answer: $" + "}" * 10_000 + "$", "204"),
        ("huge integer 100k", "Answer: " + "9" * 100_000, "204"),
        ("huge integer boxed", "\\boxed{" + "7" * 5000 + "}", "204"),
        ("deep parens", "Answer: $" + "(" * 3000 + "1" + ")" * 3000 + "$", "204"),
        ("deep frac", "Answer: $" + "\\frac{1}{" * 600 + "2" + "}" * 600 + "$", "204"),
        ("deep sqrt", "Answer: $" + "\\sqrt{" * 600 + "2" + "}" * 600 + "$", "204"),
        ("deep power", "Answer: $" + "2^{" * 200 + "2" + "}" * 200 + "$", "204"),
        ("long product", "Answer: " + "*".join(["99999"] * 400), "204"),
        ("null bytes", "\x00" * 10_000 + "Answer: 204\x00", "204"),
        ("full-width digits", "Answer: \uff12\uff10\uff14", "204"),
    ]

"""Test and benchmark helpers: a tiny random Qwen3 model with a character-level tokenizer and a
chat template (smoke tests of backends, lm-eval tasks and the trainer with no download; its
outputs are noise), DAPO-schema training rows for it, and a set of hostile completions that have
hung or crashed math graders.

The tokenizer and model come from the one builder, evaluation.tiny (which also builds the toy
pipeline's); this module fixes the test size and the test chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported on use: hostile_completions needs neither torch nor transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

# Plain ChatML (no generation markers), written so that tests can patch the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_preset(
    hidden_size: int = 32, num_hidden_layers: int = 2, tie_word_embeddings: bool = True
) -> dict[str, Any]:
    """The unit-test size preset (keys as in cppo/toy/presets.yaml)."""
    return {
        "architecture": "qwen3",
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": hidden_size // 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": tie_word_embeddings,
    }


def make_char_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (others map to <unk>) plus the ChatML specials;
    `vocab_size` pads the vocabulary with filler tokens."""
    from evaluation.tiny import build_tokenizer

    return build_tokenizer(
        vocab_size=vocab_size,
        model_max_length=4096,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_model_for(
    tokenizer: Any,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    tie_word_embeddings: bool = True,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised Qwen3 at the unit-test size for `tokenizer` (`vocab_size` pads
    the embedding, e.g. to Qwen3's 151,936, to measure vocabulary-bound costs)."""
    from evaluation.tiny import build_model

    preset = tiny_preset(hidden_size, num_hidden_layers, tie_word_embeddings)
    return build_model(preset, tokenizer, seed=seed, vocab_size=vocab_size)


def make_tiny_model(
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    tie_word_embeddings: bool = True,
    vocab_size: int | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build (model, tokenizer); save both as a standard HF directory when ``out_dir`` is given."""
    from evaluation.tiny import build_model, save_pretrained_dir

    tokenizer = make_char_tokenizer(vocab_size)
    preset = tiny_preset(hidden_size, num_hidden_layers, tie_word_embeddings)
    model = build_model(preset, tokenizer, seed=seed)
    model.eval()
    if out_dir is not None:
        save_pretrained_dir(model, tokenizer, out_dir)
    return model, tokenizer


def write_train_jsonl(path: str | Path, n: int, *, start: int = 0, template: bool = False) -> Path:
    """n DAPO-schema training rows with trivial addition problems (gold = i + 1).

    template=True wraps each problem in the DAPO prompt template (~200 more characters).
    """
    from evaluation.dapo import format_prompt

    path = Path(path)
    with open(path, "w") as fh:
        for i in range(start, start + n):
            content = format_prompt(f"{i}+1=?") if template else f"{i}+1=?"
            row = {
                "data_source": "tiny",
                "prompt": [{"role": "user", "content": content}],
                "ability": "MATH",
                "reward_model": {"ground_truth": str(i + 1), "style": "rule"},
                "extra_info": {"index": str(i)},
            }
            fh.write(json.dumps(row) + "\n")
    return path


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

"""User messages per prompt style, rendered through the model's chat template."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from evaluation.dapo import format_prompt

BOXED_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

# "dapo" is the paper's training/validation template (DAPO-Math-17k); "boxed" is the common
# Qwen-math style; "raw" sends the problem as it is.
PROMPT_STYLES: dict[str, Callable[[str], str]] = {
    "dapo": format_prompt,
    "boxed": lambda problem: problem + BOXED_SUFFIX,
    "raw": lambda problem: problem,
}


def user_message(problem: str, style: str = "dapo") -> str:
    try:
        return PROMPT_STYLES[style](problem)
    except KeyError:
        raise ValueError(
            f"unknown prompt style {style!r}; expected {sorted(PROMPT_STYLES)}"
        ) from None


def chat_prompt(
    tokenizer,
    user_text: str,
    *,
    chat_template: bool = True,
    chat_template_kwargs: dict | None = None,
) -> str:
    """The prompt string the model sees: the user turn through the chat template, with the
    assistant turn opened (``add_generation_prompt=True``)."""
    if not chat_template:
        return user_text
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template; evaluation prompts go through it "
            "(pass chat_template=False / --no-chat-template to send the raw user text)"
        )
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}],
        tokenize=False,
        add_generation_prompt=True,
        **(chat_template_kwargs or {}),
    )


def build_prompts(
    problems: Sequence[str],
    tokenizer,
    *,
    style: str = "dapo",
    chat_template: bool = True,
    chat_template_kwargs: dict | None = None,
) -> list[str]:
    return [
        chat_prompt(
            tokenizer,
            user_message(p, style),
            chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs,
        )
        for p in problems
    ]

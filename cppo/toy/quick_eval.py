"""A minimal Avg@k for the toy testbed (sampling with HF generate, DAPO answer-line grading).

For calibrating warm starts and the RL check only; the suite's evaluation package is the
reference evaluator.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evaluation.dapo import dapo_correct, format_prompt


def chat_prompts(tokenizer: PreTrainedTokenizerBase, problems: Sequence[str]) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": format_prompt(p)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in problems
    ]


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    n: int,
    temperature: float,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> list[list[tuple[str, list[int], bool]]]:
    """n samples per chat-formatted prompt: (text, token ids up to and incl. eos, truncated)."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    flat = [p for p in prompts for _ in range(n)]
    out: list[tuple[str, list[int], bool]] = []
    gen = torch.Generator().manual_seed(seed)
    starts = range(0, len(flat), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress):
        chunk = flat[start : start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        # generate() draws from the global RNG; reseed it per chunk from our own stream.
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        seqs = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in seqs[:, enc["input_ids"].shape[1] :].tolist():
            ids = row[: row.index(eos) + 1] if eos in row else row
            text = tokenizer.decode(ids, skip_special_tokens=True)
            out.append((text, ids, eos not in row))
    if was_training:
        model.train()
    return [out[i * n : (i + 1) * n] for i in range(len(prompts))]


def toy_avg_at_k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    *,
    k: int = 16,
    temperature: float = 0.7,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Avg@k over benchmark rows {"problem", "answer"}: mean correctness of k samples each."""
    prompts = chat_prompts(tokenizer, [r["problem"] for r in rows])
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        n=k,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    correct = [
        [dapo_correct(t, str(r["answer"])) for t, _, _ in s]
        for s, r in zip(samples, rows, strict=True)
    ]
    n_samples = len(rows) * k
    lengths = [len(ids) for s in samples for _, ids, _ in s]
    return {
        "avg_at_k": sum(map(sum, correct)) / n_samples,
        "pass_at_k": sum(any(c) for c in correct) / len(rows),
        "k": k,
        "n_problems": len(rows),
        "n_truncated": sum(tr for s in samples for _, _, tr in s),
        "mean_length": sum(lengths) / n_samples,
        "per_problem": [sum(c) / k for c in correct],
    }

"""SFT warm start: a plain, seeded torch loop with the loss on the assistant response only.

A hand-written loop instead of TRL's SFTTrainer: on 2 CPU cores the Trainer's per-step
overhead is a large share of a ~0.1 s step, and the loop below is short enough to audit.
Each example is the chat-templated prompt (add_generation_prompt=True) followed by the
worked solution and <|im_end|>; only the solution and <|im_end|> tokens carry loss, so the
model learns to answer and to stop.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .models import read_meta, save_model_dir
from .presets import warm_start_phases
from .task import draw_slips, read_jsonl, worked_solution

IGNORE = -100


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]


def prompt_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]]
) -> list[Example]:
    """Tokenise train rows (DAPO schema + "solution") into prompt / response id lists."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    prompts = [prompt_text(tokenizer, r["prompt"]) for r in rows]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([r["solution"] for r in rows], add_special_tokens=False)["input_ids"]
    return [Example(p, r + [tokenizer.eos_token_id]) for p, r in zip(p_ids, r_ids, strict=True)]


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (IGNORE outside the response)."""
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n_p, n = len(e.prompt_ids), len(e.prompt_ids) + len(e.response_ids)
        ids[i, :n] = torch.tensor(e.prompt_ids + e.response_ids)
        mask[i, :n] = 1
        labels[i, n_p:n] = torch.tensor(e.response_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        batch["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE,
    )


def common_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """Length of the token prefix shared by every row that carries no loss."""
    ids, labels = batch["input_ids"], batch["labels"]
    same = (ids == ids[:1]).all(dim=0) & (labels == IGNORE).all(dim=0)
    not_same = (~same).nonzero()
    return int(not_same[0]) if len(not_same) else ids.shape[1]


def response_loss_shared_prefix(
    model: PreTrainedModel, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """response_loss, with the prompt prefix common to all rows (the DAPO template) run once.

    Every toy prompt starts with the same ~50 template tokens; computing their keys/values
    once and broadcasting them to the batch saves about a third of the FLOPs of a step. The
    gradient flows through the shared keys/values, so the loss and its gradient are those
    of response_loss (checked in the tests).
    """
    p = common_prefix_length(batch) - 1  # keep >= 1 token in the second pass
    if p < 8:
        return response_loss(model, batch)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    b = ids.shape[0]
    cache = model(input_ids=ids[:1, :p], use_cache=True).past_key_values
    for layer in cache.layers:
        layer.keys = layer.keys.expand(b, -1, -1, -1)
        layer.values = layer.values.expand(b, -1, -1, -1)
    pos = torch.arange(p, ids.shape[1]).unsqueeze(0).expand(b, -1)
    logits = model(
        input_ids=ids[:, p:],
        attention_mask=mask,
        past_key_values=cache,
        position_ids=pos,
        use_cache=True,
    ).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, p + 1 :].reshape(-1),
        ignore_index=IGNORE,
    )


def lr_at(step: int, s: dict[str, Any]) -> float:
    """Linear warmup, then cosine (or constant) decay to final_lr_fraction of the peak."""
    peak, warm, total = s["learning_rate"], s["warmup_steps"], s["steps"]
    if step < warm:
        return peak * (step + 1) / warm
    if s.get("schedule", "cosine") == "constant":
        return peak
    frac = (step - warm) / max(1, total - warm)
    floor = s.get("final_lr_fraction", 0.0)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def sft(
    model: PreTrainedModel,
    examples: Sequence[Example],
    settings: dict[str, Any],
    *,
    seed: int = 0,
    pad_id: int,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Run settings["steps"] optimizer steps; returns the logged loss history."""
    if not examples:
        raise ValueError("no training examples")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    order: list[int] = []
    bs = int(settings["batch_size"])
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=settings["learning_rate"],
        weight_decay=settings.get("weight_decay", 0.0),
        betas=(0.9, 0.98),
    )
    loss_fn = response_loss_shared_prefix if settings.get("share_prefix", True) else response_loss
    model.train()
    history: list[dict[str, float]] = []
    running, n_run = 0.0, 0
    bar = tqdm(range(int(settings["steps"])), desc="warm-start", disable=not progress)
    t0 = time.perf_counter()
    for step in bar:
        while len(order) < bs:  # epochs of fresh shuffles
            perm = list(range(len(examples)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[:bs], order[bs:]
        batch = collate([examples[i] for i in idx], pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings)
        loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.get("max_grad_norm", 1.0))
        opt.step()
        running += loss.item()
        n_run += 1
        every = int(settings.get("log_every", 10))
        if (step + 1) % every == 0 or step + 1 == settings["steps"]:
            rec = {
                "step": step + 1,
                "loss": running / n_run,
                "lr": lr_at(step, settings),
                "grad_norm": float(gn),
                "elapsed_s": time.perf_counter() - t0,
            }
            history.append(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            running, n_run = 0.0, 0
    model.eval()
    return history


def add_slips(
    rows: list[dict[str, Any]], step_rate: float, seed: int, data_dir: Path
) -> tuple[list[dict[str, Any]], int]:
    """Rewrite the worked solutions so that each step slips with probability `step_rate`.

    The base flavour uses this: SFT on such solutions teaches the procedure together with a
    per-step slip probability, so the warm-started policy is right only part of the time, for
    a reason RL can remove (sharpening every step towards the right total), and the starting
    accuracy is set by the rate instead of by where a short SFT happens to stop on this task's
    sharp, seed-dependent learning transition. Returns the rows and how many of them slipped.
    """
    if not step_rate:
        return rows, 0
    if not 0.0 < step_rate <= 1.0:
        raise ValueError(f"slip_rate must be in [0, 1], got {step_rate}")
    meta_path = data_dir / "meta.json"
    style = (
        json.loads(meta_path.read_text())["task_config"]["style"]
        if meta_path.exists()
        else "lettered"
    )
    rng = random.Random(f"slips:{seed}")
    out, n = [], 0
    for r in rows:
        if "terms" not in r:
            raise ValueError(
                "train rows carry no 'terms'; regenerate the data with `python -m cppo.toy data`"
            )
        slips = draw_slips(r["terms"], rng, step_rate)
        if slips:
            r = dict(r, solution=worked_solution(r["terms"], style, slips))
            n += 1
        out.append(r)
    return out, n


def warm_start(
    model_dir: str | Path,
    data_dir: str | Path,
    flavour: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """SFT a model directory on the toy train split and save the result as a model directory."""
    model_dir, data_dir = Path(model_dir), Path(data_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} is not a model directory (no config.json)")
    if not (data_dir / "train.jsonl").exists():
        raise FileNotFoundError(f"{data_dir / 'train.jsonl'} not found")
    meta = read_meta(model_dir)
    phases = warm_start_phases(flavour, meta.get("preset"), overrides)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    all_rows = read_jsonl(data_dir / "train.jsonl")
    history: list[dict[str, float]] = []
    n_examples = n_slipped = 0
    offset = 0
    t0 = time.perf_counter()
    for i, settings in enumerate(phases):
        # Each phase reads the next slice of the (already random) train split; only what
        # one pass needs is tokenised, and it is reshuffled on the fly.
        n_needed = int(settings["steps"]) * int(settings["batch_size"])
        take = min(len(all_rows), n_needed)
        rows = [all_rows[(offset + j) % len(all_rows)] for j in range(take)]
        offset += take
        rows, n = add_slips(rows, settings.get("slip_rate", 0.0), seed * 1000 + i, data_dir)
        examples = encode_examples(tokenizer, rows)
        n_examples += len(examples)
        n_slipped += n
        hist = sft(
            model,
            examples,
            settings,
            seed=seed * 1000 + i,
            pad_id=tokenizer.pad_token_id,
            progress=progress,
        )
        history += [{"phase": i, **h} for h in hist]
    seconds = time.perf_counter() - t0
    record = {
        "flavour": flavour,
        "seed": seed,
        "phases": phases,
        "steps": sum(int(p["steps"]) for p in phases),
        "train_seconds": seconds,
        "threads": torch.get_num_threads(),
        "n_examples": n_examples,
        "n_slipped": n_slipped,
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }
    summary = {k: v for k, v in record.items() if k != "history"}
    save_model_dir(model, tokenizer, out_dir, {**meta, "warm_start": summary})
    (Path(out_dir) / "warm_start.json").write_text(
        json.dumps(record, indent=2) + "\n", encoding="utf-8"
    )
    return record

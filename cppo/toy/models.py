"""Tiny Qwen3 / Qwen3-MoE models built from presets, saved as complete HF model directories.

The model is built by evaluation.tiny (shared with the tests); this module resolves preset names
(cppo/toy/presets.yaml), counts parameters and writes the toy metadata file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evaluation import tiny

from .presets import model_preset

META_FILE = "toy_model.json"


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Total (tied weights counted once), embedding, and per-token active parameters for MoE."""
    seen: set[int] = set()
    total = 0
    for prm in model.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            total += prm.numel()
    emb = model.get_input_embeddings().weight.numel()
    cfg = model.config
    active = total
    n_exp = getattr(cfg, "num_experts", 0) or 0
    if n_exp:
        expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        active = total - expert + expert * cfg.num_experts_per_tok // n_exp
    return {"total": total, "embedding": emb, "non_embedding": total - emb, "active": active}


def build_model(
    preset: str | dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedModel:
    """`preset`: a name of cppo/toy/presets.yaml, or the preset dict itself."""
    p = model_preset(preset) if isinstance(preset, str) else preset
    return tiny.build_model(p, tokenizer, seed=seed)


def save_model_dir(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Model + tokenizer + a small metadata file: one directory is a complete model."""
    out = tiny.save_pretrained_dir(model, tokenizer, out_dir)
    info = read_meta(out)
    info.update(meta or {})
    info["parameters"] = count_parameters(model)
    (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

"""Tiny Qwen3 / Qwen3-MoE models built from presets, saved as complete HF model directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    Qwen3MoeConfig,
)

from .presets import model_preset

META_FILE = "toy_model.json"

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


def make_config(
    preset: str | dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> PretrainedConfig:
    p = model_preset(preset) if isinstance(preset, str) else dict(preset)
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
        vocab_size=len(tokenizer),
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
    config = make_config(preset, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return model


def save_model_dir(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Model + tokenizer + a small metadata file: one directory is a complete model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = read_meta(out)
    info.update(meta or {})
    info["parameters"] = count_parameters(model)
    (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


def read_meta(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

"""Sampling on the transformers model with a preallocated KV cache: the toy's rollout and
evaluation engine.

`model.generate` on CPU spends a third of its time copying the KV cache (a `torch.cat` per
token, and the grouped-query heads repeated to the query heads every step). This loop runs
the same HF model with

- one preallocated key/value buffer per layer ([rows, kv_heads, capacity, head_dim]), written in
  place;
- attention that never repeats the grouped KV heads (`sdpa_gqa`: two matmuls with a KV head's
  query heads stacked when decoding, PyTorch's fused kernel for a prefill);
- each distinct prompt prefilled once and its K/V copied to its samples' rows (a GRPO batch
  holds every prompt `n` times);
- finished rows dropped from the batch once a quarter of it has finished.

It draws from exactly the model's distribution: logits / temperature, then top-k, then top-p
(the order of transformers' sampling warpers), then `torch.multinomial` on the global RNG. The
same logits give mu's record for the trainer at no extra forward: the sampled token's log-prob
and the top-K of log_softmax(logits / temperature) (untruncated, as the trainer recomputes it).

Rows are left-padded in the buffer; a boolean mask hides padding, and positions count real
tokens only (transformers' generate convention), so each row sees what it would see alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

GQA_ATTENTION = "cppo_sdpa_gqa"
# drop finished rows from the batch once this share of it has finished (each drop copies the cache)
COMPACT_SHARE = 0.25


def sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **_):
    """transformers attention function: grouped-query heads broadcast, never copied.

    One query row per sequence (a decoding step): explicit matmul attention, the query heads of
    each KV head stacked as extra query rows; on CPU several times faster than PyTorch's fused
    kernel at these sizes (head sizes of 24-32). Several query rows (a prefill, the loss
    forward): PyTorch's fused kernel reading the grouped heads itself (`enable_gqa`), 1.6x
    faster than the matmuls there in forward + backward on CPU. A missing mask is causal,
    aligned to the last key. `attention_mask`: boolean (True = attend) or additive."""
    if dropout:
        raise ValueError("sdpa_gqa: attention dropout is not supported")
    b, heads, q_len, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    if attention_mask is None and q_len > 1:
        causal = torch.ones(q_len, keys, dtype=torch.bool, device=query.device)
        attention_mask = causal.tril(keys - q_len)
    if q_len > 1:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    q = query.reshape(b, kv_heads, groups * q_len, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).mul_(scale)
    scores = scores.view(b, kv_heads, groups, q_len, keys)
    if attention_mask is not None:
        if attention_mask.dim() == 4:  # [b, 1, q, k]
            attention_mask = attention_mask[:, :, None]
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:  # an additive mask
            scores = scores + attention_mask
    probs = scores.softmax(dim=-1).view(b, kv_heads, groups * q_len, keys)
    out = torch.matmul(probs, value).view(b, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_ATTENTION, sdpa_gqa)


@contextlib.contextmanager
def gqa_attention(model) -> Iterator[None]:
    """Within the block, the model's attention layers run `sdpa_gqa`."""
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = GQA_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved


def parts_of(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, LM head) of a causal LM; the head is applied here, in fp32."""
    backbone = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None:
        raise TypeError(f"{type(model).__name__}: expected a causal LM with .model and an LM head")
    if getattr(model.config, "use_sliding_window", False):
        # the explicit masks here are full causal ones
        raise TypeError(f"{type(model).__name__}: sliding-window attention is not supported")
    return backbone, head


# config attributes with which a model's forward rescales its LM head's output (those that
# cppo.training.lmhead.head_spec_for reads): the default head below does not apply them
LOGIT_SCALING = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def plain_head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """fp32 logits of the model's LM head, for models whose forward adds no logit scaling."""
    cfg = model.config.get_text_config()
    scaled = [a for a in LOGIT_SCALING if getattr(cfg, a, None) is not None]
    if scaled:
        raise TypeError(
            f"{type(model).__name__} rescales its logits ({', '.join(scaled)}): pass `head=`"
        )
    _, lm_head = parts_of(model)
    bias = None if lm_head.bias is None else lm_head.bias.float()
    return lambda hidden: F.linear(hidden.float(), lm_head.weight.float(), bias)


class KVBuffer:
    """A transformers cache (duck-typed: `update`) over preallocated per-layer buffers.

    `length` slots are filled; a forward writes its tokens after them and the caller advances
    `length` once per forward (every layer writes the same slots)."""

    def __init__(self, rows: int, capacity: int):
        self.rows, self.capacity, self.length = rows, capacity, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_, **__):
        if layer_idx == len(self.keys):
            shape = (self.rows, key.shape[1], self.capacity, key.shape[3])
            self.keys.append(key.new_empty(shape))
            self.values.append(value.new_empty(shape))
        end = self.length + key.shape[2]
        if end > self.capacity:
            raise RuntimeError(f"KV buffer full: {end} > {self.capacity} slots")
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[:, :, self.length : end] = key
        v[:, :, self.length : end] = value
        return k[:, :, :end], v[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Rows in this order, into new buffers (e.g. each prompt's K/V to its samples' rows)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.rows = int(rows.numel())

    def keep(self, rows: list[int]) -> None:
        """Keep these rows (ascending), moved down in place: dropping finished rows needs no
        second buffer."""
        for new, old in enumerate(rows):
            if new != old:
                for buf in (*self.keys, *self.values):
                    buf[new, :, : self.length] = buf[old, :, : self.length]
        self.keys = [k[: len(rows)] for k in self.keys]
        self.values = [v[: len(rows)] for v in self.values]
        self.rows = len(rows)


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, max_len] ids and the boolean mask of real tokens, padding on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool, device=device)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.as_tensor(list(s), device=device)
            mask[i, width - len(s) :] = True
    return ids, mask


def prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """[n, 1, L, L] causal mask over left-padded rows. A padding query attends to itself only,
    so no softmax row is empty (its output is never read)."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    mask = causal & valid[:, None, None, :]
    return mask | torch.eye(length, dtype=torch.bool, device=valid.device)


def positions(valid: torch.Tensor) -> torch.Tensor:
    """Position of each slot counting real tokens only (0 for padding)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def filter_logits(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of z / T, as transformers' warpers: -inf outside.
    Top-p keeps the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    out = scaled
    if top_k and top_k < out.shape[-1]:
        kth = out.topk(top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = out.sort(dim=-1, descending=False)
        cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        out = out.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return out


@dataclass
class Rollouts:
    """Sampled completions (through the first eos), and mu's record when asked for.

    `logps[i]` holds log p(token) under log_softmax(z / T) for each token of completion i;
    `topk_ids[i]` / `topk_logps[i]` are [len_i, K] (K = 0: None)."""

    completions: list[list[int]]
    truncated: list[bool]
    logps: list[torch.Tensor]
    topk_ids: list[torch.Tensor] | None = None
    topk_logps: list[torch.Tensor] | None = None


@torch.no_grad()
def sample(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    record_topk: int = 0,
    generator: torch.Generator | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Rollouts:
    """One completion per entry of `prompts` (repeat a prompt for several samples).

    temperature <= 0 is greedy decoding (the recorded log-probs are then those of T = 1).
    `head` maps the last hidden states to fp32 logits z (default: `plain_head(model)`); the
    loop samples from z / T."""
    if max_new_tokens < 1 or not prompts:
        raise ValueError("need at least one prompt and max_new_tokens >= 1")
    backbone, lm_head = parts_of(model)
    greedy = temperature <= 0
    t = 1.0 if greedy else float(temperature)
    head = head or plain_head(model)
    device = lm_head.weight.device
    eos = torch.tensor(sorted(set(int(e) for e in eos_ids)), device=device)

    # each distinct prompt once
    index: dict[tuple[int, ...], int] = {}
    owner = torch.tensor(
        [index.setdefault(tuple(p), len(index)) for p in prompts], dtype=torch.long, device=device
    )
    distinct = list(index)
    ids, valid = left_pad(distinct, pad_id, device)
    width = ids.shape[1]
    cache = KVBuffer(len(distinct), width + max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        with gqa_attention(model):
            hidden = backbone(
                input_ids=ids,
                attention_mask=prefill_mask(valid),
                position_ids=positions(valid),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
            cache.length = width
            cache.select(owner)
            logits = (head(hidden) / t).index_select(0, owner)
            rows = len(prompts)
            alive = torch.arange(rows, device=device)  # original index of each buffer row
            row_valid = valid.index_select(0, owner)
            next_pos = valid.sum(dim=1).index_select(0, owner)
            tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
            token_logps = torch.zeros((rows, max_new_tokens), device=device)
            if record_topk:
                k_ids = torch.zeros(
                    (rows, max_new_tokens, record_topk), dtype=torch.long, device=device
                )
                k_logps = torch.zeros((rows, max_new_tokens, record_topk), device=device)
            lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
            done = torch.zeros(rows, dtype=torch.bool, device=device)
            for step in range(max_new_tokens):
                logp = logits.log_softmax(dim=-1)
                if greedy:
                    tok = logits.argmax(dim=-1)
                else:
                    probs = filter_logits(logits, top_k, top_p).softmax(dim=-1)
                    tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                tokens[alive, step] = tok
                token_logps[alive, step] = logp.gather(1, tok[:, None]).squeeze(1)
                if record_topk:
                    top = logp.topk(record_topk, dim=-1)
                    k_ids[alive, step], k_logps[alive, step] = top.indices, top.values
                ended = torch.isin(tok, eos) & ~done[alive]
                if ended.any():
                    lengths[alive[ended]] = step + 1
                    done[alive[ended]] = True
                if step + 1 == max_new_tokens or bool(done.all()):
                    break
                keep = ~done[alive]
                if int((~keep).sum()) >= COMPACT_SHARE * len(alive):
                    kept = keep.nonzero().squeeze(1)
                    cache.keep(kept.tolist())
                    alive, tok = alive[kept], tok[kept]
                    row_valid, next_pos = row_valid[kept], next_pos[kept]
                slot_mask = torch.cat(
                    [row_valid, row_valid.new_ones((len(alive), cache.length - width + 1))], dim=1
                )
                hidden = backbone(
                    input_ids=tok[:, None],
                    attention_mask=slot_mask[:, None, None, :],
                    position_ids=next_pos[:, None],
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state[:, -1]
                cache.length += 1
                next_pos = next_pos + 1
                logits = head(hidden) / t
    finally:
        if was_training:
            model.train()
    lens = lengths.tolist()
    out = Rollouts(
        completions=[tokens[i, :n].tolist() for i, n in enumerate(lens)],
        truncated=(~done).tolist(),
        logps=[token_logps[i, :n] for i, n in enumerate(lens)],
    )
    if record_topk:
        out.topk_ids = [k_ids[i, :n] for i, n in enumerate(lens)]
        out.topk_logps = [k_logps[i, :n] for i, n in enumerate(lens)]
    return out

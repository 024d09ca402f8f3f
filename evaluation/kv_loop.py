"""Sampling on the transformers model with a preallocated KV cache: the toy's rollout and
evaluation engine.

`model.generate` on CPU spends a third of its time copying the KV cache (a `torch.cat` per
token, and the grouped-query heads repeated to the query heads every step). This loop runs
the same HF model with

- each distinct prompt prefilled once and its keys/values kept once (a GRPO batch holds every
  prompt `n` times, an Avg@k evaluation k times);
- one preallocated key/value buffer per layer for the sampled tokens ([rows, kv_heads,
  capacity, head_dim]), written in place;
- decoding attention in two parts (`PromptSharedKV`): the prompt's keys read once for all its
  samples (their query rows stacked into one matmul), the row's own sampled tokens, one softmax
  over both. At these sizes decoding is bound by reading the cache, and the prompt is most of it;
- attention that never repeats the grouped KV heads (`sdpa_gqa`);
- finished rows dropped from the batch once a quarter of it has finished.

It draws from exactly the model's distribution: logits / temperature, then top-k, then top-p
(the order of transformers' sampling warpers), then `torch.multinomial` on the global RNG. The
same logits give mu's record for the trainer at no extra forward: the sampled token's log-prob
and the top-K of log_softmax(logits / temperature) (untruncated, as the trainer recomputes it).

Prompts are left-padded; a boolean mask hides padding, and positions count real tokens only
(transformers' generate convention), so each row sees what it would see alone.
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


def sdpa_gqa(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, prompt_kv=None, **_
):
    """transformers attention function: grouped-query heads broadcast, never copied.

    One query row per sequence (a decoding step): explicit matmul attention, the query heads of
    each KV head stacked as extra query rows; on CPU several times faster than PyTorch's fused
    kernel at these sizes (head sizes of 24-32). Several query rows (a prefill, the loss
    forward): PyTorch's fused kernel reading the grouped heads itself (`enable_gqa`), 1.6x
    faster than the matmuls there in forward + backward on CPU. A missing mask is causal,
    aligned to the last key. `attention_mask`: boolean (True = attend) or additive.
    `prompt_kv` (a `PromptSharedKV` while decoding): `key`/`value` are the rows' own tokens and
    the prompt part comes from it."""
    if dropout:
        raise ValueError("sdpa_gqa: attention dropout is not supported")
    b, heads, q_len, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = dim**-0.5 if scaling is None else scaling
    if attention_mask is None and q_len > 1:
        causal = torch.ones(q_len, keys, dtype=torch.bool, device=query.device)
        attention_mask = causal.tril(keys - q_len)
    if prompt_kv is not None and q_len == 1:
        return prompt_kv.attend(module.layer_idx, query, key, value, attention_mask, scale), None
    if q_len > 1:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scale, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None
    q = query.reshape(b, kv_heads, groups * q_len, dim)
    scores = torch.matmul(q, key.transpose(-1, -2)).mul_(scale)
    scores = _masked_scores(scores.view(b, kv_heads, groups, q_len, keys), attention_mask)
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


def _masked_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """scores [b, kv, g, q, k] under a [b, 1, q, k] mask, boolean (True = attend) or additive."""
    if mask is None:
        return scores
    if mask.dim() == 4:
        mask = mask[:, :, None]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


class PromptSharedKV:
    """A transformers cache (duck-typed: `update`) holding each distinct prompt's keys/values
    once and each row's sampled tokens in preallocated buffers.

    Prefill (`decoding` False): the distinct prompts' keys/values are kept as computed. Decoding:
    a forward writes its token after the `length` filled slots of each row and `attend` adds the
    prompt part; the caller advances `length` once per forward (every layer writes one slot).
    `owner[r]` is the prompt of row r."""

    def __init__(self, owner: torch.Tensor, prompt_valid: torch.Tensor, capacity: int):
        self.capacity, self.length, self.decoding = capacity, 0, False
        self.prompt_valid = prompt_valid  # [prompts, width], False on left padding
        self.prompt_keys: list[torch.Tensor] = []
        self.prompt_values: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._rows_are(owner)

    def _rows_are(self, owner: torch.Tensor) -> None:
        """Row r attends to prompt owner[r]; its query sits at place `rank[r]` among that
        prompt's rows, so one matmul per prompt reads that prompt's keys for all its rows."""
        self.owner, self.rows = owner, len(owner)
        counts: dict[int, int] = {}
        rank = []
        for o in owner.tolist():
            rank.append(counts.get(o, 0))
            counts[o] = rank[-1] + 1
        self.per_prompt = max(counts.values())
        self.rank = torch.tensor(rank, device=owner.device)
        self.row_prompt_valid = self.prompt_valid.index_select(0, owner)[:, None, None, :]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_, **__):
        if not self.decoding:
            # contiguous: the projections leave them head-major, and a matmul would copy them
            # back at every decoding step
            self.prompt_keys.append(key.contiguous())
            self.prompt_values.append(value.contiguous())
            return key, value
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

    def keep(self, rows: list[int]) -> None:
        """Keep these rows (ascending), moved down in place: dropping finished rows needs no
        second buffer."""
        for new, old in enumerate(rows):
            if new != old:
                for buf in (*self.keys, *self.values):
                    buf[new, :, : self.length] = buf[old, :, : self.length]
        n = len(rows)
        self.keys = [k[:n] for k in self.keys]
        self.values = [v[:n] for v in self.values]
        self._rows_are(self.owner[torch.tensor(rows, device=self.owner.device)])

    def _by_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, kv, g, n] -> [prompts, kv, per_prompt * g, n], zeros at empty places."""
        rows, kv, g, n = x.shape
        table = x.new_zeros(self.prompt_valid.shape[0], kv, self.per_prompt, g, n)
        table[self.owner, :, self.rank] = x
        return table.view(table.shape[0], kv, self.per_prompt * g, n)

    def _by_row(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """Inverse of `_by_prompt`: [prompts, kv, per_prompt * g, n] -> [rows, kv, g, n]."""
        prompts, kv, _, n = x.shape
        return x.view(prompts, kv, self.per_prompt, g, n)[self.owner, :, self.rank]

    def attend(self, layer, query, key, value, mask, scale) -> torch.Tensor:
        """One decoding step's attention over [the row's prompt | the row's own tokens]: the
        same softmax as over one concatenated sequence. query [rows, heads, 1, dim]."""
        rows, heads, _, dim = query.shape
        kv = key.shape[1]
        g = heads // kv
        q = query.view(rows, kv, g, dim)
        prompt_scores = self._by_row(
            torch.matmul(self._by_prompt(q), self.prompt_keys[layer].transpose(-1, -2)), g
        )
        prompt_scores = prompt_scores.masked_fill(~self.row_prompt_valid, float("-inf"))
        own = torch.matmul(q, key.transpose(-1, -2)).view(rows, kv, g, 1, -1)
        own = _masked_scores(own, mask).view(rows, kv, g, -1)
        width = prompt_scores.shape[-1]
        probs = torch.cat([prompt_scores, own], dim=-1).mul_(scale).softmax(dim=-1)
        out = self._by_row(
            torch.matmul(self._by_prompt(probs[..., :width]), self.prompt_values[layer]), g
        )
        out = out + torch.matmul(probs[..., width:], value)
        return out.view(rows, heads, 1, dim).transpose(1, 2).contiguous()


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
    cache = PromptSharedKV(owner, valid, max_new_tokens)
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
            cache.decoding = True
            logits = (head(hidden) / t).index_select(0, owner)
            rows = len(prompts)
            alive = torch.arange(rows, device=device)  # original index of each buffer row
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
                    alive, tok, next_pos = alive[kept], tok[kept], next_pos[kept]
                # the rows' own tokens: no padding (the prompt part's is masked in the cache)
                own = torch.ones(
                    len(alive), 1, 1, cache.length + 1, dtype=torch.bool, device=device
                )
                hidden = backbone(
                    input_ids=tok[:, None],
                    attention_mask=own,
                    position_ids=next_pos[:, None],
                    past_key_values=cache,
                    use_cache=True,
                    prompt_kv=cache,
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

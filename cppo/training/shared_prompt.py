"""The loss forward with each distinct prompt run once: the shared-prompt layout.

A GRPO minibatch holds every prompt `n` times (TRL's padded layout runs prompt + completion
for every row), and every prompt starts with the same chat-template tokens. Here three passes
of the same model share that work: the prefix common to all prompts runs once (batch 1), the
rest of each distinct prompt once (left-padded), and the completions on top. Each pass reads
the earlier passes' keys and values indexed to its rows (autograd sums the copies' gradients
back); positions continue across passes as in one sequence. Same function of the weights: only
the arithmetic order changes.

The log-probs come from the hidden states through the LM head in row chunks, each chunk
recomputed in the backward pass (torch.utils.checkpoint), so at most one [chunk, C, V] block of
logits is alive at a time, whatever the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cppo.training.lmhead import HeadSpec, head_logits
from evaluation.kv_loop import gqa_attention, left_pad, parts_of, positions, prefill_mask

# logits elements per chunk (fp32: 64 MiB)
CHUNK_ELEMENTS = 1 << 24


class PassKV:
    """A transformers cache (duck-typed: `update`) for passes stacked on earlier ones: a pass's
    keys/values are those of the earlier passes, indexed to its rows, then its own."""

    def __init__(self) -> None:
        self.done: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.maps: list[torch.Tensor] = []  # per earlier pass: its row for each current row
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def next_pass(self, maps: list[torch.Tensor]) -> None:
        """Close the current pass; `maps` gives, per closed pass, the row of each new row."""
        self.done.append((self.keys, self.values))
        self.keys, self.values, self.maps = [], [], maps

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *_, **__):
        self.keys.append(key)
        self.values.append(value)
        ks = [
            k[layer_idx].index_select(0, m) for (k, _), m in zip(self.done, self.maps, strict=True)
        ]
        vs = [
            v[layer_idx].index_select(0, m) for (_, v), m in zip(self.done, self.maps, strict=True)
        ]
        return torch.cat([*ks, key], dim=2), torch.cat([*vs, value], dim=2)


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token."""
    limit = min(len(x) for x in seqs) - 1
    n = 0
    while n < limit and all(x[n] == seqs[0][n] for x in seqs):
        n += 1
    return n


@dataclass
class TokenStats:
    """Per completion token: log p(y) (with grad), entropy (no grad), log p at `gather_ids`."""

    logps: torch.Tensor  # [B, C]
    entropies: torch.Tensor  # [B, C]
    gathered: torch.Tensor | None  # [B, C, K]

    @staticmethod
    def cat(parts: list[TokenStats], rows: torch.Tensor) -> TokenStats:
        """The parts' rows stacked, then put back in place: row i of the stack is row rows[i]."""
        back = torch.argsort(rows)

        def join(xs):
            return None if xs[0] is None else torch.cat(xs).index_select(0, back)

        return TokenStats(
            join([p.logps for p in parts]),
            join([p.entropies for p in parts]),
            join([p.gathered for p in parts]),
        )


def _stats(head, spec, hidden, ids, gather_ids):
    logp = head_logits(head, hidden, spec).log_softmax(dim=-1)
    sampled = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    gathered = None if gather_ids is None else logp.gather(-1, gather_ids)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(dim=-1)
    return sampled, entropy, gathered


def shared_prompt_forward(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    spec: HeadSpec,
    gather_ids: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
) -> TokenStats:
    """Log-probs of `completion_ids` [B, C] after left-padded prompts [B, P], each distinct
    prompt computed once. Right padding of the completions is harmless (causal attention: no
    real token sees it); its positions get values that the caller masks. With
    `completion_mask`, columns that are padding in every row are not computed (zeros)."""
    width = completion_ids.shape[1]
    if completion_mask is not None:
        used = max(1, int(completion_mask.sum(dim=1).max()))
        if used < width:
            stats = shared_prompt_forward(
                model,
                prompt_ids,
                prompt_mask,
                completion_ids[:, :used],
                spec,
                None if gather_ids is None else gather_ids[:, :used],
            )
            return TokenStats(
                F.pad(stats.logps, (0, width - used)),
                F.pad(stats.entropies, (0, width - used)),
                None if stats.gathered is None else F.pad(stats.gathered, (0, 0, 0, width - used)),
            )
    backbone, head = parts_of(model)
    device = completion_ids.device
    valid = prompt_mask.bool()
    key = torch.where(valid, prompt_ids, torch.full_like(prompt_ids, -1))
    distinct, owner = torch.unique(key, dim=0, return_inverse=True)
    seqs = [row[row >= 0].tolist() for row in distinct]
    shared = common_prefix(seqs)  # e.g. the chat template's system turn, in every prompt
    suffix_ids, suffix_valid = left_pad([x[shared:] for x in seqs], 0, device)
    width, n_comp, n_distinct = suffix_ids.shape[1], completion_ids.shape[1], len(seqs)
    cache = PassKV()
    with gqa_attention(model):
        if shared:
            backbone(
                input_ids=torch.tensor([seqs[0][:shared]], device=device),
                attention_mask=prefill_mask(torch.ones(1, shared, dtype=torch.bool, device=device)),
                position_ids=torch.arange(shared, device=device)[None],
                past_key_values=cache,
                use_cache=True,
            )
            cache.next_pass([torch.zeros(n_distinct, dtype=torch.long, device=device)])
        before = torch.ones(n_distinct, 1, width, shared, dtype=torch.bool, device=device)
        prompt_hidden = backbone(
            input_ids=suffix_ids,
            attention_mask=torch.cat([before, prefill_mask(suffix_valid)], dim=-1),
            position_ids=shared + positions(suffix_valid),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        cache.next_pass([*(m.index_select(0, owner) for m in cache.maps), owner])
        row_valid = suffix_valid.index_select(0, owner)
        start = shared + row_valid.sum(dim=1, keepdim=True)
        n_rows = len(owner)
        causal = torch.ones(n_comp, n_comp, dtype=torch.bool, device=device).tril()
        mask = torch.cat(
            [
                torch.ones(n_rows, 1, n_comp, shared, dtype=torch.bool, device=device),
                row_valid[:, None, None, :].expand(-1, 1, n_comp, width),
                causal.expand(n_rows, 1, n_comp, n_comp),
            ],
            dim=-1,
        )
        comp_hidden = backbone(
            input_ids=completion_ids,
            attention_mask=mask,
            position_ids=start + torch.arange(n_comp, device=device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
    # the hidden state before each completion token predicts it
    hidden = torch.cat([prompt_hidden.index_select(0, owner)[:, None], comp_hidden[:, :-1]], dim=1)
    vocab = head.weight.shape[0]
    rows = max(1, CHUNK_ELEMENTS // max(1, n_comp * vocab))
    parts = []
    for r in range(0, hidden.shape[0], rows):
        g = None if gather_ids is None else gather_ids[r : r + rows]
        args = (head, spec, hidden[r : r + rows], completion_ids[r : r + rows], g)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_stats, *args, use_reentrant=False))
        else:
            parts.append(_stats(*args))
    logps = torch.cat([p[0] for p in parts])
    entropies = torch.cat([p[1] for p in parts])
    gathered = None if gather_ids is None else torch.cat([p[2] for p in parts])
    return TokenStats(logps, entropies, gathered)

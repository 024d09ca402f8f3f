"""The Top-K divergence on verl: pi's logits against mu's top-K log-probs (torch only).

mu's top-K ids and log-probs travel in verl's distillation fields ``teacher_ids`` /
``teacher_logprobs`` (``[tokens, K]`` over the whole sequence, row j = the distribution of token
j + 1, as vLLM's prompt log-probs come back; ``cppo.backends.verl.agent_loop`` fills them).
Slots the engine did not fill hold log-prob 0.0, which would read as probability 1:
:func:`teacher_topk` turns them into -inf (no mass), the convention of ``cppo.divergence``.

verl's engine hands the loss pi's logits ``[tokens, V]`` once per micro-batch;
:func:`log_probs_at` takes log softmax at mu's ids a chunk of rows at a time, so no fp32
``[tokens, V]`` log-softmax is ever held (18,432 tokens x 151,936 vocabulary would be 11.2 GB).
"""

from __future__ import annotations

import torch
from torch import Tensor

from cppo.divergence import GATHER_CHUNK_BYTES, compute_divergence

__all__ = [
    "chunk_rows",
    "log_probs_at",
    "prefill_gap",
    "teacher_topk",
    "topk_divergence",
]


def chunk_rows(vocab: int, budget_bytes: int = GATHER_CHUNK_BYTES) -> int:
    """Rows of ``[rows, vocab]`` logits that :func:`log_probs_at` converts to fp32 at once."""
    return max(1, budget_bytes // (8 * vocab))


def log_probs_at(logits: Tensor, ids: Tensor, rows: int | None = None) -> Tensor:
    """log softmax(logits) at ``ids``: ``[N, V]`` logits, ``[N, K]`` ids -> ``[N, K]`` fp32.

    log softmax(x)_i = x_i - logsumexp(x), computed in fp32 ``rows`` rows at a time (default
    :func:`chunk_rows`). No gradient: D is a constant of the loss.
    """
    n, vocab = logits.shape
    rows = rows or chunk_rows(vocab)
    out = torch.empty(ids.shape, dtype=torch.float32, device=logits.device)
    with torch.no_grad():
        for start in range(0, n, rows):
            x = logits[start : start + rows].float()
            picked = x.gather(-1, ids[start : start + rows].long())
            out[start : start + rows] = picked - torch.logsumexp(x, dim=-1, keepdim=True)
    return out


def teacher_topk(teacher_ids: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """verl's padded teacher fields -> (ids, log-probs) with padding slots at -inf.

    A slot after the first whose log-prob is exactly 0.0 is padding: a genuine 0.0 means
    probability 1, which only the most likely token can have. The first slot is kept as is
    (0.0 there is probability 1, or a padded position the response mask drops).
    """
    slot = torch.arange(teacher_logprobs.shape[-1], device=teacher_logprobs.device)
    pad = (teacher_logprobs == 0.0) & (slot > 0)
    logprobs = teacher_logprobs.float().masked_fill(pad, float("-inf"))
    return teacher_ids.long(), logprobs


def topk_divergence(
    kind: str,
    *,
    logp: Tensor,
    logp_mu: Tensor,
    pi_topk: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    token_ids: Tensor,
    response_mask: Tensor,
    topk: int,
    sampled_token: str = "extra",
) -> Tensor:
    """D_t (``topk_tv`` or ``topk_kl``) at the response positions ``[B, T]``: pi's log-probs of
    the sampled tokens (``logp``) and at mu's ids (``pi_topk`` ``[B, T, K]``), mu's sampled
    log-probs (``logp_mu``) and its padded top-K fields ``[B, T, K]``."""
    if not kind.startswith("topk"):
        raise ValueError(f"{kind!r} is not a Top-K divergence")
    ids, lp_mu_k = teacher_topk(teacher_ids, teacher_logprobs)
    with torch.no_grad():
        return compute_divergence(
            kind,
            logp=logp.detach(),
            logp_mu=logp_mu,
            response_mask=response_mask.bool(),
            topk_logp=pi_topk.float(),
            topk_logp_mu=lp_mu_k,
            topk_ids=ids,
            token_ids=token_ids.long(),
            topk=topk,
            sampled_token=sampled_token,
        )


def prefill_gap(
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    token_ids: Tensor,
    logp_mu: Tensor,
    response_mask: Tensor,
) -> tuple[float, float]:
    """(mean |prefill log mu - decode log mu| over the sampled tokens found in the prefill's
    top-K, the fraction of response tokens found there): how far mu's top-K, taken by a second
    prefill pass over prompt + response, sits from the decode pass that sampled the response
    (its log-prob of the sampled token is mu in the ratio). NaN when no token is found."""
    ids, lps = teacher_topk(teacher_ids, teacher_logprobs)
    hit = (ids == token_ids.long().unsqueeze(-1)) & torch.isfinite(lps)
    found = hit.any(-1) & response_mask.bool()
    prefill = torch.where(hit, lps, torch.zeros_like(lps)).sum(-1)
    tokens = int(response_mask.bool().sum())
    n = int(found.sum())
    if n == 0:
        return float("nan"), 0.0 if tokens else float("nan")
    gap = (prefill - logp_mu.float()).abs()[found].mean()
    return float(gap), n / tokens

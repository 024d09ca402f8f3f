"""The Top-K divergence on verl: pi's full logits against mu's top-K log-probs.

verl's rollout returns only the sampled token's log-prob; mu's top-K ids and log-probs travel
in the batch fields of its distillation path, ``teacher_ids`` / ``teacher_logprobs``
``[B, T, K]`` (filled from vLLM by ``cppo.backends.verl.rollout``), padded with log-prob 0.0,
which would read as probability 1. The engine hands a logits processor pi's logits at every
position, so pi's log-probabilities at mu's ids are a gather away and nothing of vocabulary
size is kept. :func:`topk_divergence` is that computation; the padding slots become -inf (no
mass), the convention of ``cppo.divergence``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cppo.divergence import compute_divergence

__all__ = ["pi_at_ids", "teacher_topk", "topk_divergence"]


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


def pi_at_ids(logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) at ``ids``: ``[..., V]`` logits, ``[..., K]`` ids."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, ids)


def topk_divergence(
    kind: str,
    *,
    logits: Tensor,
    token_ids: Tensor,
    logp_mu: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    response_mask: Tensor,
    topk: int,
    sampled_token: str = "extra",
    temperature: float = 1.0,
) -> Tensor:
    """D_t (``topk_tv`` or ``topk_kl``) from pi's logits ``[B, T, V]`` at the response
    positions (row t predicts token t) and mu's padded top-K fields ``[B, T, K]``."""
    if not kind.startswith("topk"):
        raise ValueError(f"{kind!r} is not a Top-K divergence")
    ids, lp_mu_k = teacher_topk(teacher_ids, teacher_logprobs)
    with torch.no_grad():
        lp_pi_k = pi_at_ids(logits, ids, temperature)
        logp = pi_at_ids(logits, token_ids.long().unsqueeze(-1), temperature).squeeze(-1)
        return compute_divergence(
            kind,
            logp=logp,
            logp_mu=logp_mu,
            response_mask=response_mask.bool(),
            topk_logp=lp_pi_k,
            topk_logp_mu=lp_mu_k,
            topk_ids=ids,
            token_ids=token_ids.long(),
            topk=topk,
            sampled_token=sampled_token,
        )

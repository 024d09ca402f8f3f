"""Loss aggregation over a ``[B, T]`` per-token loss: one place, used by every rule.

Modes (the verl names):

* ``token-mean``: sum over all response tokens / number of response tokens (the paper's
  stack, DAPO). Rows whose rule rejected them (TRM) still count in the denominator.
* ``seq-mean-token-mean``: per response, sum / its length; then mean over responses.
* ``seq-mean-token-sum``: per response, sum; then mean over responses.
* ``seq-mean-token-sum-norm``: per response, sum / ``horizon`` (a constant, Dr. GRPO); then mean
  over responses. ``horizon`` defaults to T (the tensor's last dimension).

Responses with no real token are left out of the mean over responses. With ``normalizer``
the denominator (token count for token-mean, number of responses otherwise) is replaced, e.g.
by a global count when gradients are accumulated over micro-batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AGGREGATION_MODES", "aggregate_loss"]

AGGREGATION_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def aggregate_loss(
    per_token_loss: Tensor,
    response_mask: Tensor,
    mode: str = "token-mean",
    horizon: int | None = None,
    *,
    normalizer: float | None = None,
) -> Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar (see module docstring for the modes)."""
    if per_token_loss.shape != response_mask.shape or per_token_loss.dim() != 2:
        raise ValueError(
            f"per_token_loss {tuple(per_token_loss.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must be the same [B, T] shape"
        )
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=per_token_loss.dtype, device=per_token_loss.device)
    loss = torch.where(mask, per_token_loss, zero)
    if mode == "token-mean":
        denom = float(normalizer) if normalizer is not None else max(int(mask.sum()), 1)
        return loss.sum() / denom
    if mode not in AGGREGATION_MODES:
        raise ValueError(
            f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGGREGATION_MODES)}"
        )
    lengths = mask.sum(-1)
    nonempty = lengths > 0
    row_sum = loss.sum(-1)
    if mode == "seq-mean-token-mean":
        per_row = row_sum / lengths.clamp(min=1).to(loss.dtype)
    elif mode == "seq-mean-token-sum":
        per_row = row_sum
    else:
        h = per_token_loss.shape[-1] if horizon is None else horizon
        if h <= 0:
            raise ValueError(f"horizon must be positive, got {h}")
        per_row = row_sum / float(h)
    per_row = torch.where(nonempty, per_row, zero)
    denom = float(normalizer) if normalizer is not None else max(int(nonempty.sum()), 1)
    return per_row.sum() / denom

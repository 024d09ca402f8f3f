"""Tensor helpers of the rules: means over tokens or rows, shares of counts, the per-response
mean log-ratio, a batched masked quantile and seeded per-row ranks.

The means and shares are the rules' diagnostics: 0-dim tensors computed without a
device-to-host sync, each rounding exactly like the python-float expression it replaced (named
in its docstring), so that ``float()`` of it gives the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "count_share",
    "masked_mean",
    "masked_quantile",
    "selected_mean",
    "sequence_log_ratio",
    "shuffled_ranks",
]


def sequence_log_ratio(log_ratio: Tensor, mask: Tensor) -> Tensor:
    """(1/|y_i|) sum_t log rho_{i,t}, ``[B]`` (0 for a response without tokens); keeps the graph."""
    zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
    total = torch.where(mask, log_ratio, zero).sum(-1)
    return total / mask.sum(-1).clamp(min=1).to(log_ratio.dtype)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over ``mask``: 0-dim, x's dtype (float32 or float64), 0 if the mask is empty.

    Rounded as ``float(where(mask, x, 0).sum() / int(mask.sum()))``: a division by a python
    number, which CUDA kernels carry out as a product with its reciprocal in x's dtype.
    """
    x = x.detach()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    total = torch.where(mask, x, zero).sum()
    n = mask.sum()
    den = n.to(x.dtype)
    mean = total * den.reciprocal() if x.is_cuda else total / den
    return torch.where(n > 0, mean, zero)


def selected_mean(x: Tensor, selected: Tensor, empty: float) -> Tensor:
    """``x[selected].mean()`` of a 1-d x (``empty`` if nothing is selected): 0-dim, x's dtype."""
    x = x.detach()
    fill = torch.full((), empty, dtype=x.dtype, device=x.device)
    if x.device.type == "cpu":
        # indexing a host tensor costs no device sync: the very reduction of x[selected]
        return torch.where(selected.any(), x[selected].mean(), fill)
    # On a device the selection's length would need a sync. x.mean() is x[selected].mean() bit
    # for bit when everything is selected (the trainer passes only rows with a real token);
    # otherwise this is the same mean summed in another order (it may differ in the last bit).
    part = torch.where(selected, x, 0.0).sum() / selected.sum()
    return torch.where(selected.all(), x.mean(), torch.where(selected.any(), part, fill))


def count_share(part: Tensor, whole: Tensor) -> Tensor:
    """part / whole of two integer counts: 0-dim float64, 0 when whole is 0.

    The value of ``int(part) / int(whole)`` in python (both are exact in float64 below 2**53,
    and IEEE division rounds the quotient once, as python's int division does).
    """
    share = part.to(torch.float64) / whole.to(torch.float64)
    return torch.where(whole > 0, share, torch.zeros_like(share))


def masked_quantile(values: Tensor, mask: Tensor, q: float) -> Tensor:
    """Per-row linear-interpolation quantile of ``values[b, mask[b]]``, ``[B]`` (NaN if empty).

    Same definition as ``torch.quantile(..., interpolation="linear")`` on each row's masked
    values, batched over rows of different lengths without a Python loop: one ``topk`` over the
    rows (padding filled with -inf) takes only the largest max_b(n_b - lo_b) values per row.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    mask = mask.bool()
    B, T = values.shape
    n = mask.sum(-1, dtype=torch.int32).long()
    pos = q * (n - 1).clamp(min=0).to(values.dtype)
    lo = pos.floor()
    hi = pos.ceil()
    frac = pos - lo
    lo_i, hi_i = lo.long(), hi.long()
    out = torch.full((B,), float("nan"), dtype=values.dtype, device=values.device)
    if B == 0 or T == 0:
        return out
    need = int((n - lo_i).max())  # values needed from the top of each row (topk's k: a sync)
    if need <= 0:
        return out
    filled = values.masked_fill(~mask, float("-inf"))
    top = torch.topk(filled, k=min(need, T), dim=-1, largest=True, sorted=True).values
    # ascending index i of a row with n values is index n - 1 - i from the top
    idx_lo = (n - 1 - lo_i).clamp(min=0).unsqueeze(-1)
    idx_hi = (n - 1 - hi_i).clamp(min=0).unsqueeze(-1)
    v_lo = top.gather(-1, idx_lo).squeeze(-1)
    v_hi = top.gather(-1, idx_hi).squeeze(-1)
    res = v_lo + frac * (v_hi - v_lo)
    return torch.where(n > 0, res, out)


def shuffled_ranks(response_mask: Tensor, seed: int) -> Tensor:
    """A seeded random permutation of 0..n_b-1 over the real tokens of each response.

    Padding positions get ranks >= n_b (ignored). Deterministic for a given seed, mask shape
    and device.
    """
    mask = response_mask.bool()
    B, T = mask.shape
    gen = torch.Generator(device=mask.device).manual_seed(int(seed))
    keys = torch.rand((B, T), generator=gen, dtype=torch.float64, device=mask.device)
    keys = keys.masked_fill(~mask, 2.0)  # padding sorts after every real token
    order = keys.argsort(dim=-1)
    ar = torch.arange(T, device=mask.device).expand(B, T)
    return torch.empty_like(order).scatter_(-1, order, ar)

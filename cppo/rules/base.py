"""Shared pieces of every trust-region rule: batch/output containers, the ratio anchor,
the outward-term test, the optional truncated-IS cap and the common diagnostics.

Conventions (all rules):

* Tensors are ``[B, T]``, responses left-aligned, padding at the end, ``response_mask`` True on
  real tokens. Padding positions may hold garbage (NaN/inf): they are replaced before any
  arithmetic, so they contribute exactly zero loss and zero gradient.
* Ratio anchor: rho_t = pi(y_t|s_t) / mu(y_t|s_t) = exp(logp - logp_mu). ``logp_mu`` is whatever
  the caller anchors on (the rollout policy, or a recomputed old policy). For rho the log-ratio
  is clamped to +-``log_ratio_clamp`` (default 20) before exp, as the official CPPO code does.
* Outward term: A_t (rho_t - 1) > 0, evaluated as ``(A > 0 and log_ratio > 0) or
  (A < 0 and log_ratio < 0)`` - the same sign test without exp rounding or 0 * inf.
  Inward terms (A_t (rho_t - 1) <= 0, including A_t = 0 and rho_t = 1) are never masked by the
  token-level mask rules.
* Truncated importance ratio (``ratio_cap`` = C; off by default as in UniRL's CPPO, the
  official code of the paper; verl PR #6731's CPPO uses C = 20 through ``clip_ratio_c``): each
  kept term is multiplied by the stop-gradient factor min(1, C / rho_t), so its gradient
  coefficient is min(rho_t, C) A_t instead of rho_t A_t. That is exactly the gradient of
  verl's form -A_t sg(min(rho_t, C)) log pi(y_t); only the logged loss value differs. A TIS
  correction for a rollout/trainer mismatch under a recomputed anchor can instead be folded
  into per-token ``advantages`` (a positive per-token factor leaves every mask decision
  unchanged).
* Mask-rule surrogate: per-token loss = -weight_t * rho_t * A_t with the gradient flowing
  through rho_t and ``weight`` (0/1 mask or soft gate) detached.
* Metrics: 0-dim detached tensors on the batch's device (no device-to-host sync inside a rule);
  :func:`metrics_to_floats` turns them into python floats with one copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cppo.rules.ops import masked_mean

__all__ = [
    "RuleBatch",
    "RuleOutput",
    "compute_dtype",
    "outward_mask",
    "ratio_from_log_ratio",
    "ratio_cap_factor",
    "masked_surrogate_loss",
    "masked_mean",
    "base_metrics",
    "metrics_to_floats",
]


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 are upcast)."""
    return (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


@dataclass
class RuleBatch:
    """One batch of per-token tensors, ``[B, T]``, left-aligned responses.

    Attributes:
        logp: pi's log-probability of the sampled token (requires grad).
        logp_mu: the anchor policy's log-probability of the sampled token (no grad).
        advantages: ``[B]`` (one per response) or ``[B, T]``.
        response_mask: bool, True on real response tokens.
        divergence: per-token D_t ``[B, T]`` computed by the caller as the rule's config asks
            (``cfg["divergence"]``), or None for rules that need none.
        seed: seed for randomised ablations (CPPO shuffled weights); a caller varies it per
            step for a rule whose bound config ``draws_random``.
    """

    logp: Tensor
    logp_mu: Tensor
    advantages: Tensor
    response_mask: Tensor
    divergence: Tensor | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.logp.dim() != 2:
            raise ValueError(f"logp must be [B, T], got shape {tuple(self.logp.shape)}")
        shape = self.logp.shape
        for name in ("logp_mu", "response_mask", "divergence"):
            t = getattr(self, name)
            if t is not None and t.shape != shape:
                raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        if self.response_mask.dtype != torch.bool:
            self.response_mask = self.response_mask.bool()
        a = self.advantages
        if not (a.shape == shape or a.shape == shape[:1]):
            raise ValueError(
                f"advantages must be [B] or [B, T] = {tuple(shape)}, got {tuple(a.shape)}"
            )

    @property
    def mask(self) -> Tensor:
        return self.response_mask

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.logp, self.logp_mu)

    def safe_logp(self) -> Tensor:
        """logp upcast, with padding (and NaN there) replaced by 0; keeps the graph."""
        lp = self.logp.to(self.dtype)
        return torch.where(self.mask, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))

    def log_ratio(self) -> Tensor:
        """logp - logp_mu, 0 on padding and where both log-probs are -inf; keeps the graph."""
        lp = self.safe_logp()
        lq = self.logp_mu.detach().to(lp.dtype)
        lq = torch.where(self.mask, lq, torch.zeros((), dtype=lq.dtype, device=lq.device))
        lr = lp - lq
        bad = torch.isnan(lr)
        if bool(bad.any()):
            lr = torch.where(bad, torch.zeros((), dtype=lr.dtype, device=lr.device), lr)
        return lr

    def advantages_2d(self) -> Tensor:
        """Advantages broadcast to ``[B, T]``, detached, zero on padding."""
        a = self.advantages.detach().to(self.dtype)
        if a.dim() == 1:
            a = a.unsqueeze(-1).expand(self.logp.shape)
        return torch.where(self.mask, a, torch.zeros((), dtype=a.dtype, device=a.device))

    def divergence_2d(self) -> Tensor | None:
        """The divergence, detached, NaN -> +inf, zero on padding (None if absent)."""
        d = self.divergence
        if d is None:
            return None
        d = d.detach().to(compute_dtype(d, self.logp))
        d = torch.nan_to_num(d, nan=float("inf"))
        return torch.where(self.mask, d, torch.zeros((), dtype=d.dtype, device=d.device))


@dataclass
class RuleOutput:
    """What a rule returns.

    Attributes:
        per_token_loss: ``[B, T]``, already multiplied by masks/weights, zero on padding; feed
            it to :func:`cppo.rules.aggregation.aggregate_loss`.
        keep: bool ``[B, T]``, True where the term contributes gradient (False on padding).
        weight: float ``[B, T]``, detached per-token weight (0/1 mask, soft gate value, or the
            clipped IS weight for CISPO/MinPRO), zero on padding.
        metrics: diagnostics as 0-dim detached tensors (see :func:`metrics_to_floats`).
    """

    per_token_loss: Tensor
    keep: Tensor
    weight: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def metrics_to_floats(metrics: Mapping[str, Tensor | float]) -> dict[str, float]:
    """Rule metrics as python floats, with one device-to-host copy for all of them.

    Each value is widened to float64 first (exact), so it equals ``float(value)``.
    """
    if not metrics:
        return {}
    values = [torch.as_tensor(v).detach().to(torch.float64).reshape(()) for v in metrics.values()]
    device = values[0].device
    floats = torch.stack([v.to(device) for v in values]).tolist()
    return dict(zip(metrics, floats, strict=True))


def outward_mask(log_ratio: Tensor, advantages: Tensor) -> Tensor:
    """True where A_t (rho_t - 1) > 0, i.e. the update would push rho_t further from 1."""
    return ((advantages > 0) & (log_ratio > 0)) | ((advantages < 0) & (log_ratio < 0))


def ratio_from_log_ratio(log_ratio: Tensor, clamp: float | None) -> Tensor:
    """rho = exp(log_ratio), with the log-ratio clamped to +-clamp first (None: no clamp)."""
    if clamp is not None:
        log_ratio = log_ratio.clamp(-clamp, clamp)
    return torch.exp(log_ratio)


def ratio_cap_factor(ratio: Tensor, cap: float | None) -> Tensor | None:
    """Stop-gradient factor min(1, C / rho) turning the coefficient rho into min(rho, C)."""
    if cap is None:
        return None
    r = ratio.detach()
    return torch.where(r > cap, cap / r, torch.ones((), dtype=r.dtype, device=r.device))


def masked_surrogate_loss(
    ratio: Tensor, advantages: Tensor, weight: Tensor, mask: Tensor, cap: float | None
) -> Tensor:
    """-weight * rho * A (gradient through rho only), optional ratio cap, zero on padding."""
    w = weight.detach().to(ratio.dtype)
    f = ratio_cap_factor(ratio, cap)
    if f is not None:
        w = w * f
    loss = -(w * ratio * advantages)
    return torch.where(mask, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))


def base_metrics(
    mask: Tensor,
    ratio: Tensor,
    keep: Tensor | None,
    divergence: Tensor | None,
    outward: Tensor | None = None,
    ratio_cap: float | None = None,
) -> dict[str, Tensor]:
    """Diagnostics shared by the rules (keys as in the metrics.jsonl contract); with a ratio
    cap, ``ratio/capped_fraction`` is the share of terms passing gradient whose rho exceeds it."""
    with torch.no_grad():
        r = ratio.detach()
        m: dict[str, Tensor] = {"ratio/abs_dev_mean": masked_mean((r - 1.0).abs(), mask)}
        if keep is not None:
            m["mask/fraction"] = masked_mean((~keep).to(r.dtype), mask)
        if divergence is not None:
            d = divergence.detach().to(r.dtype)
            m["divergence/mean"] = masked_mean(torch.nan_to_num(d, posinf=0.0), mask)
        if outward is not None:
            m["outward/fraction"] = masked_mean(outward.to(r.dtype), mask)
        if ratio_cap is not None:
            passing = mask if keep is None else keep & mask
            m["ratio/capped_fraction"] = masked_mean(((r > ratio_cap) & passing).to(r.dtype), mask)
    return m

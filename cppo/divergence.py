"""Per-token divergences D_t between the rollout policy mu and the current policy pi.

Every function returns a ``[B, T]`` tensor (float32, or float64 when the inputs are float64),
zero on padding when ``response_mask`` is given. Arguments follow the order used by
``RuleBatch``: the current policy pi first, the rollout policy mu second.

Estimators (what is available at train time):

* ``binary_tv`` / ``binary_kl``: two-block partition {y_t, rest}. TV = |pi(y_t) - mu(y_t)|,
  KL = Bernoulli KL(mu || pi) on that partition.
* ``topk_tv`` / ``topk_kl``: partition = mu's top-K ids at s_t, the sampled token y_t when it
  is not among them, and one "other" bucket with the remaining mass (the DPPO construction).
  Two conventions for the sampled token (``sampled_token=``):

  - ``"extra"`` (default, as the DPPO and CPPO papers describe it): top-K plus the sampled
    token as a (K+1)-th block when it is absent from the top-K.
  - ``"replace"`` (as some public code does it): exactly K slots; when the sampled token is
    absent, it replaces mu's least likely top-K slot, whose mass goes to "other".

  "extra" refines "replace", so its TV/KL is >= the "replace" value, and both are lower bounds
  of the exact full-vocabulary divergence (coarsening a partition never increases TV or KL).
* ``k3`` / ``abs_log_ratio``: sampled-token estimators from the log-ratio alone (no top-K):
  k3 = rho - 1 - log rho with rho = pi(y_t) / mu(y_t), an unbiased per-sample estimate of
  KL(mu || pi) under y_t ~ mu (Schulman's k3); |log rho| is the magnitude of the log-ratio.
  These are the detectors of verl's rollout-correction masks (verl PR #4544, TRM's author:
  ``seq_mean_k3`` for the average criterion, a |log rho| / ``seq_max_k2`` check for the max).
* ``full_tv`` / ``full_kl``: exact, from two ``[B, T, V]`` logit tensors (tests, small vocab).

Numerics: all arithmetic in float32 at least (bf16/fp16 inputs are upcast), log-probabilities
clamped to <= 0, the "other" mass 1 - sum(blocks) clamped at 0 (never negative, also when
rounding pushes the recorded top-K mass over 1), log(1 - p) for the binary KL in log space
(log1mexp), -inf log-probabilities handled (zero mass). In KL terms pi's log-probability is
floored at ``LOG_PROB_FLOOR`` so that a block mu gives mass and pi does not yields a large finite
value instead of inf; blocks with zero mu mass contribute exactly zero. NaN inputs on padding
positions are ignored; a NaN top-K log-probability at a real position gives a NaN divergence
there, which the rules treat as exceeding every threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "GATHER_CHUNK_BYTES",
    "LOG_PROB_FLOOR",
    "DIVERGENCE_KINDS",
    "TOPK_KINDS",
    "SAMPLED_TOKEN_MODES",
    "binary_tv",
    "binary_kl",
    "k3",
    "abs_log_ratio",
    "topk_tv",
    "topk_kl",
    "full_tv",
    "full_kl",
    "compute_divergence",
    "is_topk",
]

# pi's log-probability floor inside KL terms: exp(-50) ~ 2e-22, representable in fp32.
LOG_PROB_FLOOR = -50.0
DIVERGENCE_KINDS = ("binary_tv", "binary_kl", "topk_tv", "topk_kl", "k3", "abs_log_ratio")
# the kinds that need mu's top-K ids and log-probs (recorded at rollout) and pi's at those ids
TOPK_KINDS = ("topk_tv", "topk_kl")
SAMPLED_TOKEN_MODES = ("extra", "replace")
# fp32 working memory of one chunk of rows when pi's log-probs at mu's top-K ids are gathered
# from [tokens, V] logits (cppo.backends.verl.topk.log_probs_at: the row copy and logsumexp's
# exp, 2 x 4 bytes per logit; 512 MiB is 441 rows of a 151,936-token vocabulary); the resource
# check counts it
GATHER_CHUNK_BYTES = 512 * 2**20
_LN2 = math.log(2.0)


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _clean_logp(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Upcast, map NaN to -inf (no mass) and clamp to <= 0 (rounding can exceed 0)."""
    x = x.to(dtype)
    return torch.nan_to_num(x, nan=-math.inf, posinf=0.0).clamp(max=0.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -ln 2."""
    x = x.clamp(max=0.0)
    return torch.where(x > -_LN2, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _finish(d: Tensor, response_mask: Tensor | None) -> Tensor:
    if response_mask is not None:
        d = torch.where(response_mask.bool(), d, torch.zeros((), dtype=d.dtype, device=d.device))
    return d


def _kl_terms(lq: Tensor, lp: Tensor) -> Tensor:
    """q * (log q - log p) elementwise, 0 where q == 0, pi's log-prob floored."""
    q = torch.exp(lq)
    lp = lp.clamp(min=LOG_PROB_FLOOR)
    term = q * (lq - lp)
    return torch.where(q > 0, term, torch.zeros((), dtype=term.dtype, device=term.device))


# ---------------------------------------------------------------------------------------------
# Sampled-token estimators: binary partition {y_t, rest}, k3, |log rho|
# ---------------------------------------------------------------------------------------------


def binary_tv(logp: Tensor, logp_mu: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """|pi(y_t) - mu(y_t)|: the TV distance on the partition {y_t, rest}.

    Args:
        logp: pi's log-probability of the sampled token, ``[B, T]``.
        logp_mu: mu's log-probability of the sampled token, ``[B, T]``.
        response_mask: optional bool ``[B, T]``; padding positions are returned as 0.
    """
    dt = _acc_dtype(logp, logp_mu)
    p = torch.exp(_clean_logp(logp, dt))
    q = torch.exp(_clean_logp(logp_mu, dt))
    return _finish((p - q).abs(), response_mask)


def binary_kl(logp: Tensor, logp_mu: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """Bernoulli KL(mu || pi) on {y_t, rest}: q log(q/p) + (1-q) log((1-q)/(1-p)).

    Computed in log space (log(1-p) via log1mexp); pi's log-masses floored at LOG_PROB_FLOOR.
    """
    dt = _acc_dtype(logp, logp_mu)
    lp = _clean_logp(logp, dt)
    lq = _clean_logp(logp_mu, dt)
    kl = _kl_terms(lq, lp) + _kl_terms(_log1mexp(lq), _log1mexp(lp))
    return _finish(kl.clamp(min=0.0), response_mask)


def _log_ratio(logp: Tensor, logp_mu: Tensor) -> Tensor:
    """log pi(y_t) - log mu(y_t) upcast; -inf on both sides (no mass anywhere) gives 0."""
    dt = _acc_dtype(logp, logp_mu)

    def clean(x: Tensor) -> Tensor:  # NaN -> no mass; -inf kept (_clean_logp makes it finite)
        return torch.nan_to_num(x.to(dt), nan=-math.inf, posinf=0.0, neginf=-math.inf).clamp(max=0)

    lr = clean(logp) - clean(logp_mu)
    return torch.where(torch.isnan(lr), torch.zeros((), dtype=lr.dtype, device=lr.device), lr)


def k3(logp: Tensor, logp_mu: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """rho - 1 - log rho with rho = pi(y_t) / mu(y_t): the k3 estimate of KL(mu || pi).

    Non-negative for every token (x - 1 - log x >= 0); the log-ratio is clamped to +-20 before
    exp, as verl's rollout-correction helper does, so the value stays finite.
    """
    lr = _log_ratio(logp, logp_mu).clamp(-20.0, 20.0)
    return _finish(torch.expm1(lr) - lr, response_mask)


def abs_log_ratio(logp: Tensor, logp_mu: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """|log pi(y_t) - log mu(y_t)| (inf where exactly one side has no mass)."""
    return _finish(_log_ratio(logp, logp_mu).abs(), response_mask)


# ---------------------------------------------------------------------------------------------
# Top-K reduced partition
# ---------------------------------------------------------------------------------------------


def _topk_parts(
    logp: Tensor,
    logp_mu: Tensor,
    topk_logp: Tensor,
    topk_logp_mu: Tensor,
    topk_ids: Tensor,
    token_ids: Tensor,
    sampled_token: str,
    k: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Log-masses of the partition blocks for pi and mu.

    Returns (lp, lq, ly, lyq, extra): fresh ``[B, T, K]`` log-masses of the top-K slots for pi
    and mu (the slot given up under "replace" set to -inf), ``[B, T]`` log-masses of the
    sampled token, and the bool ``[B, T]`` "sampled token is its own extra block". The caller
    may modify lp and lq in place.
    """
    if sampled_token not in SAMPLED_TOKEN_MODES:
        raise ValueError(
            f"sampled_token must be one of {SAMPLED_TOKEN_MODES}, got {sampled_token!r}"
        )
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        topk_logp, topk_logp_mu, topk_ids = (
            topk_logp[..., :k],
            topk_logp_mu[..., :k],
            topk_ids[..., :k],
        )
    if not (topk_logp.shape == topk_logp_mu.shape == topk_ids.shape):
        raise ValueError(
            "topk_logp, topk_logp_mu and topk_ids must have the same [B, T, K] shape, got "
            f"{tuple(topk_logp.shape)}, {tuple(topk_logp_mu.shape)}, {tuple(topk_ids.shape)}"
        )
    if topk_ids.shape[:-1] != logp.shape or token_ids.shape != logp.shape:
        raise ValueError(
            f"top-K tensors {tuple(topk_ids.shape)} / token_ids {tuple(token_ids.shape)} do not "
            f"match logp {tuple(logp.shape)}"
        )
    dt = _acc_dtype(logp, logp_mu, topk_logp, topk_logp_mu)
    # the sampled token gets its own block when it is absent from mu's top-K
    extra = ~(topk_ids == token_ids.unsqueeze(-1)).any(-1)
    # [B, T, K] tensors: one fresh copy each, then in place (NaN only matters on padding,
    # which the caller zeroes)
    lq = topk_logp_mu.to(dt, copy=True).clamp_(max=0.0)
    lp = topk_logp.to(dt, copy=True).clamp_(max=0.0)
    if sampled_token == "replace":
        # mu's least likely slot gives way to the sampled token when that token is absent
        idx = lq.argmin(-1, keepdim=True)
        gone = extra.unsqueeze(-1)
        neg_inf = torch.full((), -math.inf, dtype=dt, device=lq.device)
        lq.scatter_(-1, idx, torch.where(gone, neg_inf, lq.gather(-1, idx)))
        lp.scatter_(-1, idx, torch.where(gone, neg_inf, lp.gather(-1, idx)))
    ly = _clean_logp(logp, dt)
    lyq = _clean_logp(logp_mu, dt)
    return lp, lq, ly, lyq, extra


def _other_mass(slot_mass_sum: Tensor, extra_mass: Tensor) -> Tensor:
    """1 - (sum of the blocks), clamped at 0: rounding (bf16 inputs) can push the sum over 1."""
    return (1.0 - (slot_mass_sum + extra_mass)).clamp_(min=0.0)


def _topk_tv_kernel(
    logp, logp_mu, topk_logp, topk_logp_mu, topk_ids, token_ids, sampled_token, k
) -> Tensor:
    lp, lq, ly, lyq, extra = _topk_parts(
        logp, logp_mu, topk_logp, topk_logp_mu, topk_ids, token_ids, sampled_token, k
    )
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    p, q = lp.exp_(), lq.exp_()  # reuse the two [..., K] buffers
    p_y = torch.where(extra, ly.exp(), zero)
    q_y = torch.where(extra, lyq.exp(), zero)
    p_o = _other_mass(p.sum(-1), p_y)
    q_o = _other_mass(q.sum(-1), q_y)
    tv = p.sub_(q).abs_().sum(-1) + (p_y - q_y).abs() + (p_o - q_o).abs()
    return 0.5 * tv


def _topk_kl_kernel(
    logp, logp_mu, topk_logp, topk_logp_mu, topk_ids, token_ids, sampled_token, k
) -> Tensor:
    lp, lq, ly, lyq, extra = _topk_parts(
        logp, logp_mu, topk_logp, topk_logp_mu, topk_ids, token_ids, sampled_token, k
    )
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    q = lq.exp()
    p_sum = lp.exp().sum(-1)
    p_y = torch.where(extra, ly.exp(), zero)
    q_y = torch.where(extra, lyq.exp(), zero)
    p_o = _other_mass(p_sum, p_y)
    q_o = _other_mass(q.sum(-1), q_y)
    # slots: q (log q - log p), in place over lq; zero-mass mu slots contribute 0
    slots = lq.sub_(lp.clamp_(min=LOG_PROB_FLOOR)).mul_(q).masked_fill_(q == 0, 0.0).sum(-1)
    kl_y = torch.where(extra, _kl_terms(lyq, ly), zero)
    kl = slots + kl_y + _kl_terms(torch.log(q_o), torch.log(p_o))
    return kl.clamp_(min=0.0)


# Positions per chunk for the Top-K estimators: buffers of a few MiB stay in cache and are
# reused by the allocator, instead of page-faulting fresh [B, T, K] allocations.
_TOPK_CHUNK = 1 << 15


def _topk_chunked(
    kernel: Callable[..., Tensor],
    logp: Tensor,
    logp_mu: Tensor,
    topk_logp: Tensor,
    topk_logp_mu: Tensor,
    topk_ids: Tensor,
    token_ids: Tensor,
    response_mask: Tensor | None,
    sampled_token: str,
    k: int | None,
) -> Tensor:
    if topk_ids.dim() < 1 or topk_ids.shape[:-1] != logp.shape:
        # let the kernel raise its shape error on the unchunked tensors
        return kernel(logp, logp_mu, topk_logp, topk_logp_mu, topk_ids, token_ids, sampled_token, k)
    shape = logp.shape
    n = logp.numel()
    K = topk_ids.shape[-1]
    flat = (
        logp.reshape(n),
        logp_mu.reshape(n),
        topk_logp.reshape(n, topk_logp.shape[-1]),
        topk_logp_mu.reshape(n, topk_logp_mu.shape[-1]),
        topk_ids.reshape(n, K),
        token_ids.reshape(n),
    )
    if n <= _TOPK_CHUNK:
        out = kernel(*flat, sampled_token, k)
    else:
        parts = [
            kernel(*(t[s : s + _TOPK_CHUNK] for t in flat), sampled_token, k)
            for s in range(0, n, _TOPK_CHUNK)
        ]
        out = torch.cat(parts)
    return _finish(out.reshape(shape), response_mask)


def topk_tv(
    logp: Tensor,
    logp_mu: Tensor,
    topk_logp: Tensor,
    topk_logp_mu: Tensor,
    topk_ids: Tensor,
    token_ids: Tensor,
    response_mask: Tensor | None = None,
    *,
    sampled_token: str = "extra",
    k: int | None = None,
) -> Tensor:
    """Top-K reduced total variation between mu(.|s_t) and pi(.|s_t).

    Args:
        logp: pi's log-probability of the sampled token y_t, ``[B, T]``.
        logp_mu: mu's log-probability of y_t, ``[B, T]``.
        topk_logp: pi's log-probabilities at mu's top-K ids, ``[B, T, K]``.
        topk_logp_mu: mu's top-K log-probabilities, ``[B, T, K]``.
        topk_ids: mu's top-K token ids, ``[B, T, K]``.
        token_ids: the sampled token ids y_t, ``[B, T]``.
        response_mask: optional bool ``[B, T]``; padding returned as 0.
        sampled_token: ``"extra"`` (paper, default) or ``"replace"`` (see module docstring).
        k: use only the first k columns of the top-K tensors (mu's top-K sorted descending).

    Works through the positions in chunks with two ``[chunk, K]`` buffers (block masses of pi
    and mu, updated in place); nothing of vocabulary size is allocated.
    """
    return _topk_chunked(
        _topk_tv_kernel,
        logp,
        logp_mu,
        topk_logp,
        topk_logp_mu,
        topk_ids,
        token_ids,
        response_mask,
        sampled_token,
        k,
    )


def topk_kl(
    logp: Tensor,
    logp_mu: Tensor,
    topk_logp: Tensor,
    topk_logp_mu: Tensor,
    topk_ids: Tensor,
    token_ids: Tensor,
    response_mask: Tensor | None = None,
    *,
    sampled_token: str = "extra",
    k: int | None = None,
) -> Tensor:
    """Top-K reduced KL(mu || pi) on the same partition as :func:`topk_tv`."""
    return _topk_chunked(
        _topk_kl_kernel,
        logp,
        logp_mu,
        topk_logp,
        topk_logp_mu,
        topk_ids,
        token_ids,
        response_mask,
        sampled_token,
        k,
    )


# ---------------------------------------------------------------------------------------------
# Exact, full vocabulary
# ---------------------------------------------------------------------------------------------


def _full_logprobs(logits: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.log_softmax(logits.to(dtype), dim=-1)


def full_tv(logits: Tensor, logits_mu: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """Exact TV(mu, pi) over the vocabulary from ``[B, T, V]`` logits (or log-probs)."""
    dt = _acc_dtype(logits, logits_mu)
    p = torch.exp(_full_logprobs(logits, dt))
    q = torch.exp(_full_logprobs(logits_mu, dt))
    return _finish(0.5 * (p - q).abs().sum(-1), response_mask)


def full_kl(logits: Tensor, logits_mu: Tensor, response_mask: Tensor | None = None) -> Tensor:
    """Exact KL(mu || pi) over the vocabulary from ``[B, T, V]`` logits (or log-probs)."""
    dt = _acc_dtype(logits, logits_mu)
    lp = _full_logprobs(logits, dt)
    lq = _full_logprobs(logits_mu, dt)
    return _finish(_kl_terms(lq, lp).sum(-1).clamp(min=0.0), response_mask)


# ---------------------------------------------------------------------------------------------
# Dispatch by name (what a rule's config asks for)
# ---------------------------------------------------------------------------------------------

# estimators that need only the sampled token's two log-probabilities
_SAMPLED: dict[str, Callable[..., Tensor]] = {
    "binary_tv": binary_tv,
    "binary_kl": binary_kl,
    "k3": k3,
    "abs_log_ratio": abs_log_ratio,
}
_TOPK: dict[str, Callable[..., Tensor]] = {"topk_tv": topk_tv, "topk_kl": topk_kl}


def is_topk(kind: str) -> bool:
    """Whether divergence ``kind`` needs the top-K log-probs of both policies."""
    return kind in TOPK_KINDS


def compute_divergence(
    kind: str,
    *,
    logp: Tensor,
    logp_mu: Tensor,
    response_mask: Tensor | None = None,
    topk_logp: Tensor | None = None,
    topk_logp_mu: Tensor | None = None,
    topk_ids: Tensor | None = None,
    token_ids: Tensor | None = None,
    topk: int | None = None,
    sampled_token: str = "extra",
) -> Tensor:
    """Compute the divergence named ``kind`` (one of DIVERGENCE_KINDS) from what is available."""
    if kind in _SAMPLED:
        return _SAMPLED[kind](logp, logp_mu, response_mask)
    if kind in _TOPK:
        missing = [
            n
            for n, v in (
                ("topk_logp", topk_logp),
                ("topk_logp_mu", topk_logp_mu),
                ("topk_ids", topk_ids),
                ("token_ids", token_ids),
            )
            if v is None
        ]
        if missing:
            raise ValueError(f"divergence {kind!r} needs {', '.join(missing)}")
        return _TOPK[kind](
            logp,
            logp_mu,
            topk_logp,
            topk_logp_mu,
            topk_ids,
            token_ids,
            response_mask,
            sampled_token=sampled_token,
            k=topk,
        )
    raise ValueError(f"unknown divergence {kind!r}; valid kinds: {', '.join(DIVERGENCE_KINDS)}")

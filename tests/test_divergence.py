"""Divergence estimators: formulas, lower bounds of the exact divergence, conventions,
numerics (bf16, -inf, padding)."""

from __future__ import annotations

import math

import pytest
import torch

from cppo.divergence import (
    binary_kl,
    binary_tv,
    compute_divergence,
    full_kl,
    full_tv,
    topk_kl,
    topk_tv,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_dists(seed: int, B=3, T=7, V=40, scale=2.0, drift=0.5, dtype=torch.float64):
    """mu and pi logits, tokens sampled from mu."""
    g = torch.Generator().manual_seed(seed)
    mu_logits = torch.randn(B, T, V, generator=g, dtype=dtype) * scale
    pi_logits = mu_logits + torch.randn(B, T, V, generator=g, dtype=dtype) * drift
    mu_lp = torch.log_softmax(mu_logits, -1)
    tokens = torch.multinomial(mu_lp.exp().reshape(-1, V), 1, generator=g).reshape(B, T)
    return pi_logits, mu_logits, tokens


def topk_inputs(pi_logits, mu_logits, tokens, K):
    """What the trainer has: mu's top-K ids/log-probs, pi at those ids, both at the token."""
    pi_lp = torch.log_softmax(pi_logits, -1)
    mu_lp = torch.log_softmax(mu_logits, -1)
    topk_lp_mu, ids = mu_lp.topk(K, dim=-1)
    return dict(
        logp=pi_lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        logp_mu=mu_lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        topk_logp=pi_lp.gather(-1, ids),
        topk_logp_mu=topk_lp_mu,
        topk_ids=ids,
        token_ids=tokens,
    )


def _call(fn, inp, **kw):
    return fn(
        inp["logp"],
        inp["logp_mu"],
        inp["topk_logp"],
        inp["topk_logp_mu"],
        inp["topk_ids"],
        inp["token_ids"],
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# formulas
# ---------------------------------------------------------------------------------------------


def test_binary_tv_formula():
    p = torch.tensor([[0.3, 0.9, 1e-9, 1.0]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.9, 0.2, 0.0]], dtype=torch.float64)
    d = binary_tv(p.log(), q.log())
    assert torch.allclose(d, (p - q).abs(), atol=1e-15)


def test_binary_kl_formula():
    for p, q in [(0.3, 0.5), (0.9, 0.1), (0.5, 0.5), (1e-6, 0.2), (0.999, 0.99)]:
        want = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
        got = binary_kl(
            torch.tensor([[math.log(p)]], dtype=torch.float64),
            torch.tensor([[math.log(q)]], dtype=torch.float64),
        ).item()
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_topk_hand_computed_both_conventions():
    # mu = [.5, .3, .15, .05], pi = [.4, .35, .1, .15], K = 2, sampled token 3 (not in top-2)
    mu = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    pi = torch.tensor([0.4, 0.35, 0.1, 0.15], dtype=torch.float64)
    inp = topk_inputs(pi.log().view(1, 1, 4), mu.log().view(1, 1, 4), torch.tensor([[3]]), 2)
    # extra: blocks {0}, {1}, {3}, other {2}
    tv_extra = 0.5 * (0.1 + 0.05 + 0.1 + 0.05)
    kl_extra = sum(
        q * math.log(q / p) for q, p in [(0.5, 0.4), (0.3, 0.35), (0.05, 0.15), (0.15, 0.1)]
    )
    # replace: mu's weakest top-K slot (id 1) gives way: {0}, {3}, other {1, 2}
    tv_repl = 0.5 * (0.1 + 0.1 + 0.0)
    kl_repl = sum(q * math.log(q / p) for q, p in [(0.5, 0.4), (0.05, 0.15), (0.45, 0.45)])
    assert _call(topk_tv, inp).item() == pytest.approx(tv_extra, abs=1e-12)
    assert _call(topk_kl, inp).item() == pytest.approx(kl_extra, abs=1e-12)
    assert _call(topk_tv, inp, sampled_token="replace").item() == pytest.approx(tv_repl, abs=1e-12)
    assert _call(topk_kl, inp, sampled_token="replace").item() == pytest.approx(kl_repl, abs=1e-12)
    # sampled token inside the top-K: both conventions give the same partition
    inp = topk_inputs(pi.log().view(1, 1, 4), mu.log().view(1, 1, 4), torch.tensor([[1]]), 2)
    tv_in = 0.5 * (0.1 + 0.05 + abs(0.25 - 0.2))
    assert _call(topk_tv, inp).item() == pytest.approx(tv_in, abs=1e-12)
    assert _call(topk_tv, inp, sampled_token="replace").item() == pytest.approx(tv_in, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# lower bounds and refinements
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3, 10, 20])
def test_reduced_divergences_lower_bound_the_exact_ones(K):
    for seed in range(25):
        pi_l, mu_l, tok = random_dists(
            seed, scale=[0.5, 2.0, 5.0][seed % 3], drift=[0.1, 0.5, 2.0][seed % 3]
        )
        inp = topk_inputs(pi_l, mu_l, tok, K)
        tv, kl = full_tv(pi_l, mu_l), full_kl(pi_l, mu_l)
        tv_x, kl_x = _call(topk_tv, inp), _call(topk_kl, inp)
        tv_r = _call(topk_tv, inp, sampled_token="replace")
        kl_r = _call(topk_kl, inp, sampled_token="replace")
        b_tv, b_kl = binary_tv(inp["logp"], inp["logp_mu"]), binary_kl(inp["logp"], inp["logp_mu"])
        eps = 1e-12
        assert bool((tv_x <= tv + eps).all()) and bool((kl_x <= kl + eps).all())
        assert bool((tv_r <= tv_x + eps).all()) and bool((kl_r <= kl_x + eps).all())
        # "extra" refines {y, rest}; so it dominates the binary estimators
        assert bool((b_tv <= tv_x + eps).all()) and bool((b_kl <= kl_x + eps).all())
        assert bool((tv_x >= 0).all()) and bool((kl_r >= 0).all()) and bool((tv_x <= 1).all())


def test_topk_with_full_vocabulary_is_exact():
    for seed in range(5):
        pi_l, mu_l, tok = random_dists(seed, V=12)
        inp = topk_inputs(pi_l, mu_l, tok, 12)
        assert torch.allclose(_call(topk_tv, inp), full_tv(pi_l, mu_l), atol=1e-12)
        assert torch.allclose(_call(topk_kl, inp), full_kl(pi_l, mu_l), atol=1e-12)


def test_full_divergences_by_hand():
    mu = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    pi = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    assert full_tv(pi.log().view(1, 1, 3), mu.log().view(1, 1, 3)).item() == pytest.approx(0.3)
    want = 0.5 * math.log(0.5 / 0.2) + 0.2 * math.log(0.2 / 0.5)
    assert full_kl(pi.log().view(1, 1, 3), mu.log().view(1, 1, 3)).item() == pytest.approx(want)


def test_all_zero_when_pi_equals_mu():
    pi_l, mu_l, tok = random_dists(0)
    inp = topk_inputs(mu_l, mu_l, tok, 5)
    for d in (
        _call(topk_tv, inp),
        _call(topk_kl, inp),
        _call(topk_tv, inp, sampled_token="replace"),
        binary_tv(inp["logp"], inp["logp_mu"]),
        binary_kl(inp["logp"], inp["logp_mu"]),
        full_tv(mu_l, mu_l),
        full_kl(mu_l, mu_l),
    ):
        assert bool((d == 0).all())


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------


def test_bf16_inputs_accumulate_in_fp32():
    pi_l, mu_l, tok = random_dists(1, dtype=torch.float32)
    inp = topk_inputs(pi_l, mu_l, tok, 20)
    low = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in inp.items()}
    up = {k: (v.float() if v.is_floating_point() else v) for k, v in low.items()}
    for fn in (topk_tv, topk_kl):
        out = _call(fn, low)
        assert out.dtype == torch.float32
        assert torch.equal(out, _call(fn, up))
    assert binary_tv(low["logp"], low["logp_mu"]).dtype == torch.float32
    assert binary_kl(low["logp"], low["logp_mu"]).dtype == torch.float32


def test_other_mass_never_negative():
    # bf16 rounding makes the recorded top-K mass exceed 1: "other" must clamp to 0, not go
    # negative (which would inflate TV or make KL NaN).
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    lp = probs.log().bfloat16()
    assert float(lp.double().exp().sum()) > 1.0  # rounding pushed the sum above 1
    ids = torch.tensor([[[0, 1, 2]]])
    args = dict(
        logp=lp[:1].view(1, 1),
        logp_mu=lp[:1].view(1, 1),
        topk_logp=lp.view(1, 1, 3),
        topk_logp_mu=lp.view(1, 1, 3),
        topk_ids=ids,
        token_ids=torch.tensor([[0]]),
    )
    for kind in ("topk_tv", "topk_kl"):
        d = compute_divergence(kind, **args)
        assert torch.isfinite(d).all() and d.item() == 0.0
    # pi's top-K sum above 1, mu's not: TV stays within [0, 1]
    args["topk_logp_mu"] = torch.tensor([[[0.4, 0.3, 0.1]]]).log()
    args["logp_mu"] = torch.tensor([[0.4]]).log()
    d = compute_divergence("topk_tv", **args)
    p = lp.float().exp()
    q = torch.tensor([0.4, 0.3, 0.1])
    # pi's "other" bucket is 0 (not |1 - sum|); mu's is 0.2
    assert d.item() == pytest.approx(0.5 * float((p - q).abs().sum() + 0.2), abs=1e-6)
    assert compute_divergence("topk_kl", **args).item() >= 0.0


def test_minus_inf_logprobs():
    pi_l, mu_l, tok = random_dists(2, V=30)
    inp = topk_inputs(pi_l, mu_l, tok, 8)
    inp["topk_logp"][0, 0, :3] = float("-inf")  # pi gives some top-K ids zero mass
    inp["topk_logp_mu"][1, 1, 5:] = float("-inf")  # mu has fewer than K tokens with mass
    inp["logp"][2, 2] = float("-inf")
    for fn in (topk_tv, topk_kl):
        for mode in ("extra", "replace"):
            d = _call(fn, inp, sampled_token=mode)
            assert torch.isfinite(d).all() and bool((d >= 0).all())
    tv = _call(topk_tv, inp)
    assert bool((tv <= 1 + 1e-12).all())
    # a block mu gives mass and pi does not: large but finite KL
    assert _call(topk_kl, inp)[0, 0].item() > 5.0
    lp = torch.tensor([[float("-inf"), -1.0, 0.0]])
    lq = torch.tensor([[-1.0, float("-inf"), 0.0]])
    assert torch.isfinite(binary_kl(lp, lq)).all() and torch.isfinite(binary_tv(lp, lq)).all()
    assert binary_tv(lp, lq)[0].tolist() == pytest.approx([math.exp(-1), math.exp(-1), 0.0])
    full = full_kl(torch.tensor([[[float("-inf"), 0.0]]]), torch.tensor([[[0.0, 0.0]]]))
    assert torch.isfinite(full).all()


def test_padding_is_ignored():
    pi_l, mu_l, tok = random_dists(3, B=2, T=5)
    inp = topk_inputs(pi_l, mu_l, tok, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    clean = _call(topk_tv, inp, response_mask=mask)
    for k in ("logp", "logp_mu"):
        inp[k] = inp[k].masked_fill(~mask, float("nan"))
    for k in ("topk_logp", "topk_logp_mu"):
        inp[k] = inp[k].masked_fill(~mask.unsqueeze(-1), float("nan"))
    for fn in (topk_tv, topk_kl):
        d = _call(fn, inp, response_mask=mask)
        assert torch.isfinite(d).all() and bool((d[~mask] == 0).all())
    assert torch.equal(_call(topk_tv, inp, response_mask=mask), clean)
    for fn in (binary_tv, binary_kl):
        d = fn(inp["logp"], inp["logp_mu"], mask)
        assert torch.isfinite(d).all() and bool((d[~mask] == 0).all())
    assert bool((full_tv(pi_l, mu_l, mask)[~mask] == 0).all())


def test_k_argument_and_dispatch():
    pi_l, mu_l, tok = random_dists(4)
    inp = topk_inputs(pi_l, mu_l, tok, 20)
    small = topk_inputs(pi_l, mu_l, tok, 5)
    assert torch.equal(_call(topk_tv, inp, k=5), _call(topk_tv, small))
    assert torch.equal(compute_divergence("topk_tv", topk=5, **inp), _call(topk_tv, small))
    assert torch.equal(
        compute_divergence("binary_kl", logp=inp["logp"], logp_mu=inp["logp_mu"]),
        binary_kl(inp["logp"], inp["logp_mu"]),
    )
    with pytest.raises(ValueError, match="topk_ids"):
        compute_divergence("topk_tv", logp=inp["logp"], logp_mu=inp["logp_mu"])
    with pytest.raises(ValueError, match="binary_tv"):
        compute_divergence("tv", logp=inp["logp"], logp_mu=inp["logp_mu"])
    with pytest.raises(ValueError, match="sampled_token"):
        _call(topk_tv, inp, sampled_token="append")

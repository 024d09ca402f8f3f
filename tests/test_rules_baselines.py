"""Baselines: GRPO (PPO clip), CISPO, DPPO, TRM-Max/Avg, MinPRO, and the IS cap."""

from __future__ import annotations

import math

import pytest
import torch

from cppo.rules import RuleBatch, aggregate_loss, dppo_mask, get_rule
from cppo.rules.reference import (
    dppo_reference,
    grpo_keep_reference,
    minpro_weights_reference,
    trm_keep_reference,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(seed: int, *, B=5, T=24, spread=0.4, adv_per_token=False, garbage=True):
    """Random float64 batch; padding holds NaN garbage that must be ignored."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(-1)
    logp_mu = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    logp = logp_mu + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    if adv_per_token:
        A = torch.randn(B, T, generator=g, dtype=torch.float64)
    else:
        A = torch.randn(B, generator=g, dtype=torch.float64)
    D = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.3
    if garbage:
        logp = logp.masked_fill(~mask, float("nan"))
        D = D.masked_fill(~mask, float("nan"))
    logp.requires_grad_(True)
    return RuleBatch(logp, logp_mu, A, mask, divergence=D)


def grad_of(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _rows(batch: RuleBatch):
    """Per-row python lists of the real tokens: (log_ratio, advantages, divergence)."""
    lr = batch.log_ratio().detach()
    A = batch.advantages_2d()
    D = batch.divergence_2d()
    out = []
    for b in range(lr.shape[0]):
        n = int(batch.mask[b].sum())
        out.append((lr[b, :n].tolist(), A[b, :n].tolist(), D[b, :n].tolist()))
    return out


# ---------------------------------------------------------------------------------------------
# GRPO / PPO clip
# ---------------------------------------------------------------------------------------------


def ppo_clip_objective(batch: RuleBatch, eps_low, eps_high, dual_clip):
    """The clipped PPO loss written out independently (verl's vanilla form), token-mean."""
    m = batch.mask
    logp = torch.where(m, batch.logp, torch.zeros((), dtype=torch.float64))
    r = torch.exp(logp - batch.logp_mu)
    A = batch.advantages_2d()
    l1 = -A * r
    l2 = -A * torch.clamp(r, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(l1, l2)
    if dual_clip is not None:
        loss = torch.where(A < 0, torch.minimum(loss, -A * dual_clip), loss)
    return torch.where(m, loss, torch.zeros((), dtype=torch.float64)).sum() / m.sum()


@pytest.mark.parametrize("dual_clip", [None, 3.0, 1.5])
@pytest.mark.parametrize("eps", [(0.2, 0.28), (0.1, 0.1)])
def test_ppo_clip_gradient_equals_masked_ratio_advantage_gradient(dual_clip, eps):
    eps_low, eps_high = eps
    rule = get_rule("grpo")
    cfg = {"eps_low": eps_low, "eps_high": eps_high, "dual_clip": dual_clip}
    for seed in range(40):
        batch = make_batch(seed, spread=0.6, adv_per_token=seed % 2 == 0)
        clipped = grad_of(ppo_clip_objective(batch, eps_low, eps_high, dual_clip), batch.logp)

        # masked ratio-advantage objective -M rho A with M from the case analysis
        keep = torch.zeros_like(batch.mask)
        r = torch.exp(batch.log_ratio().detach())
        A = batch.advantages_2d()
        for b in range(keep.shape[0]):
            n = int(batch.mask[b].sum())
            keep[b, :n] = torch.tensor(
                grpo_keep_reference(
                    r[b, :n].tolist(),
                    A[b, :n].tolist(),
                    eps_low=eps_low,
                    eps_high=eps_high,
                    dual_clip=dual_clip,
                )
            )
        logp = torch.where(batch.mask, batch.logp, torch.zeros((), dtype=torch.float64))
        rho = torch.exp(logp - batch.logp_mu)
        masked = -(keep.double() * rho * A).sum() / batch.mask.sum()
        masked_grad = grad_of(masked, batch.logp)
        assert torch.allclose(clipped, masked_grad, atol=1e-15, rtol=1e-12)

        out = rule(batch, cfg)
        assert torch.equal(out.keep, keep)
        rule_grad = grad_of(aggregate_loss(out.per_token_loss, batch.mask), batch.logp)
        assert torch.allclose(rule_grad, clipped, atol=1e-15, rtol=1e-12)
        # the rule's loss value is the clipped objective itself
        assert torch.allclose(
            aggregate_loss(out.per_token_loss, batch.mask),
            ppo_clip_objective(batch, eps_low, eps_high, dual_clip),
        )


def test_grpo_without_dual_clip_keeps_all_inward_terms():
    for seed in range(20):
        batch = make_batch(seed, spread=1.0)
        out = get_rule("grpo")(batch, {"dual_clip": None})
        lr = batch.log_ratio().detach()
        A = batch.advantages_2d()
        inward = batch.mask & (A * lr <= 0)
        assert bool(out.keep[inward].all())


# ---------------------------------------------------------------------------------------------
# DPPO
# ---------------------------------------------------------------------------------------------


def test_dppo_matches_reference_and_masks_with_zero_gradient():
    rule = get_rule("dppo")
    for seed in range(60):
        batch = make_batch(seed, adv_per_token=seed % 3 == 0)
        delta = [0.05, 0.1, 0.15][seed % 3]
        out = rule(batch, {"delta": delta})
        for b, (lr, A, D) in enumerate(_rows(batch)):
            n = len(lr)
            assert out.keep[b, :n].tolist() == dppo_reference(D, lr, A, delta=delta)
            assert not bool(out.keep[b, n:].any())
        fn = dppo_mask(
            batch.divergence, batch.log_ratio(), batch.advantages, batch.mask, delta=delta
        )
        assert torch.equal(fn, out.keep)
        g = grad_of(aggregate_loss(out.per_token_loss, batch.mask), batch.logp)
        assert bool((g[~out.keep] == 0).all())
        rho = torch.exp(batch.log_ratio().detach())
        want = -batch.advantages_2d() * rho / batch.mask.sum()
        assert torch.allclose(g[out.keep], want[out.keep], rtol=1e-12, atol=0)
        inward = batch.mask & (batch.advantages_2d() * batch.log_ratio().detach() <= 0)
        assert bool(out.keep[inward].all())


def test_dppo_hand_computed():
    # A > 0: rho > 1 outward -> threshold applies; rho <= 1 inward -> kept whatever D.
    D = torch.tensor([[0.1, 0.2, 0.2, 0.2]])
    lr = torch.tensor([[0.1, 0.1, -0.1, 0.0]])
    keep = dppo_mask(D, lr, torch.tensor([1.0]), torch.ones(1, 4, dtype=torch.bool), delta=0.15)
    assert keep.tolist() == [[True, False, True, True]]


# ---------------------------------------------------------------------------------------------
# CISPO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap,cap_low", [(5.0, None), (1.2, None), (1.28, 0.8)])
def test_cispo_gradient_is_clipped_weight_times_advantage(cap, cap_low):
    for seed in range(20):
        batch = make_batch(seed, spread=1.5)
        out = get_rule("cispo")(batch, {"cap": cap, "cap_low": cap_low})
        assert bool(out.keep[batch.mask].all()) and out.metrics["mask/fraction"] == 0.0
        assert not out.weight.requires_grad
        g = grad_of(aggregate_loss(out.per_token_loss, batch.mask), batch.logp)
        rho = torch.exp(batch.log_ratio().detach())
        w = rho.clamp(min=cap_low, max=cap)
        want = torch.where(batch.mask, -w * batch.advantages_2d() / batch.mask.sum(), 0.0)
        assert torch.allclose(g, want, rtol=1e-12, atol=1e-300)
        # loss value: -sg(w) A log pi
        lp = torch.where(batch.mask, batch.logp.detach(), 0.0)
        assert torch.allclose(
            out.per_token_loss.detach(),
            torch.where(batch.mask, -w * batch.advantages_2d() * lp, 0.0),
        )


def test_cispo_default_cap_is_five():
    assert get_rule("cispo").defaults()["cap"] == 5.0
    assert get_rule("cispo").defaults()["loss_agg_mode"] == "token-mean"


# ---------------------------------------------------------------------------------------------
# TRM
# ---------------------------------------------------------------------------------------------


def test_trm_hand_computed_and_normaliser():
    T = 4
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    kl = torch.tensor(
        [
            [0.0005, 0.0005, 0.0005, 0.0005],  # max .0005, mean .0005 -> both keep
            [0.0015, 0.0015, 9.0, 9.0],  # padding ignored: max keeps, mean .0015 rejects
            [0.01, 0.06, 0.0, 0.0],  # max .06 reject; mean .0233 reject
        ],
        dtype=torch.float64,
    )
    logp_mu = torch.full((3, T), -1.0, dtype=torch.float64)
    logp = (logp_mu + torch.tensor([0.1, -0.1, 0.2, 0.0], dtype=torch.float64)).requires_grad_(True)
    A = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    batch = RuleBatch(logp, logp_mu, A, mask, divergence=kl)
    out_max = get_rule("trm_max")(batch, {})
    out_avg = get_rule("trm_avg")(batch, {})
    assert out_max.keep.tolist() == [[True] * 4, [True, True, False, False], [False] * 4]
    assert out_avg.keep.tolist() == [[True] * 4, [False] * 4, [False] * 4]
    assert out_max.metrics["trm/reject_fraction"] == pytest.approx(1 / 3)
    assert out_avg.metrics["trm/reject_fraction"] == pytest.approx(2 / 3)
    for out in (out_max, out_avg):
        for b in range(3):
            n = int(mask[b].sum())
            row = kl[b, :n].tolist()
            want = trm_keep_reference(
                row,
                reduce="max" if out is out_max else "mean",
                threshold=0.05 if out is out_max else 0.001,
            )
            assert bool(out.keep[b, 0]) == want
    # rejected responses contribute zero but stay in the token-mean normaliser
    loss = aggregate_loss(out_avg.per_token_loss, mask)
    rho = torch.exp(torch.tensor([0.1, -0.1, 0.2, 0.0], dtype=torch.float64))
    assert loss.item() == pytest.approx(float(-(rho * 1.0).sum() / 9))
    # keep_inward: inward terms of rejected responses come back
    out = get_rule("trm_avg")(batch, {"keep_inward": True})
    inward = mask & (A.unsqueeze(-1) * (logp - logp_mu).detach() <= 0)
    assert bool(out.keep[inward].all())


def test_trm_defaults():
    assert get_rule("trm_max").defaults()["delta"] == 0.05
    assert get_rule("trm_avg").defaults()["delta_avg"] == 0.001
    assert get_rule("trm_max").bind().divergence == {
        "kind": "topk_kl",
        "topk": 20,
        "sampled_token": "extra",
    }


# ---------------------------------------------------------------------------------------------
# MinPRO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"eps_low": None, "eps_high": None},
        {"include_current": False},
        {"cap_prefix_min_at_one": True},
        {"eps_low": 0.5, "eps_high": 1.0},
    ],
)
def test_minpro_weights_and_gradient_match_reference(cfg):
    rule = get_rule("minpro")
    full = rule.resolve(cfg)
    for seed in range(30):
        batch = make_batch(seed, spread=0.5)
        out = rule(batch, cfg)
        for b, (lr, _, _) in enumerate(_rows(batch)):
            want = minpro_weights_reference(
                lr,
                eps_low=full["eps_low"],
                eps_high=full["eps_high"],
                include_current=full["include_current"],
                cap_prefix_min_at_one=full["cap_prefix_min_at_one"],
            )
            got = out.weight[b, : len(lr)].tolist()
            assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(got, want, strict=True))
            assert out.weight[b, len(lr) :].abs().sum() == 0
        g = grad_of(aggregate_loss(out.per_token_loss, batch.mask), batch.logp)
        want_g = torch.where(
            batch.mask, -out.weight * batch.advantages_2d() / batch.mask.sum(), 0.0
        )
        assert torch.allclose(g, want_g, rtol=1e-12, atol=1e-300)


def test_minpro_prefix_minimum_is_over_earlier_tokens_only():
    logp_mu = torch.zeros(1, 4, dtype=torch.float64)
    ratios = torch.tensor([[0.5, 2.0, 1.0, 1.1]], dtype=torch.float64)
    logp = torch.log(ratios).requires_grad_(True)
    batch = RuleBatch(
        logp, logp_mu, torch.ones(1, dtype=torch.float64), torch.ones(1, 4, dtype=torch.bool)
    )
    out = get_rule("minpro")(batch, {"eps_low": None, "eps_high": None})
    # m = [1, .5, .5, .5]; w = m * rho
    assert torch.allclose(out.weight, torch.tensor([[0.5, 1.0, 0.5, 0.55]], dtype=torch.float64))
    out = get_rule("minpro")(batch, {})
    assert torch.allclose(out.weight, torch.tensor([[0.8, 1.0, 0.8, 0.8]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# shared: IS cap, -inf log-probs, padding garbage
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grpo", "dppo", "cppo", "trm_max"])
def test_ratio_cap_turns_gradient_coefficient_into_min_rho_c(name):
    cap = 1.1
    for seed in range(10):
        batch = make_batch(seed, spread=0.5)
        cfg = {"ratio_cap": cap}
        if name == "trm_max":
            cfg["delta"] = 10.0
        if name == "grpo":
            cfg.update(eps_low=0.99, eps_high=100.0, dual_clip=None)  # nothing clipped
        out = get_rule(name)(batch, cfg)
        g = grad_of(aggregate_loss(out.per_token_loss, batch.mask), batch.logp)
        rho = torch.exp(batch.log_ratio().detach())
        coef = torch.minimum(rho, torch.tensor(cap, dtype=torch.float64))
        want = -out.weight * coef * batch.advantages_2d() / batch.mask.sum()
        assert torch.allclose(g, torch.where(batch.mask, want, 0.0), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name", ["grpo", "dppo", "cppo", "trm_max", "trm_avg"])
def test_minus_inf_logprobs_stay_finite(name):
    batch = make_batch(3)
    logp = batch.logp.detach().clone()
    logp[0, 0] = float("-inf")  # pi gives the sampled token zero mass
    logp_mu = batch.logp_mu.clone()
    logp_mu[0, 1] = float("-inf")  # mu (e.g. a truncated sampler) gives it zero mass
    logp[0, 2] = logp_mu[0, 2] = float("-inf")
    logp.requires_grad_(True)
    b = RuleBatch(logp, logp_mu, batch.advantages, batch.mask, divergence=batch.divergence)
    out = get_rule(name)(b, {})
    loss = aggregate_loss(out.per_token_loss, b.mask)
    assert torch.isfinite(loss)
    assert torch.isfinite(grad_of(loss, logp)).all()
    assert all(math.isfinite(v) for v in out.metrics.values())


def test_bf16_inputs_run_in_fp32():
    batch = make_batch(4, garbage=False)
    b = RuleBatch(
        batch.logp.detach().bfloat16().requires_grad_(True),
        batch.logp_mu.bfloat16(),
        batch.advantages.bfloat16(),
        batch.mask,
        divergence=batch.divergence.bfloat16(),
    )
    for name in ("grpo", "cppo", "cispo", "minpro"):
        out = get_rule(name)(b, {})
        assert out.per_token_loss.dtype == torch.float32
        loss = aggregate_loss(out.per_token_loss, b.mask)
        (g,) = torch.autograd.grad(loss, b.logp)
        assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


# ---------------------------------------------------------------------------------------------
# none: the no-trust-region control
# ---------------------------------------------------------------------------------------------


def test_none_is_the_plain_ratio_advantage_surrogate():
    for seed in range(5):
        batch = make_batch(seed, spread=0.8, adv_per_token=seed % 2 == 1)
        out = get_rule("none")(batch, {})
        assert torch.equal(out.keep, batch.mask)
        loss = aggregate_loss(out.per_token_loss, batch.mask)
        # direct formula: token-mean of -exp(logp - logp_mu) A over real tokens
        m = batch.mask
        logp = torch.where(m, batch.logp, torch.zeros((), dtype=torch.float64))
        direct = torch.where(m, -torch.exp(logp - batch.logp_mu) * batch.advantages_2d(), 0.0)
        direct = direct.sum() / m.sum()
        assert loss.item() == pytest.approx(direct.item(), rel=1e-12)
        g, g_direct = grad_of(loss, batch.logp), grad_of(direct, batch.logp)
        assert torch.allclose(g, g_direct, rtol=1e-12, atol=1e-300)
        # ratios far outside any clip still pass gradient
        rho = torch.exp(batch.log_ratio().detach())
        assert bool((g[m & ((rho > 2) | (rho < 0.5))] != 0).all())


def test_none_by_hand():
    logp_mu = torch.log(torch.tensor([[0.5, 0.2, 0.1]], dtype=torch.float64))
    logp = torch.log(torch.tensor([[0.25, 0.6, 0.1]], dtype=torch.float64)).requires_grad_(True)
    batch = RuleBatch(
        logp, logp_mu, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 3).bool()
    )
    out = get_rule("none")(batch, {})
    # rho = [0.5, 3, 1]; loss_t = -2 rho_t; d loss_t / d logp_t = -2 rho_t
    assert out.per_token_loss[0].tolist() == pytest.approx([-1.0, -6.0, -2.0])
    (g,) = torch.autograd.grad(out.per_token_loss.sum(), logp)
    assert g[0].tolist() == pytest.approx([-1.0, -6.0, -2.0])

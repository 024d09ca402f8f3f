"""CPPO: vectorised mask/gate == plain-Python Algorithm 1, specialisations, causality,
gradients and diagnostics."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cppo.rules import (
    RuleBatch,
    aggregate_loss,
    cppo_gate,
    cppo_mask,
    cppo_soft_weight,
    dppo_mask,
    get_rule,
    masked_quantile,
    metrics_to_floats,
)
from cppo.rules.cppo import CPPOParams, shuffled_ranks
from cppo.rules.reference import (
    cppo_batch_reference,
    is_outward,
    linear_quantile,
    position_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# random batches
# ---------------------------------------------------------------------------------------------


def _lengths(rng: random.Random, B: int, T: int) -> list[int]:
    out = []
    for _ in range(B):
        kind = rng.random()
        if kind < 0.15:
            out.append(1)
        elif kind < 0.3:
            out.append(min(2, T))
        elif kind < 0.5:
            out.append(T)
        elif kind < 0.55:
            out.append(0)  # an all-padding row
        else:
            out.append(rng.randint(1, T))
    return out


def random_case(rng: random.Random, *, max_b: int = 6, max_t: int = 40, dtype=torch.float64):
    """A random batch: tensors with NaN garbage on padding, plus the real-token lists."""
    B, T = rng.randint(1, max_b), rng.randint(1, max_t)
    lengths = _lengths(rng, B, T)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    style = rng.choice(["uniform", "heavy", "spiky", "zeros", "const", "tiny"])
    if style == "uniform":
        D = torch.rand(B, T, generator=g, dtype=torch.float64) * rng.choice([0.05, 0.2, 0.5])
    elif style == "heavy":
        D = torch.rand(B, T, generator=g, dtype=torch.float64) ** 4 * 0.6
    elif style == "spiky":
        D = torch.rand(B, T, generator=g, dtype=torch.float64) * 0.02
        D = D + (torch.rand(B, T, generator=g) < 0.1).double() * 0.3
    elif style == "zeros":
        D = torch.zeros(B, T, dtype=torch.float64)
    elif style == "const":
        D = torch.full((B, T), rng.choice([0.01, 0.02, 0.1, 0.15]), dtype=torch.float64)
    else:
        D = torch.rand(B, T, generator=g, dtype=torch.float64) * 1e-3
    lr = torch.randn(B, T, generator=g, dtype=torch.float64) * rng.choice([0.01, 0.1, 0.5])
    lr = torch.where(torch.rand(B, T, generator=g) < 0.15, torch.zeros(()).double(), lr)
    if rng.random() < 0.1:
        lr.zero_()  # every ratio exactly 1
    if rng.random() < 0.5:
        A = torch.randn(B, generator=g, dtype=torch.float64)
        A = torch.where(torch.rand(B, generator=g) < 0.2, torch.zeros(()).double(), A)
        A2 = A.unsqueeze(-1).expand(B, T)
    else:
        A = torch.randn(B, T, generator=g, dtype=torch.float64)
        A = torch.where(torch.rand(B, T, generator=g) < 0.1, torch.zeros(()).double(), A)
        A2 = A
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)
    D, lr = D.to(dtype), lr.to(dtype)
    D_in = D.masked_fill(~mask, float("nan"))
    lr_in = lr.masked_fill(~mask, float("nan"))
    ref = {
        "D": D.double().tolist(),
        "lr": lr.double().tolist(),
        "A": A2.double().tolist(),
        "lengths": lengths,
    }
    return D_in, lr_in, A, mask, ref


def random_params(rng: random.Random) -> dict:
    return {
        "delta": rng.choice([0.05, 0.1, 0.15, 0.2, 0.3, rng.uniform(0.01, 0.4)]),
        "delta_b": rng.choice([0.0, 0.005, 0.015, 0.02, 0.05, rng.uniform(0.0, 0.1)]),
        "w_min": rng.choice([1.0, 0.8, 0.6, 0.3, 0.05, rng.uniform(0.01, 1.0)]),
        "adaptive_delta_b": rng.random() < 0.5,
        "position_weight": rng.random() < 0.75,
        "prefix_budget": rng.random() < 0.75,
        "delta_b_quantile": rng.choice([0.9, 0.9, 0.9, 0.5, 0.0, 1.0, rng.random()]),
        "delta_b_max_factor": rng.choice([2.0, 2.0, 1.0, 3.5]),
    }


def _reference(ref: dict, params: dict, soft: bool, ranks=None):
    kw = dict(params)
    q = kw.pop("delta_b_quantile")
    f = kw.pop("delta_b_max_factor")
    return cppo_batch_reference(
        ref["D"],
        ref["lr"],
        ref["A"],
        ref["lengths"],
        ranks=ranks,
        soft=soft,
        quantile=q,
        max_factor=f,
        **kw,
    )


def _check_against_reference(rng: random.Random, dtype, **case_kw) -> None:
    D, lr, A, mask, ref = random_case(rng, dtype=dtype, **case_kw)
    params = random_params(rng)
    # position horizon: each response's length, or a padded T >= every length (verl PR #6731)
    T = D.shape[1]
    params["horizon"] = rng.choice([None, None, T, T + rng.randint(1, 3 * T)])
    soft = rng.random() < 0.3
    seed = rng.randrange(1000) if rng.random() < 0.3 else None
    gate = cppo_gate(D, lr, A, mask, soft=soft, shuffle_seed=seed, **params)
    ranks = shuffled_ranks(mask, seed).tolist() if seed is not None else None
    w_ref, db_ref, kinds = _reference(ref, params, soft, ranks)
    assert torch.equal(gate.weight, torch.tensor(w_ref, dtype=torch.float64)), (params, soft)
    nonempty = torch.tensor(ref["lengths"]) > 0
    assert torch.equal(
        gate.delta_b_eff[nonempty], torch.tensor(db_ref, dtype=torch.float64)[nonempty]
    )
    assert gate.token_violation.tolist() == [[k == "token" for k in row] for row in kinds]
    assert gate.prefix_violation.tolist() == [[k == "prefix" for k in row] for row in kinds]
    if not soft:
        keep = cppo_mask(D, lr, A, mask, shuffle_seed=seed, **params)
        assert keep.dtype == torch.bool
        assert torch.equal(keep, gate.keep)
        assert torch.equal(keep, torch.tensor(w_ref) == 1.0)
    else:
        w = cppo_soft_weight(D, lr, A, mask, shuffle_seed=seed, **params)
        assert torch.equal(w, gate.weight)
    assert not bool(gate.keep[~mask].any())


# ---------------------------------------------------------------------------------------------
# vectorised == Algorithm 1
# ---------------------------------------------------------------------------------------------


def test_matches_algorithm1_on_thousands_of_random_batches():
    rng = random.Random(1234)
    for _ in range(2500):
        _check_against_reference(rng, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_algorithm1_for_low_precision_inputs(dtype):
    # Mask arithmetic runs in float64, so fp32/bf16 inputs agree exactly with the reference
    # evaluated on the same (exactly representable) values.
    rng = random.Random(99 if dtype == torch.float32 else 7)
    for _ in range(400):
        _check_against_reference(rng, dtype)


def test_matches_algorithm1_on_long_responses():
    rng = random.Random(5)
    for _ in range(12):
        _check_against_reference(rng, torch.float64, max_b=3, max_t=2500)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
@given(
    rows=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from([0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.5, 1.0]),
                st.sampled_from([-0.3, -0.01, 0.0, 0.01, 0.3]),
            ),
            min_size=0,
            max_size=12,
        ),
        min_size=1,
        max_size=4,
    ),
    adv=st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0]), min_size=4, max_size=4),
    delta=st.sampled_from([0.05, 0.15, 0.2]),
    delta_b=st.sampled_from([0.0, 0.02, 0.05]),
    w_min=st.sampled_from([1.0, 0.8, 0.5]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
)
def test_matches_algorithm1_on_grid_values(rows, adv, delta, delta_b, w_min, flags):
    # Grid values make exact ties (Z_t == c_t, equal D, rho == 1, A == 0) common.
    adaptive, pw, pb, soft = flags
    T = max(1, max(len(r) for r in rows))
    B = len(rows)
    D = torch.zeros(B, T, dtype=torch.float64)
    lr = torch.zeros(B, T, dtype=torch.float64)
    for b, row in enumerate(rows):
        for t, (d, r) in enumerate(row):
            D[b, t], lr[b, t] = d, r
    lengths = [len(r) for r in rows]
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)
    A = torch.tensor(adv[:B], dtype=torch.float64)
    params = dict(
        delta=delta,
        delta_b=delta_b,
        w_min=w_min,
        adaptive_delta_b=adaptive,
        position_weight=pw,
        prefix_budget=pb,
    )
    gate = cppo_gate(D, lr, A, mask, soft=soft, **params)
    ref = {
        "D": D.tolist(),
        "lr": lr.tolist(),
        "A": A.unsqueeze(-1).expand(B, T).tolist(),
        "lengths": lengths,
    }
    w_ref, _, _ = _reference(
        ref, {**params, "delta_b_quantile": 0.9, "delta_b_max_factor": 2.0}, soft
    )
    assert gate.weight.tolist() == w_ref


# ---------------------------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------------------------


def _one(D, lr, A, **kw):
    D = torch.tensor([D], dtype=torch.float64)
    lr = torch.tensor([lr], dtype=torch.float64)
    mask = torch.ones_like(D, dtype=torch.bool)
    return cppo_gate(D, lr, torch.tensor([A], dtype=torch.float64), mask, **kw)


def test_hand_computed_prefix_budget():
    # w = [1, 0.9, 0.8]; t1: c=0.15, Z=0.1 kept; t2: c=min(.15,.15+.02-.1)=.07 < Z=.09 masked
    # (budget); t3: c = .15 + .02*1.9 - .19 = -.002 < Z=.08 masked (budget).
    g = _one([0.1, 0.1, 0.1], [0.1, 0.1, 0.1], 1.0, delta=0.15, delta_b=0.02, w_min=0.8)
    assert g.keep.tolist() == [[True, False, False]]
    assert g.prefix_violation.tolist() == [[False, True, True]]
    assert g.token_violation.tolist() == [[False, False, False]]
    assert torch.allclose(g.position_weight, torch.tensor([[1.0, 0.9, 0.8]], dtype=torch.float64))


def test_hand_computed_token_threshold_and_position_weight():
    # Per-token limit delta / w_t: 0.15 at t=1, 0.15/0.8 = 0.1875 at the last token.
    big = 1e9  # budget never binds
    g = _one([0.16, 0.01, 0.18], [0.2, 0.2, 0.2], 1.0, delta=0.15, delta_b=big, w_min=0.8)
    assert g.keep.tolist() == [[False, True, True]]
    assert g.token_violation.tolist() == [[True, False, False]]
    g = _one([0.16, 0.01, 0.19], [0.2, 0.2, 0.2], 1.0, delta=0.15, delta_b=big, w_min=0.8)
    assert g.keep.tolist() == [[False, True, False]]


def test_budget_counts_inward_and_masked_tokens():
    # The inward first token is kept but its divergence still consumes the budget:
    # t2: c = min(.15, .15 + .02 - .14) = .03 < Z = .05.
    g = _one([0.14, 0.05], [-0.1, 0.1], 1.0, delta=0.15, delta_b=0.02, w_min=1.0)
    assert g.keep.tolist() == [[True, False]]
    assert g.prefix_violation.tolist() == [[False, True]]
    # a masked (token-threshold) first token counts too; the budget recovers by delta_b per
    # token: c_2 = .15+.02-.2 < 0 (even Z = 0 fails), c_3 = -.01, c_4 = .15+.06-.2 = .01
    g = _one([0.2, 0.0, 0.0, 0.005], [0.1] * 4, 1.0, delta=0.15, delta_b=0.02, w_min=1.0)
    assert g.keep.tolist() == [[False, False, False, True]]
    assert g.token_violation.tolist() == [[True, False, False, False]]
    assert g.prefix_violation.tolist() == [[False, True, True, False]]


def test_single_token_response_uses_w1_and_plain_threshold():
    for d, kept in [(0.15, True), (0.1500001, False)]:
        g = _one([d], [0.3], 1.0, delta=0.15, delta_b=0.0, w_min=0.5)
        assert g.keep.tolist() == [[kept]]
        assert g.position_weight.tolist() == [[1.0]]


def test_adaptive_delta_b_hand_computed():
    # P90 of nine zeros and a one: pos = 0.9 * 9 = 8.1 -> 0 + 0.1 * (1 - 0) = 0.1 -> 2 * 0.02
    g = _one(
        [0.0] * 9 + [1.0],
        [0.0] * 10,
        1.0,
        delta=0.15,
        delta_b=0.02,
        w_min=0.8,
        adaptive_delta_b=True,
    )
    assert g.delta_b_eff.tolist() == [0.04]
    g = _one([0.03] * 5, [0.0] * 5, 1.0, delta=0.15, delta_b=0.02, w_min=0.8, adaptive_delta_b=True)
    assert g.delta_b_eff.tolist() == [0.03]
    g = _one(
        [0.001] * 5, [0.0] * 5, 1.0, delta=0.15, delta_b=0.02, w_min=0.8, adaptive_delta_b=True
    )
    assert g.delta_b_eff.tolist() == [0.02]


def test_soft_gate_hand_computed():
    # t1: x = max(.3/.15, .3/.15) = 2 -> g = .5; t2 inward -> 1;
    # t3: S = .3+.0+.1 = .4, budget = .15 + .02*2 = .19, x = max(.1/.15, .4/.19) -> .19/.4
    g = _one([0.3, 0.0, 0.1], [0.1, -0.1, 0.1], 1.0, delta=0.15, delta_b=0.02, w_min=1.0, soft=True)
    assert torch.allclose(g.weight, torch.tensor([[0.5, 1.0, 0.19 / 0.4]], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# specialisations and structure
# ---------------------------------------------------------------------------------------------


def test_without_position_weight_and_budget_equals_dppo():
    rng = random.Random(11)
    for _ in range(400):
        D, lr, A, mask, _ = random_case(rng)
        p = random_params(rng)
        p.update(position_weight=False, prefix_budget=False)
        assert torch.equal(
            cppo_mask(D, lr, A, mask, **p), dppo_mask(D, lr, A, mask, delta=p["delta"])
        )


def test_huge_delta_b_leaves_position_weighted_threshold():
    rng = random.Random(12)
    for _ in range(400):
        D, lr, A, mask, ref = random_case(rng)
        p = random_params(rng)
        p.update(delta_b=1e12, adaptive_delta_b=False)
        keep = cppo_mask(D, lr, A, mask, **p)
        expected = []
        for b, n in enumerate(ref["lengths"]):
            w = position_weights(n, p["w_min"]) if (p["position_weight"] and n) else [1.0] * n
            row = [
                (not is_outward(ref["A"][b][t], ref["lr"][b][t]))
                or w[t] * ref["D"][b][t] <= p["delta"]
                for t in range(n)
            ]
            expected.append(row + [False] * (len(ref["D"][b]) - n))
        assert keep.tolist() == expected


def test_causality_fixed_budget():
    rng = random.Random(13)
    for _ in range(400):
        D, lr, A, mask, ref = random_case(rng)
        p = random_params(rng)
        p["adaptive_delta_b"] = False
        soft = rng.random() < 0.5
        base = cppo_gate(D, lr, A, mask, soft=soft, **p).weight
        T = D.shape[1]
        t = rng.randrange(T)
        D2, lr2 = D.clone(), lr.clone()
        D2[:, t + 1 :] = torch.rand_like(D2[:, t + 1 :]) * 2
        lr2[:, t + 1 :] = torch.randn_like(lr2[:, t + 1 :])
        A2 = A.clone()
        if A2.dim() == 2:
            A2[:, t + 1 :] = -A2[:, t + 1 :]
        after = cppo_gate(D2, lr2, A2, mask, soft=soft, **p).weight
        assert torch.equal(base[:, : t + 1], after[:, : t + 1])


def test_adaptive_budget_is_only_way_the_future_enters():
    # With adaptive delta_b the mask equals the fixed-budget mask at each response's own
    # delta_b_eff; the fixed-budget mask is causal (test above).
    rng = random.Random(14)
    for _ in range(300):
        D, lr, A, mask, _ = random_case(rng)
        p = random_params(rng)
        p["adaptive_delta_b"] = True
        gate = cppo_gate(D, lr, A, mask, **p)
        fixed = dict(p, adaptive_delta_b=False, delta_b=gate.delta_b_eff)
        assert torch.equal(gate.keep, cppo_mask(D, lr, A, mask, **fixed))


def test_inward_terms_are_always_kept():
    rng = random.Random(15)
    for _ in range(300):
        D, lr, A, mask, ref = random_case(rng)
        p = random_params(rng)
        gate = cppo_gate(D, lr, A, mask, **p)
        inward = mask & ~gate.outward
        assert bool(gate.keep[inward].all())
        assert bool((gate.weight[inward] == 1.0).all())
        soft = cppo_gate(D, lr, A, mask, soft=True, **p)
        assert bool((soft.weight[inward] == 1.0).all())
        assert bool(((soft.weight > 0) & (soft.weight <= 1))[mask].all())


def test_soft_gate_agrees_with_hard_mask_away_from_ties():
    rng = random.Random(16)
    for _ in range(300):
        D, lr, A, mask, _ = random_case(rng)
        p = random_params(rng)
        hard = cppo_gate(D, lr, A, mask, **p)
        soft = cppo_gate(D, lr, A, mask, soft=True, **p)
        agree = hard.keep == (soft.weight == 1.0)
        bad = mask & ~agree
        if bool(bad.any()):
            # hard: Z_t <= delta + delta_b W_{t-1} - S_{t-1}; soft: S_t / (delta + ...) <= 1.
            # Equal in exact arithmetic; rounding may split them only at ties.
            Z = hard.position_weight * torch.nan_to_num(D.double(), nan=0.0)
            S = torch.cumsum(Z, -1)
            W_prev = torch.nn.functional.pad(torch.cumsum(hard.position_weight, -1), (1, 0))[:, :-1]
            budget = p["delta"] + hard.delta_b_eff.unsqueeze(-1) * W_prev
            gap = torch.minimum((S - budget).abs(), (Z - p["delta"]).abs())
            assert bool((gap[bad] <= 1e-12).all())


def test_shuffled_weights_permute_within_each_response():
    mask = torch.arange(50).unsqueeze(0) < torch.tensor([[50], [17], [1], [0]])
    r1 = shuffled_ranks(mask, 3)
    assert torch.equal(r1, shuffled_ranks(mask, 3))  # seeded
    assert not torch.equal(r1, shuffled_ranks(mask, 4))
    for b, n in enumerate([50, 17, 1, 0]):
        assert sorted(r1[b, :n].tolist()) == list(range(n))
    D = torch.rand(4, 50, dtype=torch.float64)
    lr = torch.ones(4, 50, dtype=torch.float64)
    A = torch.ones(4, dtype=torch.float64)
    kw = dict(delta=0.15, delta_b=0.02, w_min=0.7)
    plain = cppo_gate(D, lr, A, mask, **kw).position_weight
    shuf = cppo_gate(D, lr, A, mask, shuffle_seed=3, **kw).position_weight
    for b, n in enumerate([50, 17, 1, 0]):
        assert sorted(shuf[b, :n].tolist()) == sorted(plain[b, :n].tolist())
    assert not torch.equal(plain[0], shuf[0])


def test_params_object_and_keywords_are_one_interface():
    rng = random.Random(21)
    for _ in range(50):
        D, lr, A, mask, _ = random_case(rng)
        kw = random_params(rng)
        p = CPPOParams(**kw)
        a, b = cppo_gate(D, lr, A, mask, p), cppo_gate(D, lr, A, mask, **kw)
        for f in ("keep", "weight", "token_violation", "prefix_violation", "delta_b_eff"):
            assert torch.equal(getattr(a, f), getattr(b, f))
        assert torch.equal(cppo_mask(D, lr, A, mask, p), a.keep)
        soft = cppo_gate(D, lr, A, mask, soft=True, **kw).weight
        assert torch.equal(cppo_soft_weight(D, lr, A, mask, p), soft)
        assert torch.equal(cppo_gate(D, lr, A, mask, p, soft=True).weight, soft)
    with pytest.raises(ValueError, match="hard mask"):
        cppo_mask(D, lr, A, mask, p, soft=True)
    with pytest.raises(ValueError, match="delta must be > 0"):
        CPPOParams(delta=0.0, delta_b=0.02, w_min=0.8)
    with pytest.raises(ValueError, match="w_min"):
        cppo_gate(D, lr, A, mask, p, w_min=0.0)


def test_masked_quantile_matches_torch_quantile():
    rng = random.Random(17)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        B, T = rng.randint(1, 6), rng.randint(1, 60)
        lengths = [rng.randint(0, T) for _ in range(B)]
        mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)
        v = torch.rand(B, T, generator=g, dtype=torch.float64)
        if rng.random() < 0.3:
            v = (v * 4).floor() / 4  # ties
        q = rng.choice([0.9, 0.5, 0.0, 1.0, rng.random()])
        got = masked_quantile(v, mask, q)
        for b, n in enumerate(lengths):
            if n == 0:
                assert math.isnan(got[b].item())
                continue
            want = torch.quantile(v[b, :n], q).item()
            assert math.isclose(got[b].item(), want, rel_tol=1e-12, abs_tol=1e-15)
            assert got[b].item() == linear_quantile(v[b, :n].tolist(), q)


# ---------------------------------------------------------------------------------------------
# the registered rule: gradients, padding, diagnostics
# ---------------------------------------------------------------------------------------------


def _batch(rng: random.Random, **case_kw):
    D, lr, A, mask, ref = random_case(rng, **case_kw)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    logp_mu = -torch.rand(D.shape, generator=g, dtype=torch.float64) * 3
    logp = (logp_mu + torch.nan_to_num(lr, nan=0.0)).masked_fill(~mask, float("nan"))
    logp.requires_grad_(True)
    return RuleBatch(logp, logp_mu, A, mask, divergence=D, seed=rng.randrange(100)), ref


def test_masked_tokens_get_exactly_zero_gradient():
    rng = random.Random(18)
    rule = get_rule("cppo")
    for _ in range(200):
        batch, _ = _batch(rng)
        cfg = {
            "delta": rng.choice([0.05, 0.15]),
            "delta_b": rng.choice([0.0, 0.02]),
            "w_min": 0.8,
            "adaptive_delta_b": rng.random() < 0.5,
            "shuffle_weights": rng.random() < 0.3,
            "gate": rng.choice(["hard", "soft"]),
        }
        out = rule(batch, cfg)
        loss = aggregate_loss(out.per_token_loss, batch.mask)
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, batch.logp, allow_unused=True)
        grad = torch.zeros_like(batch.logp) if grad is None else grad
        mask = batch.mask
        n = max(int(mask.sum()), 1)
        rho = torch.exp(batch.log_ratio().detach())
        expected = -out.weight * batch.advantages_2d() * rho / n
        assert torch.allclose(
            grad, torch.where(mask, expected, torch.zeros(()).double()), atol=1e-14
        )
        assert bool((grad[~out.keep] == 0).all())
        assert bool((grad[~mask] == 0).all())


def test_rule_metrics_are_consistent():
    rng = random.Random(19)
    rule = get_rule("cppo")
    for _ in range(100):
        batch, ref = _batch(rng)
        out = rule(batch, {"gate": "hard"})
        m = metrics_to_floats(out.metrics)
        assert all(isinstance(v, float) for v in m.values())
        assert math.isclose(
            m["mask/token_fraction"] + m["mask/prefix_fraction"], m["mask/fraction"], abs_tol=1e-12
        )
        n = int(batch.mask.sum())
        if n:
            assert math.isclose(m["mask/fraction"], float((~out.keep & batch.mask).sum()) / n)
        nonempty = [b for b, L in enumerate(ref["lengths"]) if L]
        if nonempty:
            w, db, _ = _reference(
                ref,
                {
                    "delta": 0.15,
                    "delta_b": 0.02,
                    "w_min": 0.8,
                    "adaptive_delta_b": True,
                    "position_weight": True,
                    "prefix_budget": True,
                    "delta_b_quantile": 0.9,
                    "delta_b_max_factor": 2.0,
                },
                False,
            )
            want = sum(db[b] for b in nonempty) / len(nonempty)
            assert math.isclose(m["cppo/delta_b_eff"], want, rel_tol=1e-12)


def test_prefix_share_hand_computed():
    logp_mu = torch.log(torch.full((1, 3), 0.5, dtype=torch.float64))
    logp = (logp_mu + 0.1).requires_grad_(True)
    batch = RuleBatch(
        logp,
        logp_mu,
        torch.tensor([1.0], dtype=torch.float64),
        torch.ones(1, 3, dtype=torch.bool),
        divergence=torch.tensor([[0.2, 0.01, 0.01]], dtype=torch.float64),
    )
    out = get_rule("cppo")(batch, {"w_min": 1.0, "delta_b": 0.02, "adaptive_delta_b": False})
    # t1 token-masked; t2: c = .15+.02-.2 < 0 -> prefix-masked; t3: c = .15+.04-.21 < 0 -> prefix
    assert out.keep.tolist() == [[False, False, False]]
    assert out.metrics["mask/token_fraction"] == pytest.approx(1 / 3)
    assert out.metrics["mask/prefix_fraction"] == pytest.approx(2 / 3)
    assert out.metrics["cppo/prefix_share"] == pytest.approx(2 / 3)
    assert out.metrics["cppo/delta_b_eff"] == pytest.approx(0.02)


def test_rule_defaults_follow_the_paper():
    d = get_rule("cppo").defaults()
    assert (d["delta"], d["delta_b"], d["w_min"]) == (0.15, 0.02, 0.8)
    assert d["adaptive_delta_b"] is True and d["gate"] == "hard"
    assert (d["divergence"], d["topk"], d["sampled_token"]) == ("topk_tv", 20, "extra")
    assert d["ratio_cap"] is None and d["loss_agg_mode"] == "token-mean"
    assert d["position_horizon"] == "response" and d["delta_b_max_factor"] == 2.0

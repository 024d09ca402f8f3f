"""The rules beyond the paper (GSPO, GMPO, SAPO, IcePop, OPSM, M2PO, the Dr. GRPO and TIS
presets) against their equations: hand-computed cases, and per-token loss values and gradients on
random padded batches against the plain-python references of cppo.rules.reference."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from cppo.rules import RuleBatch, aggregate_loss, get_rule, metrics_to_floats
from cppo.rules.m2po import m2po_mask
from cppo.rules.reference import (
    gmpo_reference,
    gspo_reference,
    icepop_reference,
    m2po_masked_reference,
    opsm_reference,
    sapo_reference,
    tis_reference,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64


def one_row(log_ratio, advantage, logp_mu=-1.0) -> RuleBatch:
    lr = torch.tensor([log_ratio], dtype=F64)
    lq = torch.full_like(lr, logp_mu)
    adv = torch.tensor(advantage if isinstance(advantage, list) else [advantage], dtype=F64)
    if adv.numel() > 1:
        adv = adv.unsqueeze(0)
    return RuleBatch((lq + lr).requires_grad_(True), lq, adv, torch.ones_like(lr, dtype=torch.bool))


def grad_of(rule: str, batch: RuleBatch, cfg: dict | None = None):
    out = get_rule(rule)(batch, cfg or {})
    (g,) = torch.autograd.grad(out.per_token_loss.sum(), batch.logp)
    return out, g


# --- hand-computed cases -------------------------------------------------------------------


def test_gspo_clips_the_whole_response_on_its_sequence_ratio():
    # s = exp(mean(0.002, 0)) = exp(0.001) > 1 + 4e-4: clipped for A > 0, kept for A < 0
    out, g = grad_of("gspo", one_row([0.002, 0.0], 1.0))
    assert out.keep.tolist() == [[False, False]] and g.abs().sum() == 0
    s = math.exp(0.001)
    assert out.per_token_loss[0].tolist() == pytest.approx([-(1 + 4e-4)] * 2, abs=1e-15)
    out, g = grad_of("gspo", one_row([0.002, 0.0], -1.0))
    assert out.keep.all()
    assert g[0].tolist() == pytest.approx([s, s], abs=1e-15)  # -A s


def test_gmpo_geometric_mean_with_sign_aware_clip():
    # A = +1: log-ratios (0.5, 0.1) -> (min(0.5, 0.4), 0.1), r = exp(0.25), L = -r
    out, g = grad_of("gmpo", one_row([0.5, 0.1], 1.0))
    r = math.exp(0.25)
    assert out.per_token_loss[0].tolist() == pytest.approx([-r, -r], abs=1e-14)
    assert out.keep.tolist() == [[False, True]]
    assert g[0].tolist() == pytest.approx([0.0, -r], abs=1e-14)  # row sum 2L: d/dlogp_2 = -r
    # A = -1: the clip binds only below -0.4, so (0.5, 0.1) stay, r = exp(0.3), L = +r
    out, g = grad_of("gmpo", one_row([0.5, 0.1], -1.0))
    r = math.exp(0.3)
    assert out.per_token_loss[0].tolist() == pytest.approx([r, r], abs=1e-14)
    assert g[0].tolist() == pytest.approx([r, r], abs=1e-14)


def test_sapo_gate_is_one_on_policy_and_decays_off_it():
    out, g = grad_of("sapo", one_row([0.0], 2.0))
    assert out.per_token_loss.item() == pytest.approx(-2.0 * 2.0 / 1.0)  # -(4/tau) 0.5 A
    assert g.item() == pytest.approx(-2.0)  # -4 s (1 - s) rho A = -A on policy
    out, g = grad_of("sapo", one_row([math.log(3.0)], -1.0))
    s = 1 / (1 + math.exp(-1.05 * 2.0))
    assert out.weight.item() == pytest.approx(4 * s * (1 - s))
    assert g.item() == pytest.approx(4 * s * (1 - s) * 3.0)


CATALOGUE = Path(__file__).resolve().parents[1] / "config" / "methods.yaml"


def tis_preset() -> tuple[str, dict]:
    entry = yaml.safe_load(CATALOGUE.read_text())["methods"]["tis"]
    return entry["rule"], entry["params"]


def test_the_tis_preset_caps_the_coefficient_at_two():
    # TIS: L = -min(rho, C) A, gradient -min(rho, C) A (Yao et al.), C = 2 (verl)
    rule, params = tis_preset()
    assert (rule, params) == ("cispo", {"cap": 2.0})
    lr = [1.0, 0.2, -0.5]  # rho = e (> 2), 1.22, 0.61
    out, g = grad_of(rule, one_row(lr, 1.5), params)
    want = [-min(math.exp(x), 2.0) * 1.5 for x in lr]
    assert g[0].tolist() == pytest.approx(want, abs=1e-14)
    assert metrics_to_floats(out.metrics)["cispo/capped_fraction"] == pytest.approx(1 / 3)


def test_icepop_zeroes_ratios_outside_the_band_whatever_the_advantage_sign():
    lr = [math.log(0.4), math.log(0.6), math.log(4.9), math.log(5.2)]
    for a in (1.0, -1.0):
        out, g = grad_of("icepop", one_row(lr, a))
        assert out.keep.tolist() == [[False, True, True, False]]
        assert g[0].tolist() == pytest.approx([0.0, -0.6 * a, -4.9 * a, 0.0], abs=1e-12)


def test_opsm_drops_negative_advantage_responses_that_drifted():
    lr = [-0.6, -0.6]  # mean log(mu/pi) = 0.6 > 0.5
    out, g = grad_of("opsm", one_row(lr, -1.0))
    assert not out.keep.any() and g.abs().sum() == 0
    assert metrics_to_floats(out.metrics)["opsm/masked_fraction"] == 1.0
    out, g = grad_of("opsm", one_row(lr, 1.0))  # positive advantage: plain PPO clip, inward
    assert out.keep.all()
    assert g[0].tolist() == pytest.approx([-math.exp(-0.6)] * 2, abs=1e-14)
    out, _ = grad_of("opsm", one_row([-0.4, -0.4], -1.0))  # 0.4 <= 0.5: kept (rho 0.67 < 0.8
    assert out.keep.tolist() == [[False, False]]  # ... so the clip of A < 0 drops it instead)
    assert metrics_to_floats(out.metrics)["opsm/masked_fraction"] == 0.0


def test_m2po_masks_the_largest_squares_until_the_mean_fits():
    # squares 0.01, 0.25, 0.09: mean 0.1167 > 0.04 -> drop 0.25: mean 0.05 -> drop 0.09: 0.01
    out, g = grad_of("m2po", one_row([0.1, 0.5, -0.3], 1.0))
    assert out.keep.tolist() == [[True, False, False]]
    assert g[0].tolist() == pytest.approx([-math.exp(0.1), 0.0, 0.0], abs=1e-14)
    m = metrics_to_floats(out.metrics)
    assert m["m2po/m2_before"] == pytest.approx(0.35 / 3)
    assert m["m2po/m2_after"] == pytest.approx(0.01)
    # scope outward: only A (rho - 1) > 0 terms count; with A > 0 those are 0.1 and 0.5
    out, _ = grad_of("m2po", one_row([0.1, 0.5, -0.3], 1.0), {"scope": "outward"})
    assert out.keep.tolist() == [[True, False, True]]


def test_m2po_mask_equals_the_loop_on_random_values():
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(1, 30)
        vals = [
            rng.choice([0.0, 0.01, 0.2]) if rng.random() < 0.3 else rng.random() ** 3
            for _ in range(n)
        ]
        sel = [rng.random() < 0.8 for _ in range(n)]
        tau = rng.choice([0.0, 0.01, 0.04, 0.2, 1.0])
        got = m2po_mask(torch.tensor(vals, dtype=F64), torch.tensor(sel), tau).tolist()
        picked = [i for i in range(n) if sel[i]]
        ref = m2po_masked_reference([vals[i] for i in picked], tau)
        want = [False] * n
        for i, m in zip(picked, ref, strict=True):
            want[i] = m
        assert got == want, (vals, sel, tau)


# --- random padded batches against the references ---------------------------------------------

# case -> (rule, reference, rule params, compare the loss values too); the TIS preset (CISPO at
# C = 2) matches TIS in gradient only: its logged value is CISPO's -sg(w) A log pi
REFERENCES = {
    "gspo": ("gspo", gspo_reference, {"eps_low": 0.01, "eps_high": 0.02}, True),
    "gmpo": ("gmpo", gmpo_reference, {"eps_low": 0.1, "eps_high": 0.15}, True),
    "sapo": ("sapo", sapo_reference, {"tau_pos": 1.0, "tau_neg": 1.05}, True),
    "icepop": ("icepop", icepop_reference, {"low": 0.9, "high": 1.1}, True),
    "opsm": (
        "opsm",
        opsm_reference,
        {"threshold": 0.05, "eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0},
        True,
    ),
    "tis": (tis_preset()[0], tis_reference, tis_preset()[1], False),
}


def random_batch(rng: random.Random, per_token_adv: bool):
    B, T = rng.randint(1, 5), rng.randint(1, 12)
    lengths = [rng.randint(1, T) for _ in range(B)]
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    lq = -torch.rand(B, T, generator=g, dtype=F64) * 3
    lr = torch.randn(B, T, generator=g, dtype=F64) * rng.choice([0.05, 0.3])
    adv = (
        torch.randn(B, T, generator=g, dtype=F64)
        if per_token_adv
        else torch.randn(B, generator=g, dtype=F64)
    )
    logp = (lq + lr).masked_fill(~mask, float("nan")).requires_grad_(True)
    return RuleBatch(logp, lq, adv, mask), lengths


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_loss_and_gradient_equal_the_reference(name):
    rule, ref, cfg, values_too = REFERENCES[name]
    rng = random.Random(sum(map(ord, name)))
    for i in range(40):
        batch, lengths = random_batch(rng, per_token_adv=i % 2 == 1)
        out = get_rule(rule)(batch, cfg)
        (g,) = torch.autograd.grad(out.per_token_loss.sum(), batch.logp)
        lr = (batch.logp.detach() - batch.logp_mu).tolist()
        adv = batch.advantages_2d().tolist()
        for b, n in enumerate(lengths):
            values, grads = ref(lr[b][:n], adv[b][:n], **cfg)
            if values_too:
                assert out.per_token_loss[b, :n].tolist() == pytest.approx(
                    values, rel=1e-12, abs=1e-14
                )
            assert g[b, :n].tolist() == pytest.approx(grads, rel=1e-12, abs=1e-14)
            assert out.per_token_loss[b, n:].abs().sum() == 0 and g[b, n:].abs().sum() == 0


def test_m2po_gradient_on_random_batches():
    rng = random.Random(7)
    for i in range(40):
        batch, lengths = random_batch(rng, per_token_adv=i % 2 == 1)
        out = get_rule("m2po")(batch, {"tau": 0.02})
        (g,) = torch.autograd.grad(out.per_token_loss.sum(), batch.logp)
        lr = (batch.logp.detach() - batch.logp_mu).tolist()
        adv = batch.advantages_2d().tolist()
        flat = [(b, t) for b, n in enumerate(lengths) for t in range(n)]
        masked = m2po_masked_reference([lr[b][t] ** 2 for b, t in flat], 0.02)
        for (b, t), m in zip(flat, masked, strict=True):
            want = 0.0 if m else -math.exp(lr[b][t]) * adv[b][t]
            assert g[b, t].item() == pytest.approx(want, rel=1e-12, abs=1e-14)


def test_gmpo_mean_over_responses_under_its_aggregation():
    # seq-mean-token-mean of the broadcast L_i is the mean of the L_i (verl's geo_mean)
    batch, lengths = random_batch(random.Random(3), per_token_adv=False)
    out = get_rule("gmpo")(batch, {})
    agg = aggregate_loss(out.per_token_loss, batch.mask, "seq-mean-token-mean")
    per_row = [out.per_token_loss[b, 0].item() for b in range(len(lengths))]
    assert agg.item() == pytest.approx(sum(per_row) / len(per_row), rel=1e-12)


@pytest.mark.parametrize(
    ("name", "cfg", "message"),
    [
        ("icepop", {"low": 1.5}, "must contain 1"),
        ("m2po", {"scope": "tokens"}, "'scope'"),
        ("cispo", {"cap": 0.0}, "'cap'"),
        ("sapo", {"tau_neg": -1.0}, "'tau_neg'"),
        ("opsm", {"dual_clip": 0.5}, "'dual_clip'"),
        ("gspo", {"eps_low": 1.0}, "'eps_low'"),
    ],
)
def test_bad_parameters_are_refused_by_name(name, cfg, message):
    from cppo.rules import RuleConfigError

    with pytest.raises(RuleConfigError, match=message):
        get_rule(name).resolve(cfg)

"""The loss conventions of the public CPPO / DPPO / TRM code, one switch each, against
hand-computed cases: CPPO's position horizon and delta_b clamp factor, the truncated ratio cap,
TRM's sampled-token estimators (k3, |log rho|) and their thresholds, the constant-horizon
(Dr. GRPO) aggregation, and the paper config that selects them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cppo.divergence import DIVERGENCE_KINDS, abs_log_ratio, compute_divergence, full_kl, k3
from cppo.pipeline.config import load_config, load_schema
from cppo.pipeline.plan import Plan
from cppo.rules import (
    AGGREGATION_MODES,
    RuleBatch,
    RuleConfigError,
    aggregate_loss,
    cppo_gate,
    get_rule,
    resolve_config,
)
from cppo.rules.reference import cppo_reference, position_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _padded(rows: list[list[float]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of real values -> a [B, width] tensor (NaN padding) and its mask."""
    x = torch.full((len(rows), width), float("nan"), dtype=F64)
    for b, row in enumerate(rows):
        x[b, : len(row)] = torch.tensor(row, dtype=F64)
    mask = torch.arange(width).unsqueeze(0) < torch.tensor([len(r) for r in rows]).unsqueeze(-1)
    return x, mask


# ---------------------------------------------------------------------------------------------
# CPPO position horizon: response length (UniRL, the paper) vs padded width (verl PR #6731)
# ---------------------------------------------------------------------------------------------


def test_position_weights_of_a_3_token_response_padded_to_5():
    D, mask = _padded([[0.0, 0.0, 0.0]], 5)
    lr = torch.zeros_like(D)
    A = torch.ones(1, dtype=F64)
    kw = dict(delta=0.15, delta_b=0.02, w_min=0.8)
    # own length T = 3: 1, 1 - 0.2 * 1/2, 1 - 0.2 * 2/2
    response = cppo_gate(D, lr, A, mask, **kw).position_weight
    # padded T = 5: 1, 1 - 0.2 * 1/4, 1 - 0.2 * 2/4; padding weight 0
    padded = cppo_gate(D, lr, A, mask, horizon=5, **kw).position_weight
    assert response[0].tolist() == pytest.approx([1.0, 0.9, 0.8, 0.0, 0.0], abs=1e-15)
    assert padded[0].tolist() == pytest.approx([1.0, 0.95, 0.9, 0.0, 0.0], abs=1e-15)
    assert position_weights(3, 0.8, horizon=5) == pytest.approx([1.0, 0.95, 0.9])


def test_padded_horizon_changes_the_mask_decision():
    # Last token of the 3-token response: D = 0.18. Own length: w_3 = 0.8, Z = 0.144 <= 0.15,
    # kept. Padded to 5: w_3 = 0.9, Z = 0.162 > 0.15, masked by the token threshold.
    D, mask = _padded([[0.0, 0.0, 0.18]], 5)
    lr = torch.full_like(D, 0.1)
    A = torch.ones(1, dtype=F64)
    kw = dict(delta=0.15, delta_b=1e9, w_min=0.8)  # budget never binds
    assert cppo_gate(D, lr, A, mask, **kw).keep[0, :3].tolist() == [True, True, True]
    g = cppo_gate(D, lr, A, mask, horizon=5, **kw)
    assert g.keep[0, :3].tolist() == [True, True, False]
    assert g.token_violation[0, 2]


def test_rule_reads_the_padded_horizon_from_its_config():
    D, mask = _padded([[0.0, 0.0, 0.18]], 5)
    logp_mu = torch.full(D.shape, -1.0, dtype=F64)
    logp = (logp_mu + 0.1).requires_grad_(True)
    batch = RuleBatch(logp, logp_mu, torch.ones(1, dtype=F64), mask, divergence=D)
    cfg = {"delta_b": 1e9, "adaptive_delta_b": False, "position_horizon": "padded"}
    # horizon given (the trainer sets max_completion_length): T = 5
    assert get_rule("cppo")(batch, {**cfg, "horizon": 5}).keep[0, 2].item() is False
    # horizon unset: the tensor's own padded width, here also 5
    assert get_rule("cppo")(batch, cfg).keep[0, 2].item() is False
    # the response's own length (T = 3): w_3 = 0.8, Z_3 = 0.144 <= 0.15, kept
    assert get_rule("cppo")(batch, {**cfg, "position_horizon": "response"}).keep[0, 2].item()
    with pytest.raises(ValueError, match="shorter than a response"):
        get_rule("cppo")(batch, {**cfg, "horizon": 2})


def test_reference_with_padded_horizon_by_hand():
    # t2: c = min(.15, .15 + .02 * 1 - .1) = .07 against Z = w_2 * .076. Padded T = 5:
    # w_2 = .95, Z = .0722 > .07 -> masked by the budget; t3: c = .15 + .02 * 1.95 - .1722
    # = .0168 >= Z = 0 -> kept. Own length T = 3: w_2 = .9, Z = .0684 <= .07 -> kept.
    kw = dict(delta=0.15, delta_b=0.02, w_min=0.8)
    w, db, kinds = cppo_reference([0.1, 0.076, 0.0], [0.1] * 3, [1.0] * 3, horizon=5, **kw)
    assert (w, kinds, db) == ([1.0, 0.0, 1.0], ["", "prefix", ""], 0.02)
    w, _, kinds = cppo_reference([0.1, 0.076, 0.0], [0.1] * 3, [1.0] * 3, **kw)
    assert (w, kinds) == ([1.0, 1.0, 1.0], ["", "", ""])


# ---------------------------------------------------------------------------------------------
# adaptive delta_b clamp factor: 2 (UniRL, the paper) vs 5 (verl PR #6731 "tune hyperparameter")
# ---------------------------------------------------------------------------------------------


def test_clamp_factor_hand_computed():
    # P90 of nine zeros and a one = 0.1 (pos 8.1 -> 0 + 0.1 * 1); clamp to [.02, f * .02]
    D, mask = _padded([[0.0] * 9 + [1.0]], 10)
    lr, A = torch.zeros_like(D), torch.ones(1, dtype=F64)
    kw = dict(delta=0.15, delta_b=0.02, w_min=0.8, adaptive_delta_b=True)
    assert cppo_gate(D, lr, A, mask, **kw).delta_b_eff.tolist() == pytest.approx([0.04])
    five = cppo_gate(D, lr, A, mask, delta_b_max_factor=5.0, **kw).delta_b_eff
    assert five.tolist() == pytest.approx([0.1])
    four = cppo_gate(D, lr, A, mask, delta_b_max_factor=4.0, **kw).delta_b_eff
    assert four.tolist() == pytest.approx([0.08])


def test_clamp_factor_changes_the_mask_decision():
    # w_min = 1, D = [.15, .09, .12, .12, .12, 0 x5]: sorted [0 x5, .09, .12 x3, .15], P90 at
    # pos 8.1 = .12 + .1 * .03 = .123. Factor 2: delta_b = .04; factor 5: delta_b = .1.
    # t1: Z = .15 <= .15 kept; t2: c = min(.15, .15 + delta_b - .15) = delta_b against Z = .09:
    # masked with factor 2, kept with factor 5.
    row = [0.15, 0.09, 0.12, 0.12, 0.12] + [0.0] * 5
    D, mask = _padded([row], 10)
    lr, A = torch.full_like(D, 0.1), torch.ones(1, dtype=F64)
    kw = dict(delta=0.15, delta_b=0.02, w_min=1.0, adaptive_delta_b=True)
    f2 = cppo_gate(D, lr, A, mask, **kw)
    f5 = cppo_gate(D, lr, A, mask, delta_b_max_factor=5.0, **kw)
    assert f2.delta_b_eff.item() == pytest.approx(0.04)
    assert f5.delta_b_eff.item() == pytest.approx(0.1)
    wide = cppo_gate(D, lr, A, mask, delta_b_max_factor=10.0, **kw).delta_b_eff
    assert wide.item() == pytest.approx(0.123)  # the clamp no longer binds
    assert f2.keep[0, 1].item() is False and f5.keep[0, 1].item() is True
    w, db, _ = cppo_reference(
        row, [0.1] * 10, [1.0] * 10, delta=0.15, delta_b=0.02, w_min=1.0,
        adaptive_delta_b=True, max_factor=5.0,
    )  # fmt: skip
    assert torch.equal(f5.weight[0], torch.tensor(w, dtype=F64)) and db == f5.delta_b_eff.item()


# ---------------------------------------------------------------------------------------------
# truncated importance ratio (verl PR #6731: clip_ratio_c = 20; UniRL: none)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grpo", "dppo", "cppo", "trm_max", "trm_avg"])
def test_ratio_cap_gradient_equals_verls_capped_log_prob_form(name):
    # verl's CPPO loss: -A sg(min(rho, C)) log pi on kept tokens. Its gradient must equal ours.
    logp_mu = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=F64)
    lr = torch.tensor([[0.0, 1.0, -0.3, 2.5]], dtype=F64)  # rho = 1, e, e^-.3, e^2.5 ~ 12.2
    logp = (logp_mu + lr).requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    batch = RuleBatch(logp, logp_mu, torch.tensor([0.7], dtype=F64), mask, divergence=mask * 0.0)
    cap = 2.0
    cfg = {"ratio_cap": cap}
    if name == "grpo":
        cfg.update(eps_low=0.99, eps_high=100.0, dual_clip=None)  # no clipping
    out = get_rule(name)(batch, cfg)
    assert out.keep.all()
    (g,) = torch.autograd.grad(out.per_token_loss.sum(), logp)
    verl = -(0.7 * torch.clamp(torch.exp(lr), max=cap) * logp).sum()
    (g_verl,) = torch.autograd.grad(verl, logp)
    assert torch.allclose(g, g_verl, rtol=1e-14, atol=0)
    # by hand: coefficient min(rho, 2) A
    assert g[0].tolist() == pytest.approx([-0.7, -1.4, -0.7 * math.exp(-0.3), -1.4])


def test_ratio_cap_defaults_off_and_rejects_bad_values():
    for name in ("grpo", "dppo", "cppo", "trm_max", "trm_avg"):
        assert resolve_config(name)["ratio_cap"] is None
        with pytest.raises(RuleConfigError, match="ratio_cap"):
            resolve_config(name, {"ratio_cap": 0.0})


# ---------------------------------------------------------------------------------------------
# sampled-token estimators and TRM thresholds per estimator
# ---------------------------------------------------------------------------------------------


def test_k3_and_abs_log_ratio_by_hand():
    logp_mu = torch.log(torch.tensor([[0.5, 0.2, 0.1]], dtype=F64))
    logp = torch.log(torch.tensor([[0.25, 0.2, 0.3]], dtype=F64))
    rho = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    assert k3(logp, logp_mu)[0].tolist() == pytest.approx((rho - 1 - torch.log(rho)).tolist())
    assert k3(logp, logp_mu)[0, 1].item() == 0.0
    assert abs_log_ratio(logp, logp_mu)[0].tolist() == pytest.approx(
        [math.log(2), 0.0, math.log(3)]
    )
    mask = torch.tensor([[True, True, False]])
    for kind in ("k3", "abs_log_ratio"):
        d = compute_divergence(kind, logp=logp, logp_mu=logp_mu, response_mask=mask)
        assert d[0, 2].item() == 0.0  # padding
    # pi gives the sampled token no mass: |log rho| is inf (rejects), k3 large but finite
    inf = torch.tensor([[float("-inf")]], dtype=F64)
    assert abs_log_ratio(inf, torch.tensor([[-1.0]], dtype=F64)).item() == math.inf
    assert k3(inf, torch.tensor([[-1.0]], dtype=F64)).item() == pytest.approx(
        20 - 1 + math.exp(-20)
    )
    assert abs_log_ratio(inf, inf).item() == 0.0  # no mass on either side


def test_k3_is_an_unbiased_estimate_of_kl_mu_pi():
    # E_{y ~ mu}[rho(y) - 1 - log rho(y)] = KL(mu || pi) exactly, summed over the vocabulary.
    g = torch.Generator().manual_seed(0)
    mu_logits = torch.randn(1, 3, 11, generator=g, dtype=F64)
    pi_logits = mu_logits + 0.7 * torch.randn(1, 3, 11, generator=g, dtype=F64)
    lq, lp = torch.log_softmax(mu_logits, -1), torch.log_softmax(pi_logits, -1)
    expectation = (lq.exp() * k3(lp.reshape(1, -1), lq.reshape(1, -1)).reshape(lq.shape)).sum(-1)
    assert torch.allclose(expectation, full_kl(pi_logits, mu_logits), rtol=1e-12)


def test_trm_thresholds_per_estimator():
    assert resolve_config("trm_max")["delta"] == 0.05
    assert resolve_config("trm_avg")["delta_avg"] == 0.001
    assert resolve_config("trm_avg", {"divergence": "k3"})["delta_avg"] == 0.01
    assert resolve_config("trm_max", {"divergence": "abs_log_ratio"})["delta"] == pytest.approx(
        math.sqrt(5.0)
    )
    assert resolve_config("trm_max", {"divergence": "topk_tv", "delta": 0.2})["delta"] == 0.2
    with pytest.raises(RuleConfigError, match="no published threshold.*'delta'"):
        resolve_config("trm_max", {"divergence": "topk_tv"})
    with pytest.raises(RuleConfigError, match="no published threshold"):
        resolve_config("trm_max", {"divergence": "k3"})


def test_trm_k3_average_and_abs_log_ratio_max_masks_by_hand():
    # Row 0: log rho = [0.1, -0.1] -> k3 = [.00517, .00484], mean .005 <= .01 kept;
    #        |log rho| max .1 <= 2.236 kept.
    # Row 1: log rho = [0.3, 0.0, 0.0] -> k3 = [.0499, 0, 0], mean .0166 > .01 rejected;
    #        |log rho| max .3 kept.
    # Row 2: log rho = [0.0, -2.5] -> k3 = [0, e^-2.5 - 1 + 2.5 = 1.582], rejected;
    #        |log rho| max 2.5 > 2.236 rejected.
    lr, mask = _padded([[0.1, -0.1], [0.3, 0.0, 0.0], [0.0, -2.5]], 3)
    logp_mu = torch.full(lr.shape, -2.0, dtype=F64)
    logp = (logp_mu + torch.nan_to_num(lr, nan=0.0)).requires_grad_(True)
    A = torch.tensor([1.0, -1.0, 1.0], dtype=F64)
    want_k3 = [[0.1, -0.1, 0.0], [0.3, 0.0, 0.0], [0.0, -2.5, 0.0]]
    want_k3 = [[math.expm1(x) - x for x in row] for row in want_k3]
    keep = {}
    for name, kind in (("trm_avg", "k3"), ("trm_max", "abs_log_ratio")):
        d = compute_divergence(kind, logp=logp.detach(), logp_mu=logp_mu, response_mask=mask)
        if kind == "k3":
            assert torch.allclose(d, torch.tensor(want_k3, dtype=F64) * mask, atol=1e-15)
        batch = RuleBatch(logp, logp_mu, A, mask, divergence=d)
        keep[name] = get_rule(name)(batch, {"divergence": kind}).keep
    assert keep["trm_avg"].tolist() == [[True, True, False], [False] * 3, [False] * 3]
    assert keep["trm_max"].tolist() == [[True, True, False], [True] * 3, [False] * 3]


# ---------------------------------------------------------------------------------------------
# constant-horizon aggregation (seq-mean-token-sum-norm: Dr. GRPO, UniRL and verl recipes)
# ---------------------------------------------------------------------------------------------


def test_constant_horizon_aggregation_ignores_the_padded_width():
    # Two responses of 3 and 1 tokens with per-token losses; horizon H = 8 (max length).
    # (1 + 2 + 3) / 8 and 4 / 8, mean over the two responses = 10 / 16, whatever the width.
    for width in (3, 5, 8):
        loss, mask = _padded([[1.0, 2.0, 3.0], [4.0]], width)
        loss = torch.nan_to_num(loss, nan=99.0)
        got = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", horizon=8)
        assert got.item() == pytest.approx(10 / 16)
    # without a constant horizon the tensor width is used, so the value moves with padding
    loss, mask = _padded([[1.0, 2.0, 3.0], [4.0]], 5)
    assert aggregate_loss(
        torch.nan_to_num(loss, nan=0.0), mask, "seq-mean-token-sum-norm"
    ).item() == pytest.approx(10 / 10)


# ---------------------------------------------------------------------------------------------
# one list per vocabulary, and the paper config's choices
# ---------------------------------------------------------------------------------------------


def test_schema_enums_are_the_code_lists():
    defs = load_schema()["$defs"]
    assert set(defs["divergence"]["properties"]["kind"]["enum"]) == set(DIVERGENCE_KINDS)
    training = defs["training"]["properties"]
    assert tuple(training["loss_agg_mode"]["enum"]) == AGGREGATION_MODES
    from cppo.run.config import SCHEMA

    run_scale = SCHEMA["properties"]["rl"]["properties"]["scale_rewards"]["enum"]
    assert run_scale == training["scale_rewards"]["enum"]


def test_paper_config_follows_the_official_recipes():
    plan = Plan(load_config(ROOT / "config" / "paper.yaml"))
    for model in plan.matrix.models:
        horizon = plan.resolver.schedule(model)["max_completion_length"]
        for method in plan.matrix.methods:
            run = plan.resolver.run_config(model, method, 0)
            m = run["method"]
            assert m["loss_agg_mode"] == "seq-mean-token-sum-norm", (model, method)
            assert m["horizon"] == horizon
            assert run["rl"]["scale_rewards"] == "none"
            assert run["cast_lm_head_to_fp32"] is True
            assert run["anchor"] == "rollout"
            resolved = resolve_config(m["rule"], {k: v for k, v in m.items() if k != "rule"})
            if m["rule"] == "cppo":
                assert resolved["position_horizon"] == "response"
                assert resolved["delta_b_max_factor"] == 2.0
            if "ratio_cap" in resolved:
                assert resolved["ratio_cap"] is None
    assert {m: plan.resolver.schedule(m)["max_completion_length"] for m in plan.matrix.models} == {
        "Qwen3-1.7B": 8192,
        "Qwen3-1.7B-Base": 8192,
        "Qwen3-8B-Base": 8192,
        "Qwen3-30B-A3B-Base": 16384,
    }


def test_toy_defaults_stay_token_mean_with_group_std_unless_set():
    cfg = load_config(ROOT / "config" / "ci.yaml")
    plan = Plan(cfg)
    model, method = plan.matrix.models[0], plan.matrix.methods[0]
    run = plan.resolver.run_config(model, method, 0)
    assert run["method"]["loss_agg_mode"] == "token-mean"
    assert run["rl"]["scale_rewards"] == "group"
    cfg["training"]["scale_rewards"] = "none"
    cfg["models"][model].setdefault("training", {})["loss_agg_mode"] = "seq-mean-token-sum-norm"
    run = Plan(cfg).resolver.run_config(model, method, 0)
    assert run["rl"]["scale_rewards"] == "none"
    assert run["method"]["loss_agg_mode"] == "seq-mean-token-sum-norm"


def test_ratio_cap_share_is_reported():
    # rho = 1, e, e^-.3, e^2.5: with C = 2, two of the four terms (e and e^2.5) are capped
    logp_mu = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=F64)
    lr = torch.tensor([[0.0, 1.0, -0.3, 2.5]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    batch = RuleBatch(logp_mu + lr, logp_mu, torch.tensor([0.7], dtype=F64), mask, mask * 0.0)
    assert get_rule("trm_max")(batch, {"ratio_cap": 2.0}).metrics["ratio/capped_fraction"] == 0.5
    assert "ratio/capped_fraction" not in get_rule("dppo")(batch, {}).metrics

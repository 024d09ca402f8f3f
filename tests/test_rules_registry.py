"""Registry, config validation, RuleBatch checks and loss aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from cppo.rules import (
    AGGREGATION_MODES,
    RuleBatch,
    RuleConfigError,
    UnknownRuleError,
    aggregate_loss,
    available_rules,
    get_rule,
    register_rule,
    resolve_config,
)

PAPER_RULES = {"grpo", "cispo", "dppo", "cppo", "trm_max", "trm_avg", "minpro"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_batch(seed: int, dtype=torch.float32) -> RuleBatch:
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 33
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(-1)
    logp_mu = (-torch.rand(B, T, generator=g) * 5).to(dtype)
    logp = (logp_mu + torch.randn(B, T, generator=g).to(dtype) * 0.3).requires_grad_(True)
    D = (torch.rand(B, T, generator=g) * 0.3).to(dtype)
    A = torch.randn(B, generator=g).to(dtype)
    return RuleBatch(logp, logp_mu, A, mask, divergence=D, seed=seed)


def test_all_paper_rules_are_registered():
    assert set(available_rules()) >= PAPER_RULES


@pytest.mark.parametrize("name", sorted(PAPER_RULES))
@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_every_rule_runs_and_returns_finite_values(name, mode):
    for seed in range(3):
        batch = random_batch(seed)
        out = get_rule(name)(batch, {"loss_agg_mode": mode})
        assert out.per_token_loss.shape == batch.logp.shape
        assert out.keep.dtype == torch.bool and out.weight.shape == batch.logp.shape
        assert bool((out.per_token_loss[~batch.mask] == 0).all())
        assert not bool(out.keep[~batch.mask].any())
        assert torch.isfinite(out.per_token_loss).all() and torch.isfinite(out.weight).all()
        loss = aggregate_loss(out.per_token_loss, batch.mask, mode, horizon=64)
        assert loss.dim() == 0 and torch.isfinite(loss)
        (g,) = torch.autograd.grad(loss, batch.logp)
        assert torch.isfinite(g).all() and bool((g[~batch.mask] == 0).all())
        assert out.metrics and all(
            isinstance(v, torch.Tensor) and v.dim() == 0 and math.isfinite(v)
            for v in out.metrics.values()
        )
        assert "ratio/abs_dev_mean" in out.metrics and "mask/fraction" in out.metrics


def test_unknown_rule_lists_valid_names():
    with pytest.raises(UnknownRuleError) as e:
        get_rule("cpp")
    msg = str(e.value)
    assert "'cpp'" in msg and "did you mean 'cppo'" in msg
    for name in PAPER_RULES:
        assert name in msg


def test_config_errors_name_the_key():
    rule = get_rule("cppo")
    with pytest.raises(RuleConfigError, match=r"unknown config key 'delt'.*did you mean 'delta'"):
        rule.resolve({"delt": 0.1})
    with pytest.raises(RuleConfigError, match="'w_min'"):
        rule.resolve({"w_min": 0.0})
    with pytest.raises(RuleConfigError, match="'adaptive_delta_b'"):
        rule.resolve({"adaptive_delta_b": "yes"})
    with pytest.raises(RuleConfigError, match="'gate'"):
        rule.resolve({"gate": "smooth"})
    with pytest.raises(RuleConfigError, match="'divergence'"):
        rule.resolve({"divergence": "full_tv"})
    with pytest.raises(RuleConfigError, match="'rule'"):
        rule.resolve({"rule": "dppo"})
    with pytest.raises(RuleConfigError, match="'delta'"):
        get_rule("dppo").resolve({"delta": True})  # bools are not numbers
    with pytest.raises(RuleConfigError, match="'dual_clip'"):
        get_rule("grpo").resolve({"dual_clip": 0.5})
    with pytest.raises(RuleConfigError, match="'cap_low'"):
        get_rule("cispo").resolve({"cap": 2.0, "cap_low": 3.0})
    with pytest.raises(RuleConfigError, match="'loss_agg_mode'"):
        resolve_config("grpo", {"loss_agg_mode": "sum"})
    # a wrong config fails before any computation
    with pytest.raises(RuleConfigError):
        get_rule("grpo")(random_batch(0), {"eps": 0.2})


def test_resolve_fills_defaults_and_accepts_rule_key():
    cfg = resolve_config("grpo", {"rule": "grpo", "eps_high": 0.3, "horizon": 8192})
    assert cfg["eps_low"] == 0.2 and cfg["eps_high"] == 0.3 and cfg["dual_clip"] == 3.0
    assert cfg["horizon"] == 8192 and "rule" not in cfg
    assert isinstance(resolve_config("dppo", {"delta": 1})["delta"], float)


def test_a_bound_rule_declares_what_to_compute():
    cppo = get_rule("cppo").bind()
    assert cppo.divergence == {"kind": "topk_tv", "topk": 20, "sampled_token": "extra"}
    assert cppo.needs_topk and not cppo.draws_random
    assert get_rule("cppo").bind({"shuffle_weights": True}).draws_random
    dppo = get_rule("dppo").bind({"divergence": "binary_tv"})
    assert dppo.divergence["kind"] == "binary_tv" and not dppo.needs_topk
    assert get_rule("trm_avg").bind({"divergence": "k3"}).divergence["kind"] == "k3"
    for name in ("grpo", "cispo", "minpro"):
        rule = get_rule(name).bind()
        assert rule.divergence is None and not rule.needs_topk


def test_bind_resolves_once_and_the_bound_rule_equals_the_rule():
    batch = random_batch(3)
    bound = get_rule("grpo").bind({"eps_high": 0.3})
    assert bound.cfg["eps_high"] == 0.3 and bound.cfg["eps_low"] == 0.2
    with pytest.raises(TypeError):
        bound.cfg["eps_high"] = 0.5  # read-only: one resolution serves every batch
    a, b = bound(batch), get_rule("grpo")(batch, {"eps_high": 0.3})
    assert torch.equal(a.per_token_loss, b.per_token_loss) and torch.equal(a.keep, b.keep)
    with pytest.raises(RuleConfigError, match="'eps_hihg'"):
        get_rule("grpo").bind({"eps_hihg": 0.3})


def test_each_rule_declares_its_binding_metric_and_reports_it():
    for name in available_rules():
        rule = get_rule(name).bind()
        if rule.binding is None:
            assert name == "none"
            continue
        assert rule.binding in rule.metric_keys(), name


def test_missing_divergence_is_a_clear_error():
    b = random_batch(0)
    b = RuleBatch(b.logp, b.logp_mu, b.advantages, b.mask)
    for name in ("dppo", "cppo", "trm_max"):
        with pytest.raises(ValueError, match="needs batch.divergence"):
            get_rule(name)(b, {})


def test_rule_batch_validates_shapes():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="logp_mu"):
        RuleBatch(x, torch.zeros(2, 4), torch.zeros(2), m)
    with pytest.raises(ValueError, match="advantages"):
        RuleBatch(x, x, torch.zeros(3), m)
    with pytest.raises(ValueError, match="divergence"):
        RuleBatch(x, x, torch.zeros(2), m, divergence=torch.zeros(3, 2))
    b = RuleBatch(x, x, torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.int64))
    assert b.response_mask.dtype == torch.bool


def test_register_rule_and_duplicate_names():
    @register_rule("test_only_identity")
    def _identity(batch, cfg):
        raise NotImplementedError

    assert "test_only_identity" in available_rules()
    assert get_rule("test_only_identity").defaults()["loss_agg_mode"] == "token-mean"
    with pytest.raises(ValueError, match="already registered"):
        register_rule("test_only_identity")(lambda b, c: None)
    from cppo.rules import registry

    del registry._REGISTRY["test_only_identity"]


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


def test_aggregation_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [9.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(
        (6 / 4 + 4 / 4) / 2
    )
    assert aggregate_loss(
        loss, mask, "seq-mean-token-sum-norm", horizon=10
    ).item() == pytest.approx((0.6 + 0.4) / 2)
    assert aggregate_loss(loss, mask, "token-mean", normalizer=8).item() == pytest.approx(10 / 8)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum", normalizer=5).item() == pytest.approx(
        2.0
    )
    with pytest.raises(ValueError, match="token-mean"):
        aggregate_loss(loss, mask, "mean")


def test_aggregation_ignores_nan_padding_and_empty_batches():
    loss = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[True, False]])
    for mode in AGGREGATION_MODES:
        out = aggregate_loss(loss, mask, mode)
        assert torch.isfinite(out)
        (g,) = torch.autograd.grad(out, loss)
        assert g[0, 1] == 0
    empty = torch.zeros(2, 3, requires_grad=True)
    for mode in AGGREGATION_MODES:
        assert aggregate_loss(empty, torch.zeros(2, 3, dtype=torch.bool), mode).item() == 0.0


def test_metric_keys_lists_what_each_rule_reports():
    from conftest import RULE_EXTRA_KEYS

    from cppo.run.metrics import TRAIN_KEYS

    for name, extra in RULE_EXTRA_KEYS.items():
        assert set(get_rule(name).bind().metric_keys()) - set(TRAIN_KEYS) == extra, name
    assert "ratio/capped_fraction" in get_rule("cppo").bind({"ratio_cap": 2.0}).metric_keys()

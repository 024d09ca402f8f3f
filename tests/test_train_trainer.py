"""CPPOTrainer on a tiny Qwen3: every rule trains, mu is recorded exactly, masks cut gradients."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import RULE_EXTRA_KEYS, metrics_records
from transformers import AutoTokenizer

from cppo.rules import available_rules
from cppo.run.config import validate_run_config
from cppo.run.metrics import TRAIN_KEYS
from cppo.training.config import grpo_config_from_run
from cppo.training.data import build_train_dataset
from cppo.training.trainer import CPPOTrainer
from evaluation.testing import make_tiny_model, write_train_jsonl

torch.set_num_threads(1)
N = 4  # samples per prompt


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = root / "model"
    make_tiny_model(model, hidden_size=32, num_hidden_layers=2)
    data = write_train_jsonl(root / "train.jsonl", 32)
    return model, data


def parity_reward(prompts, completions, completion_ids, **kwargs):
    """+1 when the first completion token id is even: ~half right, groups with variance."""
    return [1.0 if ids[0] % 2 == 0 else -1.0 for ids in completion_ids]


def constant_reward(prompts, completions, completion_ids, **kwargs):
    return [-1.0] * len(completions)


def run_cfg(assets, out, method, **over):
    model, data = assets
    sched = {
        "prompts_per_iter": 4,
        "n": N,
        "minibatch": 2,
        "updates_per_iter": 2,
        "iterations": 2,
        "max_completion_length": 10,
        "micro_batch": 4,
        "learning_rate": 2e-2,
    }
    sched.update(over.pop("schedule", {}))
    raw = {
        "output_dir": str(out),
        "model": str(model),
        "train_data": str(data),
        "method": method,
        "schedule": sched,
        "optim": {"weight_decay": 0.0},
        "diagnostics": {"deviation_bins": 4},
    }
    raw.update(over)
    return validate_run_config(raw)


def make_trainer(assets, out, method, reward=parity_reward, cls=CPPOTrainer, **over):
    cfg = run_cfg(assets, out, method, **over)
    args, _ = grpo_config_from_run(cfg)
    tok = AutoTokenizer.from_pretrained(cfg["model"], padding_side="left")
    ds, _ = build_train_dataset(cfg["train_data"], tok, max_prompt_length=64)
    return cls(
        model=cfg["model"],
        args=args,
        train_dataset=ds,
        processing_class=tok,
        reward_funcs=[reward],
        progress=False,
    )


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


@pytest.mark.parametrize("rule", available_rules())
def test_every_rule_trains(assets, tmp_path, rule):
    trainer = make_trainer(assets, tmp_path, {"rule": rule})
    before = params(trainer)
    trainer.train()
    after = params(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    records = metrics_records(trainer.args.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for rec in records:
        keys = set(rec) - {"kind", "step"}
        assert set(TRAIN_KEYS) <= keys
        # beyond the contract: the deviation bins and every diagnostic the rule reports
        assert (
            keys - set(TRAIN_KEYS)
            == {f"deviation/bin{i}/{s}" for i in range(4) for s in ("mean", "top10")}
            | RULE_EXTRA_KEYS[rule]
        )
        assert rec["kind"] == "train"
        assert rec["grad_norm"] is not None and math.isfinite(rec["grad_norm"])
        assert -1.0 <= rec["reward/mean"] <= 1.0 and 0.0 <= rec["accuracy"] <= 1.0
        assert rec["logprob/rel_error"] is None  # no rollout engine besides the trainer
    # the first update of each iteration is on-policy: rho == 1 and D == 0 up to rounding (mu
    # from the sampling loop's logits, pi from the shared-prompt forward: same function,
    # another arithmetic order; exactly 0 in test_on_policy_step_is_exact_in_one_layout)
    for rec in (records[0], records[2]):
        assert rec["ratio/abs_dev_mean"] < 1e-6 and rec["divergence/mean"] < 1e-6
    if rule == "cppo":
        assert records[1]["cppo/delta_b_eff"] is not None
        assert records[1]["mask/token_fraction"] is not None
    if rule in ("trm_max", "trm_avg"):
        assert all(0.0 <= r["trm/reject_fraction"] <= 1.0 for r in records)
        assert records[0]["trm/reject_fraction"] == 0.0  # on-policy: every KL is 0


SAME_LAYOUT = {"sampler": "generate", "loss_layout": "padded"}


@pytest.mark.parametrize("rule", ["cppo", "trm_max"])
def test_on_policy_step_is_exact_in_one_layout(assets, tmp_path, rule):
    # generate + a recording forward in the loss forward's own padded layout: bit-equal mu and pi
    trainer = make_trainer(assets, tmp_path, {"rule": rule}, transformers=SAME_LAYOUT)
    trainer.train()
    records = metrics_records(trainer.args.metrics_path)
    for rec in (records[0], records[2]):
        assert rec["ratio/abs_dev_mean"] == 0.0 and rec["divergence/mean"] == 0.0
    assert records[1]["ratio/abs_dev_mean"] > 0.0


def test_all_masked_leaves_parameters_unchanged(assets, tmp_path):
    trainer = make_trainer(assets, tmp_path, {"rule": "cppo"}, reward=constant_reward)
    before = params(trainer)
    trainer.train()
    after = params(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    records = metrics_records(trainer.args.metrics_path)
    assert all(r["groups/zero_std_fraction"] == 1.0 and r["grad_norm"] == 0.0 for r in records)


class MuProbe(CPPOTrainer):
    """Checks mu right after each generation against the generating model's full log_softmax."""

    checked = 0

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        attn = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        c = out["completion_ids"].size(1)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=attn).logits.float()
        full = torch.log_softmax(logits[:, -c - 1 : -1] / self.temperature, dim=-1)
        valid = out["completion_mask"].bool()
        sampled = full.gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(out["mu_logps"][valid], sampled[valid], rtol=1e-5, atol=1e-5)
        k = out["mu_topk_ids"].shape[-1]
        ref = torch.topk(full, k, dim=-1)
        assert torch.equal(out["mu_topk_ids"].long()[valid], ref.indices[valid])
        torch.testing.assert_close(
            out["mu_topk_logps"][valid], ref.values[valid], rtol=1e-5, atol=1e-5
        )
        type(self).checked += 1
        return out


def test_mu_is_the_generating_models_log_softmax(assets, tmp_path):
    trainer = make_trainer(assets, tmp_path, {"rule": "cppo", "topk": 5}, cls=MuProbe)
    trainer.train()
    assert MuProbe.checked == 2  # one rollout batch per iteration


class _RuleRecorder:
    """The trainer's bound rule, keeping every output."""

    def __init__(self, rule):
        self.rule = rule
        self.cfg = rule.cfg
        self.calls = []

    def __call__(self, batch):
        out = self.rule(batch)
        self.calls.append(out)
        return out


class GradProbe(CPPOTrainer):
    """Keeps pi's log-probs (with .grad after backward), the micro-batch and the rule output."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.logps, self.batches = [], []
        self._rule = _RuleRecorder(self._rule)

    def _policy_logps(self, model, inputs):
        logps, ent, aux, pi_topk = super()._policy_logps(model, inputs)
        logps.retain_grad()
        self.logps.append(logps)
        return logps, ent, aux, pi_topk

    def _compute_loss(self, model, inputs):
        self.batches.append(inputs)
        return super()._compute_loss(model, inputs)


MASKING = [
    {"rule": "dppo", "delta": 0.01},
    {"rule": "cppo", "delta": 0.02, "delta_b": 0.004, "adaptive_delta_b": False},
    {"rule": "cppo", "delta": 0.02, "delta_b": 0.004, "gate": "soft"},
    {"rule": "grpo", "eps_low": 0.02, "eps_high": 0.02},
    {"rule": "trm_max", "delta": 0.002},
    {"rule": "cispo"},
    {"rule": "minpro"},
]


@pytest.mark.parametrize("method", MASKING, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_masked_terms_get_exactly_zero_gradient(assets, tmp_path, method):
    trainer = make_trainer(
        assets, tmp_path, method, cls=GradProbe, schedule={"learning_rate": 5e-2}
    )
    trainer.train()
    assert len(trainer.logps) == len(trainer.batches) == len(trainer._rule.calls) == 8
    n_masked = 0
    for logps, inputs, out in zip(trainer.logps, trainer.batches, trainer._rule.calls, strict=True):
        eligible = trainer._eligible(inputs)
        rows = eligible.any(dim=1).nonzero().squeeze(1)
        keep = torch.zeros_like(eligible)
        keep[rows] = out.keep
        grad = logps.grad
        assert torch.all(grad[~keep] == 0), "a masked, padded or zero-variance term got gradient"
        assert torch.all(grad[keep] != 0), "a kept term got no gradient"
        assert not torch.any(keep & ~eligible)
        n_masked += int((eligible & ~keep).sum())
    if method["rule"] not in ("cispo", "minpro") and method.get("gate") != "soft":
        assert n_masked > 0, "the settings should have masked some terms"


def _loss_on(trainer, batch):
    trainer._attach_normalisers([batch])
    trainer.model.train()
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, batch))


def _take(batch, rows):
    return {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}


def two_groups_reward(prompts, completions, completion_ids, **kwargs):
    # group 0 mixed, group 1 all wrong (zero variance)
    return [(1.0 if i % 2 == 0 else -1.0) if i < N else -1.0 for i in range(len(completions))]


@pytest.mark.parametrize("mask_std_0", [True, False])
def test_zero_variance_groups_leave_the_loss_unchanged(assets, tmp_path, mask_std_0):
    trainer = make_trainer(
        assets,
        tmp_path,
        {"rule": "cppo"},
        reward=two_groups_reward,
        schedule={"prompts_per_iter": 2, "minibatch": 2, "updates_per_iter": 1, "micro_batch": 8},
        rl={"mask_std_0": mask_std_0},
    )
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in (0, 1) for _ in range(N)]
    batch = trainer._generate_and_score_completions(rows)
    assert batch["group_keep"].tolist() == [True] * N + [False] * N
    # perturb the policy so the ratios are not all 1
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full = _loss_on(trainer, batch)
    only_mixed = _loss_on(trainer, _take(batch, slice(0, N)))
    if mask_std_0:
        assert full == pytest.approx(only_mixed, rel=1e-5, abs=1e-7)
    else:
        # kept in the normaliser, the zero-advantage rows dilute the loss
        assert full != pytest.approx(only_mixed, rel=1e-3)


def test_rows_outside_the_loss_run_without_a_graph_and_change_nothing(assets, tmp_path):
    """The shared-prompt layout runs zero-variance groups (outside the loss by mask_std_0)
    without a graph. Loss, gradients and the diagnostics' inputs equal those of the padded
    layout's single HF forward over the whole batch, with a graph for every row."""
    import cppo.training.trainer as trainer_module

    sched = {"prompts_per_iter": 2, "minibatch": 2, "updates_per_iter": 1, "micro_batch": 8}
    out = {}
    for layout in ("shared_prompt", "padded"):
        torch.manual_seed(0)
        trainer = make_trainer(
            assets,
            tmp_path / layout,
            {"rule": "cppo"},
            reward=two_groups_reward,
            schedule=sched,
            transformers={"sampler": "generate", "loss_layout": layout},
        )
        trainer.model.train()
        rows = [trainer.train_dataset[i] for i in (0, 1) for _ in range(N)]
        if layout == "shared_prompt":
            torch.manual_seed(1)
            batch = trainer._generate_and_score_completions(rows)
            assert batch["group_keep"].tolist() == [True] * N + [False] * N
            torch.manual_seed(2)
            noise = [0.01 * torch.randn_like(p) for p in trainer.model.parameters()]
        with torch.no_grad():  # the same perturbed policy in both, so ratios are not all 1
            for p, d in zip(trainer.model.parameters(), noise, strict=True):
                p.add_(d)
        trainer._attach_normalisers([batch])
        graphs = []
        original = trainer_module.shared_prompt_forward

        def spy(*a, graphs=graphs, original=original, **kw):
            graphs.append(torch.is_grad_enabled())
            return original(*a, **kw)

        trainer_module.shared_prompt_forward = spy
        try:
            logps, entropies, _, _ = trainer._policy_logps(trainer.model, batch)
            loss = trainer._compute_loss(trainer.model, batch)
        finally:
            trainer_module.shared_prompt_forward = original
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters()]
        out[layout] = (float(loss.detach()), grads, logps.detach(), entropies, graphs)
    shared, padded = out["shared_prompt"], out["padded"]
    assert shared[4] == [True, False] * 2, "want one forward with a graph, one without, per call"
    assert padded[4] == []
    assert shared[0] == pytest.approx(padded[0], rel=1e-5, abs=1e-7)
    for a, b in zip(shared[1], padded[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(shared[2][mask], padded[2][mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[3][mask], padded[3][mask], rtol=0, atol=1e-5)


def test_gradient_accumulation_does_not_change_the_step(assets, tmp_path):
    records = []
    for micro in (8, 4, 2):
        trainer = make_trainer(
            assets,
            tmp_path / str(micro),
            {"rule": "cppo"},
            schedule={"micro_batch": micro, "iterations": 1},
        )
        trainer.train()
        records.append(metrics_records(trainer.args.metrics_path))
    for other in records[1:]:
        for a, b in zip(records[0], other, strict=True):
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["mask/fraction"] == pytest.approx(b["mask/fraction"], abs=1e-9)


def test_anchor_switch_is_identical_with_transformers_generation(assets, tmp_path):
    def strip(recs):
        return [
            {k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in recs
        ]

    out = []
    for anchor in ("rollout", "recomputed"):
        trainer = make_trainer(
            assets, tmp_path / anchor, {"rule": "dppo"}, anchor=anchor, transformers=SAME_LAYOUT
        )
        trainer.train()
        out.append(strip(metrics_records(trainer.args.metrics_path)))
    assert out[0] == out[1]


def test_a_new_rules_diagnostics_reach_metrics_jsonl(assets, tmp_path):
    """A rule registered outside the package: its own metric names appear in every train record
    with no trainer edit, reduced per optimizer step (token-weighted mean over micro-steps)."""
    from cppo.rules import registry
    from cppo.rules.base import RuleOutput

    @registry.register_rule("probe_rule")
    def probe_rule(batch, cfg):
        ratio = torch.exp(batch.log_ratio())
        adv = batch.advantages_2d()
        loss = torch.where(batch.mask, -(ratio * adv), torch.zeros_like(ratio))
        metrics = {
            "probe/one": torch.tensor(1.0),
            # the share of rows with a real token: 1.0 on every micro-step that runs the rule
            "probe/rows_with_tokens": batch.mask.any(-1).double().mean(),
        }
        return RuleOutput(loss, batch.mask, batch.mask.to(loss.dtype), metrics)

    try:
        trainer = make_trainer(assets, tmp_path, {"rule": "probe_rule"})
        trainer.train()
    finally:
        registry._REGISTRY.pop("probe_rule")
    records = metrics_records(trainer.args.metrics_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for rec in records:
        assert rec["probe/one"] == 1.0 and rec["probe/rows_with_tokens"] == 1.0


def test_single_process_engines_started_together_get_different_ports(monkeypatch):
    """Two trainings with a colocated engine that start at once (Snakemake runs them side by
    side) each pick the engine's rendezvous port before either binds it. TRL's search hands
    both 29500 when it is free; the trainer's engine takes a port the kernel assigns."""
    from trl.trainer.utils import ensure_master_addr_port

    from cppo.training.engine import engine_rendezvous

    def port(fn) -> str:
        monkeypatch.delenv("MASTER_PORT", raising=False)
        fn()
        return os.environ["MASTER_PORT"]

    trl_ports = {port(ensure_master_addr_port) for _ in range(2)}
    ours = [port(lambda: engine_rendezvous(1)) for _ in range(2)]
    if trl_ports == {"29500"}:  # the collision (29500 free on this machine)
        assert "29500" not in ours
    assert ours[0] != ours[1]
    # a launcher's port (several processes) is kept as it is
    monkeypatch.setenv("MASTER_PORT", "31234")
    engine_rendezvous(4)
    assert os.environ["MASTER_PORT"] == "31234"

"""The verl backend on CPU without verl: the loss adapter against the project's trainer loss
(per-token loss, gradients, a simulated data-parallel size of 2), the Top-K route's maths against
cppo.divergence (chunked gather, padding, prefill gap), the reward, the metrics converter, the
Hydra overrides of config/paper.yaml's 30B-A3B column, the train command's dry run and refusals,
and the Ray-on-SLURM launch script with fake SLURM and Ray commands."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from cppo.backends.verl.loss import rule_loss, verl_agg_loss, write_method_file
from cppo.backends.verl.metrics import convert, read_verl_log
from cppo.backends.verl.overrides import VerlSetupError, hydra_overrides
from cppo.backends.verl.reward import compute_score
from cppo.backends.verl.topk import (
    chunk_rows,
    log_probs_at,
    prefill_gap,
    teacher_topk,
    topk_divergence,
)
from cppo.divergence import compute_divergence, full_tv
from cppo.pipeline.config import load_config
from cppo.pipeline.plan import Plan
from cppo.rules import RuleBatch, aggregate_loss, get_rule

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def padded_batch(seed: int, B: int = 6, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 0  # a response without tokens
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(-1)
    lq = -torch.rand(B, T, generator=g, dtype=F64) * 3
    lp = lq + torch.randn(B, T, generator=g, dtype=F64) * 0.2
    adv = torch.randn(B, generator=g, dtype=F64).unsqueeze(-1).expand(B, T).clone()
    return lp, lq, adv, mask


METHODS = [
    {"rule": "grpo"},
    {"rule": "cispo", "cap": 1.1},
    {"rule": "dppo", "delta": 0.05, "divergence": "binary_tv"},
    {"rule": "cppo", "delta": 0.05, "delta_b": 0.01, "divergence": "binary_tv"},
    {"rule": "trm_avg", "delta_avg": 0.01, "divergence": "k3"},
    {"rule": "gspo"},
    {"rule": "m2po", "tau": 0.01},
]
MODES = ["token-mean", "seq-mean-token-sum-norm", "seq-mean-token-mean"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["rule"])
def test_adapter_equals_the_trainer_loss_with_two_data_parallel_ranks(method, mode):
    method = {**method, "loss_agg_mode": mode, "horizon": 12}
    lp, lq, adv, mask = padded_batch(sum(map(ord, method["rule"] + mode)))
    halves = [slice(0, 3), slice(3, 6)]
    n_tokens, n_seqs = int(mask.sum()), mask.shape[0]
    cfg = {k: v for k, v in method.items() if k != "rule"}
    rule = get_rule(method["rule"])
    bound = rule.bind(cfg)
    spec = bound.divergence
    total_grad = torch.zeros_like(lp)
    for rows in halves:
        # verl: one rank's micro-batch, normalised by the global counts through global_batch_info
        x = lp[rows].clone().requires_grad_(True)
        per_token = []

        def spy(loss_mat, *args, _sink=per_token, **kwargs):
            _sink.append(loss_mat)
            return verl_agg_loss(loss_mat, *args, **kwargs)

        info = {"dp_size": 2, "batch_num_tokens": n_tokens, "global_batch_size": n_seqs}
        loss, metrics = rule_loss(
            bound,
            old_log_prob=lq[rows],
            log_prob=x,
            advantages=adv[rows],
            response_mask=mask[rows],
            global_batch_info=info,
            aggregate=spy,
        )
        (g,) = torch.autograd.grad(loss, x)
        # the project's trainer: the same rule, aggregate_loss with normalizer = global / processes
        y = lp[rows].clone().requires_grad_(True)
        div = None
        if spec is not None:
            div = compute_divergence(
                spec["kind"], logp=y.detach(), logp_mu=lq[rows], response_mask=mask[rows]
            )
        out = rule(RuleBatch(y, lq[rows], adv[rows], mask[rows], divergence=div), cfg)
        norm = n_tokens if mode == "token-mean" else n_seqs
        ref = aggregate_loss(out.per_token_loss, mask[rows], mode, 12, normalizer=norm / 2)
        (g_ref,) = torch.autograd.grad(ref, y)
        torch.testing.assert_close(per_token[0], out.per_token_loss, rtol=0, atol=0)
        torch.testing.assert_close(loss, ref, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-12)
        no_divergence = {"divergence/mean"} if spec is None else set()
        assert set(metrics) == set(bound.metric_keys()) - no_divergence
        total_grad[rows] = g
    # DDP averages the ranks' gradients: together they are the whole batch's single-process loss
    z = lp.clone().requires_grad_(True)
    info = {"dp_size": 1, "batch_num_tokens": n_tokens, "global_batch_size": n_seqs}
    whole, _ = rule_loss(
        bound,
        old_log_prob=lq,
        log_prob=z,
        advantages=adv,
        response_mask=mask,
        global_batch_info=info,
    )
    (g_whole,) = torch.autograd.grad(whole, z)
    if method["rule"] != "m2po":  # M2PO's mask is a statistic of the batch it sees
        torch.testing.assert_close(total_grad / 2, g_whole, rtol=1e-7, atol=1e-12)


def test_verl_aggregation_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    L = torch.tensor([[1.0, 2, 3, 9], [4, 5, 9, 9], [1, 1, 1, 1]], dtype=F64)
    assert verl_agg_loss(L, mask, "token-mean").item() == pytest.approx(19 / 9)
    assert verl_agg_loss(L, mask, "seq-mean-token-sum-norm").item() == pytest.approx(19 / 3 / 4)
    assert verl_agg_loss(L, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4.5 + 1) / 3)
    assert verl_agg_loss(
        L, mask, "token-mean", dp_size=2, batch_num_tokens=18
    ).item() == pytest.approx(19 / 18 * 2)
    with pytest.raises(ValueError, match="global batch_num_tokens"):
        verl_agg_loss(L, mask, "token-mean", dp_size=2)


def test_a_topk_rule_without_its_divergence_stops_with_the_reason():
    lp, lq, adv, mask = padded_batch(0)
    with pytest.raises(ValueError, match="no Top-K D reached the loss"):
        rule_loss(
            get_rule("cppo").bind(), old_log_prob=lq, log_prob=lp, advantages=adv,
            response_mask=mask,
        )  # fmt: skip


def test_the_policy_loss_reads_the_divergence_passed_around_the_call(tmp_path):
    """verl's ppo_loss calls the registered loss with a fixed signature; the Top-K loss hands
    D over around that call, and the rule reads exactly it."""
    from cppo.backends.verl.loss import current_divergence, passing_divergence, policy_loss

    lp, lq, adv, mask = padded_batch(4)
    method = {"rule": "dppo", "delta": 0.05, "divergence": "topk_tv", "topk": 3}
    path = write_method_file({"imports": [], "seed": 0, "method": method}, tmp_path / "m.json")

    class Config:  # the fields of verl's ActorConfig the loss reads
        policy_loss = {"method_file": str(path)}
        global_batch_info: dict = {}

    D = torch.rand(lp.shape, generator=torch.Generator().manual_seed(2), dtype=F64) * 0.1
    assert current_divergence() is None
    with passing_divergence(D):
        got, _ = policy_loss(lq, lp, adv, mask, "token-mean", Config())
    assert current_divergence() is None
    rule = get_rule("dppo").bind({k: v for k, v in method.items() if k != "rule"})
    want, _ = rule_loss(rule, old_log_prob=lq, log_prob=lp, advantages=adv, response_mask=mask,
                        divergence=D)  # fmt: skip
    assert got.item() == want.item()
    other, _ = rule_loss(rule, old_log_prob=lq, log_prob=lp, advantages=adv, response_mask=mask,
                         divergence=D * 10)  # fmt: skip
    assert other.item() != want.item()  # D decides which terms the rule keeps


def test_a_rule_that_draws_random_numbers_gets_a_seed_per_batch(tmp_path):
    # verl gives the loss no step: CPPO's shuffled weights get a seed from the run's seed and
    # the batch's contents, the same for the same batch (a resume), another for another batch
    from types import SimpleNamespace

    from cppo.backends.verl.loss import batch_seed, load_method, policy_loss, write_method_file

    # only the token condition w_t D_t <= delta, with w_t in [0.5, 1]: D_t in (0.02, 0.04]
    # (about a quarter of these tokens) is kept or masked depending on the shuffled w_t
    method = {"rule": "cppo", "divergence": "binary_tv", "shuffle_weights": True,
              "delta": 0.02, "w_min": 0.5, "prefix_budget": False}  # fmt: skip
    path = write_method_file({"imports": [], "seed": 3, "method": method}, tmp_path / "m.json")
    assert load_method(str(path)).rule.draws_random
    config = SimpleNamespace(policy_loss={"method_file": str(path)}, global_batch_info={})
    lp, lq, adv, mask = padded_batch(5, B=4, T=30)
    seeds = {batch_seed(3, lq, adv, mask), batch_seed(3, lq, adv, mask)}
    assert len(seeds) == 1
    assert (
        batch_seed(3, lq + 1e-3, adv, mask) not in seeds
        and batch_seed(4, lq, adv, mask) not in seeds
    )

    def keep(seed_batch):
        captured = {}

        def spy(loss_mat, *args, **kwargs):
            captured["loss"] = loss_mat.detach()
            return verl_agg_loss(loss_mat, *args, **kwargs)

        policy_loss(lq, seed_batch, adv, mask, "token-mean", config, aggregate=spy)
        return captured["loss"] != 0

    a, b = keep(lp), keep(lp)
    assert torch.equal(a, b)  # deterministic
    bound = get_rule("cppo").bind({k: v for k, v in method.items() if k != "rule"})
    seed = batch_seed(3, lq, adv, mask)
    div = compute_divergence("binary_tv", logp=lp, logp_mu=lq, response_mask=mask)
    want = bound(RuleBatch(lp, lq, adv, mask, divergence=div, seed=seed)).per_token_loss != 0
    assert torch.equal(a, want)
    other = bound(RuleBatch(lp, lq, adv, mask, divergence=div, seed=seed + 1)).per_token_loss != 0
    assert not torch.equal(a, other)  # the seed matters for this batch, so the test can fail


# --- the Top-K route ---------------------------------------------------------------------------


def test_log_probs_at_equals_a_full_log_softmax_for_any_chunk():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(37, 50, generator=g) * 4
    ids = torch.randint(0, 50, (37, 5), generator=g)
    want = torch.log_softmax(logits.double(), -1).gather(-1, ids)
    for rows in (1, 7, 36, 37, 100):
        got = log_probs_at(logits, ids, rows)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    # bf16 logits are converted to fp32 a chunk at a time, as a full fp32 log-softmax would be
    half = logits.bfloat16()
    ref = torch.log_softmax(half.float(), -1).gather(-1, ids)
    torch.testing.assert_close(log_probs_at(half, ids, 8), ref, rtol=0, atol=4e-6)
    # the chunk follows the byte budget: 2 x 4 bytes per logit
    assert chunk_rows(151_936) == 441 and chunk_rows(10**12) == 1


def test_topk_divergence_from_logits_equals_cppo_divergence_padding_included():
    g = torch.Generator().manual_seed(1)
    B, T, V, K = 3, 5, 12, 4
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    logits_mu = logits + 0.5 * torch.randn(B, T, V, generator=g, dtype=F64)
    lq_full = torch.log_softmax(logits_mu, -1)
    tokens = torch.multinomial(lq_full.exp().reshape(-1, V), 1, generator=g).reshape(B, T)
    top_lp, top_ids = lq_full.topk(K, dim=-1)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3:] = False
    # verl's padding: slots beyond what the engine returned hold (pad id, 0.0)
    t_ids, t_lps = top_ids.clone(), top_lp.clone().float()
    t_ids[0, 1, 2:], t_lps[0, 1, 2:] = 0, 0.0
    t_ids[2, 3:], t_lps[2, 3:] = 0, 0.0
    lq_tok = lq_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()

    def pi_at(ids):
        return log_probs_at(logits.reshape(B * T, V), ids.reshape(B * T, -1), 4).reshape(B, T, -1)

    lp_tok = pi_at(tokens.unsqueeze(-1)).squeeze(-1)
    got = topk_divergence(
        "topk_tv", logp=lp_tok, logp_mu=lq_tok, pi_topk=pi_at(t_ids), teacher_ids=t_ids,
        teacher_logprobs=t_lps, token_ids=tokens, response_mask=mask, topk=K,
    )  # fmt: skip
    # the same divergence from cppo.divergence, padding written as -inf (no mass)
    lp_full = torch.log_softmax(logits.float(), -1)
    ref_lps = t_lps.masked_fill((t_lps == 0.0) & (torch.arange(K) > 0), float("-inf"))
    want = compute_divergence(
        "topk_tv",
        logp=lp_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        logp_mu=lq_tok,
        response_mask=mask,
        topk_logp=lp_full.gather(-1, t_ids.long()),
        topk_logp_mu=ref_lps,
        topk_ids=t_ids.long(),
        token_ids=tokens,
        topk=K,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got[2, 3:].abs().sum() == 0
    # a padded slot read as probability 1 would have changed the value
    raw = compute_divergence(
        "topk_tv", logp=lp_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1),
        logp_mu=lq_tok, response_mask=mask, topk_logp=lp_full.gather(-1, t_ids.long()),
        topk_logp_mu=t_lps, topk_ids=t_ids.long(), token_ids=tokens, topk=K,
    )  # fmt: skip
    assert not torch.allclose(raw[0, 1], want[0, 1])
    # with K = V the Top-K partition is the whole vocabulary: the exact TV
    ids_all = lq_full.topk(V, dim=-1)
    exact = topk_divergence(
        "topk_tv", logp=lp_tok, logp_mu=lq_tok, pi_topk=pi_at(ids_all.indices),
        teacher_ids=ids_all.indices, teacher_logprobs=ids_all.values.float(), token_ids=tokens,
        response_mask=mask, topk=V,
    )  # fmt: skip
    torch.testing.assert_close(
        exact, full_tv(logits, logits_mu, mask).float(), rtol=1e-5, atol=1e-6
    )


def test_teacher_topk_marks_padding_after_the_first_slot():
    ids = torch.tensor([[5, 7, 0, 0]])
    lps = torch.tensor([[0.0, -1.0, 0.0, 0.0]])
    out_ids, out_lps = teacher_topk(ids, lps)
    assert out_lps.tolist() == [[0.0, -1.0, float("-inf"), float("-inf")]]
    assert out_ids.dtype == torch.long


def test_prefill_gap_by_hand():
    # one response of 3 tokens: 7 is in the prefill's top-2 at -0.5 (decode said -0.7), 9 is
    # not found, 4 is at -1.25 (decode -1.0); the 4th position is padding
    ids = torch.tensor([[[7, 1], [2, 3], [5, 4], [4, 9]]])
    lps = torch.tensor([[[-0.5, -1.0], [-0.1, -3.0], [-0.3, -1.25], [-0.2, -0.3]]])
    tokens = torch.tensor([[7, 9, 4, 9]])
    mu = torch.tensor([[-0.7, -2.0, -1.0, -0.3]])
    mask = torch.tensor([[True, True, True, False]])
    gap, coverage = prefill_gap(ids, lps, tokens, mu, mask)
    assert gap == pytest.approx((0.2 + 0.25) / 2) and coverage == pytest.approx(2 / 3)
    # a padded slot (0.0 after the first) holding the sampled id is not a hit
    ids[0, 1, 1], lps[0, 1, 1] = 9, 0.0
    assert prefill_gap(ids, lps, tokens, mu, mask)[1] == pytest.approx(2 / 3)
    gap, coverage = prefill_gap(ids, lps, tokens, mu, torch.zeros_like(mask))
    assert math.isnan(gap) and math.isnan(coverage)


def test_compute_score_is_the_dapo_answer_line():
    assert compute_score("toy", "work\nAnswer: 19", "19") == {"score": 1.0, "acc": 1.0}
    assert compute_score("toy", "Answer: 18", "19") == {"score": -1.0, "acc": 0.0}
    assert compute_score("toy", "no answer line" * 1000, 19)["score"] == -1.0


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_converter_keys_steps_and_attempts(tmp_path):
    a1, a2 = tmp_path / "a1.jsonl", tmp_path / "a2.jsonl"
    val0 = {"val-core/val/acc/mean@8": 0.25, "val-aux/val/acc/std@8": 0.1}
    train = lambda s: {  # noqa: E731
        "critic/score/mean": s, "response_length/mean": 50.0, "response_length/max": 90,
        "response_length/clip_ratio": 0.0, "actor/grad_norm": 0.5, "actor/lr": 1e-6,
        "actor/mask/fraction": 0.1, "actor/outward/fraction": 0.4, "timing_s/step": 12.0,
        "actor/pg_loss": 0.01,
    }  # fmt: skip
    a1.write_text(
        json.dumps({"step": 0, "data": val0}) + "\n"
        + json.dumps({"step": 1, "data": train(-0.5)}) + "\nnot json\n"
    )  # fmt: skip
    # the resumed attempt repeats iteration 1 and adds 2 with a validation
    a2.write_text(
        json.dumps({"step": 1, "data": train(0.0)}) + "\n"
        + json.dumps({"step": 2, "data": {**train(0.5), "val-core/val/acc/mean@8": 0.5}}) + "\n"
    )  # fmt: skip
    recs = convert(
        read_verl_log([a1, a2]), updates_per_iter=4, val_k=8, rule_keys=["outward/fraction"]
    )
    assert [(r["kind"], r["step"]) for r in recs] == [
        ("validation", 0), ("train", 4), ("train", 8), ("validation", 8),
    ]  # fmt: skip
    t = recs[1]
    assert t["reward/mean"] == 0.0 and t["accuracy"] == 0.5  # the second attempt won
    assert t["mask/fraction"] == 0.1 and t["outward/fraction"] == 0.4
    assert t["entropy"] is None and t["verl/actor/pg_loss"] == 0.01
    from cppo.run.metrics import TRAIN_KEYS

    assert set(TRAIN_KEYS) <= set(t)
    assert recs[3] == {"kind": "validation", "step": 8, "val/val": 0.5, "val/mean": 0.5, "val/k": 8}


# --- overrides, refusals, the train command ----------------------------------------------------


def paper_run(method: str = "grpo") -> dict:
    from cppo.run.config import validate_run_config

    plan = Plan(load_config(ROOT / "config" / "paper.yaml"))
    return validate_run_config(plan.resolver.run_config("Qwen3-30B-A3B-Base", method, 0))


def overrides_of(run: dict) -> dict[str, str]:
    lines = hydra_overrides(
        run, method_file="/m.json", train_file="/t.parquet", val_files=["/a.parquet", "/b.parquet"],
        checkpoint_dir="/ck", metrics_file="/log.jsonl",
    )  # fmt: skip
    out = dict(line.split("=", 1) for line in lines)
    assert len(out) == len(lines)  # every key once
    return out


def test_overrides_of_the_30b_column():
    o = overrides_of(paper_run())
    # Table 3: 256 prompts x 16 samples per iteration, minibatch 32 prompts, 8 updates
    assert o["data.train_batch_size"] == "256" and o["actor_rollout_ref.rollout.n"] == "16"
    assert o["actor_rollout_ref.actor.ppo_mini_batch_size"] == "32"
    assert o["actor_rollout_ref.actor.ppo_epochs"] == "1"
    assert o["data.max_response_length"] == "16384" and o["data.max_prompt_length"] == "2048"
    assert o["trainer.total_training_steps"] == "560"
    assert o["trainer.test_freq"] == "10" and o["trainer.save_freq"] == "10"  # iterations
    assert o["trainer.nnodes"] == "2" and o["trainer.n_gpus_per_node"] == "8"
    assert o["actor_rollout_ref.rollout.tensor_model_parallel_size"] == "4"
    assert o["actor_rollout_ref.actor.ppo_max_token_len_per_gpu"] == "18432"
    # the conventions: rollout anchor (bypass), no std scaling, token sums over 16384
    assert o["algorithm.rollout_correction.bypass_mode"] == "true"
    assert o["algorithm.norm_adv_by_std_in_grpo"] == "false"
    assert o["actor_rollout_ref.actor.loss_agg_mode"] == "seq-mean-token-sum-norm"
    assert o["actor_rollout_ref.actor.loss_scale_factor"] == "16384"
    assert o["actor_rollout_ref.actor.optim.lr"] == "1e-06"
    assert o["actor_rollout_ref.actor.policy_loss.loss_mode"] == "cppo"
    assert o["+actor_rollout_ref.actor.policy_loss.method_file"] == "/m.json"
    assert o["data.val_files"] == "[/a.parquet,/b.parquet]"
    assert o["actor_rollout_ref.rollout.val_kwargs.n"] == "16"
    assert o["actor_rollout_ref.model.path"] == "Qwen/Qwen3-30B-A3B-Base"
    assert o["actor_rollout_ref.actor.fsdp_config.param_offload"] == "false"


def test_overrides_refuse_schedules_verl_cannot_express():
    run = paper_run()
    run["schedule"]["updates_per_iter"] = 3  # 256 / 32 = 8 mini-batches per epoch
    with pytest.raises(VerlSetupError, match="updates_per_iter 3"):
        overrides_of(run)
    run = paper_run()
    run["validation"]["every"] = 84  # 10.5 iterations of 8 updates
    with pytest.raises(VerlSetupError, match="validation.every"):
        overrides_of(run)
    run = paper_run()
    run["verl"]["strategy"] = "megatron"
    run["verl"]["expert_model_parallel_size"] = 8
    o = overrides_of(run)
    assert o["model_engine"] == "megatron"
    assert o["actor_rollout_ref.actor.megatron.expert_model_parallel_size"] == "8"
    assert not any("fsdp_config" in k for k in o)


PAPER_METHODS = ["grpo", "minpro", "cispo", "dppo", "trm_max", "trm_avg", "cppo"]


def test_train_command_runs_every_paper_method_and_refuses_what_verl_cannot():
    from cppo.backends.verl.train import refusals

    assert all(refusals(paper_run(m)) == [] for m in PAPER_METHODS)
    run = paper_run("grpo")
    run["rl"]["mask_std_0"] = True
    assert refusals(run)[0].startswith("rl.mask_std_0")
    # a Top-K rule: FSDP only, anchored on the rollout, sampled at temperature 1
    run = paper_run("cppo")
    run["verl"]["strategy"] = "megatron"
    run["anchor"] = "recomputed"
    run["schedule"]["temperature"] = 0.7
    msgs = refusals(run)
    assert [m.split(":")[0] for m in msgs] == ["verl.strategy", "anchor", "schedule.temperature"]
    assert "rule 'cppo' reads topk_tv (K=20)" in msgs[0] and "use strategy fsdp" in msgs[0]
    # a sampled-token rule is not concerned
    run = paper_run("grpo")
    run["verl"]["strategy"], run["anchor"] = "megatron", "recomputed"
    assert refusals(run) == []


def test_overrides_pin_the_v1_trainer_and_route_topk_rules():
    o = overrides_of(paper_run("grpo"))
    # the legacy trainer would turn the loss into verl's bypass_mode loss
    assert o["trainer.use_v1"] == "true"
    assert "trainer.v1.trainer_mode" not in o  # verl's own sync trainer
    env = "+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES"
    assert o[env] == "cppo.backends.verl.plugin"
    with pytest.raises(VerlSetupError, match="agent loop file"):
        overrides_of(paper_run("cppo"))
    lines = hydra_overrides(
        paper_run("cppo"), method_file="/m.json", train_file="/t.parquet", val_files=["/a"],
        checkpoint_dir="/ck", metrics_file="/log.jsonl", agent_loop_file="/loops.yaml",
    )  # fmt: skip
    o = dict(line.split("=", 1) for line in lines)
    assert o["trainer.use_v1"] == "true" and o["trainer.v1.trainer_mode"] == "cppo_topk"
    assert o["actor_rollout_ref.rollout.agent.agent_loop_config_path"] == "/loops.yaml"
    assert o["actor_rollout_ref.model.use_fused_kernels"] == "false"
    assert o["actor_rollout_ref.actor.fsdp_config.pad_to_length"] == "false"
    assert o[env] == "'cppo.backends.verl.plugin,cppo.backends.verl.trainer'"  # one string


def test_train_dry_run_writes_the_data_and_the_overrides(tmp_path):
    import pandas as pd

    from cppo.backends.verl.train import main

    fixtures = ROOT / "tests" / "fixtures"
    data = tmp_path / "train.jsonl"
    row = {
        "data_source": "toy", "prompt": [{"role": "user", "content": "What is 1+1?"}],
        "reward_model": {"ground_truth": "2", "style": "rule"}, "extra_info": {"index": "a"},
    }  # fmt: skip
    data.write_text(json.dumps(row) + "\n" + json.dumps({**row, "extra_info": None}) + "\n")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"id": "v1", "problem": "What is 2+2?", "answer": "4"}) + "\n")
    run = paper_run("grpo")
    run.update(output_dir=str(tmp_path / "run"), train_data=str(data), model="/models/x")
    run["validation"]["benchmarks"] = [str(val)]
    cfg_file = tmp_path / "run.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(run))
    assert main(["--config", str(cfg_file), "--dry-run"]) == 0
    state = tmp_path / "run" / "verl"
    method_file = json.loads((state / "method.json").read_text())
    assert method_file["method"]["rule"] == "grpo" and method_file["imports"] == []
    assert method_file["seed"] == run["seed"]
    train = pd.read_parquet(state / "train.parquet")
    assert list(train["reward_model"].map(lambda r: r["ground_truth"])) == ["2", "2"]
    v = pd.read_parquet(state / "val-val.parquet")
    assert v["data_source"].tolist() == ["val"] and "What is 2+2?" in v["prompt"][0][0]["content"]
    lines = (state / "overrides-attempt-1.txt").read_text().splitlines()
    assert f"data.train_files={state / 'train.parquet'}" in lines
    assert fixtures.is_dir()
    assert "agent_name" not in train.columns and not (state / "agent_loops.yaml").exists()
    # a Top-K rule: its training rows name the Top-K agent loop, registered with its K
    run.pop("divergence", None)  # grpo's diagnostic divergence; dppo reads its own
    cfg_file.write_text(
        yaml.safe_dump({**run, "method": {"rule": "dppo", "divergence": "topk_tv", "topk": 7}})
    )
    assert main(["--config", str(cfg_file), "--dry-run"]) == 0
    train = pd.read_parquet(state / "train.parquet")
    assert train["agent_name"].tolist() == ["cppo_topk", "cppo_topk"]
    assert "agent_name" not in pd.read_parquet(state / "val-val.parquet").columns
    loops = yaml.safe_load((state / "agent_loops.yaml").read_text())
    assert loops == [{"name": "cppo_topk", "topk": 7,
                      "_target_": "cppo.backends.verl.agent_loop.TopKAgentLoop"}]  # fmt: skip
    lines = (state / "overrides-attempt-1.txt").read_text().splitlines()  # a dry run: attempt 1
    assert (
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={state / 'agent_loops.yaml'}"
        in lines
    )
    # what verl cannot run stops before any file is written
    (state / "agent_loops.yaml").unlink()
    cfg_file.write_text(yaml.safe_dump({**run, "anchor": "recomputed",
                                        "method": {"rule": "dppo", "divergence": "topk_tv"}}))  # fmt: skip
    assert main(["--config", str(cfg_file), "--dry-run"]) == 2
    assert not (state / "agent_loops.yaml").exists()


# --- the Ray cluster on SLURM ------------------------------------------------------------------


def test_ray_slurm_script_starts_a_head_and_workers(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    fakes = {
        "scontrol": "echo node-a; echo node-b; echo node-c",
        "srun": 'echo "srun $*" >> "$CALLS"; while [[ $1 == -* ]]; do [[ $1 == -w ]] && shift; shift; done; "$@"',
        "hostname": "echo 10.0.0.1",
        "ray": 'echo "ray $*" >> "$CALLS"',
    }
    for name, body in fakes.items():
        f = bin_dir / name
        f.write_text(f"#!/usr/bin/env bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(log),
        "SLURM_JOB_NODELIST": "node-[a-c]",
        "SLURM_JOB_ID": "1234",
        "RAY_HEAD_WAIT_S": "0",
        "RAY_WORKER_WAIT_S": "0",
    }
    cmd = [
        "bash",
        str(ROOT / "cppo/backends/verl/ray_slurm.sh"),
        "bash",
        "-c",
        'echo "cmd $RAY_ADDRESS $0"',
        "x",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cmd 10.0.0.1:6613 x"  # 6379 + 1234 % 1000
    calls = log.read_text()
    assert "ray start --head --node-ip-address=10.0.0.1 --port=6613 --num-gpus=8 --block" in calls
    ray_calls = [line for line in calls.splitlines() if line.startswith("ray ")]
    assert sum(c.startswith("ray start --address=10.0.0.1:6613") for c in ray_calls) == 2
    assert "-w node-b" in calls and "-w node-c" in calls
    assert "ray stop --force" in calls
    bad = subprocess.run(["bash", str(ROOT / "cppo/backends/verl/ray_slurm.sh"), "true"],
                         env={**env, "SLURM_JOB_NODELIST": ""}, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "not inside a SLURM job" in bad.stderr


def test_paper_plan_runs_30b_on_verl_over_two_nodes():
    plan = Plan(load_config(ROOT / "config" / "paper.yaml"))
    m = "Qwen3-30B-A3B-Base"
    assert plan.commands.train_command(m) == (
        "bash cppo/backends/verl/ray_slurm.sh python -m cppo.backends.verl.train"
    )
    assert plan.commands.env_file(m) == "../envs/verl.yaml"
    res = plan.commands.snakemake_resources("train", m)
    assert (res["nodes"], res["tasks_per_node"], res["gpu"], res["cpus_per_task"]) == (2, 1, 16, 64)
    assert plan.commands.train_command("Qwen3-8B-Base").startswith("accelerate launch")
    run = plan.resolver.run_config(m, "grpo", 0)
    assert run["backend"] == "verl" and run["rl"]["mask_std_0"] is False
    assert run["verl"]["nnodes"] == 2 and run["verl"]["gpus_per_node"] == 8


def test_resource_check_sizes_the_verl_job():
    from cppo.pipeline import resources

    plan = Plan(load_config(ROOT / "config" / "paper.yaml"))
    job = resources.training_job(plan, "Qwen3-30B-A3B-Base", ROOT)
    mem = resources.memory(job)
    params = job.arch.params()
    assert job.backend == "verl" and job.update_tokens == 18432
    assert mem.states == pytest.approx(16 * params / 16)  # bf16 + fp32 master/grad/Adam, 16 GPUs
    a = job.arch
    assert mem.checkpoints == a.layers * a.hidden * 18432 * 2  # gradient checkpointing, bf16
    assert mem.engine_budget == pytest.approx(0.5 * job.gpu_mem_gib * resources.GIB)
    # every paper method runs: the Top-K ones (K = 20) add the gather to the update pass
    report = resources.check(plan, ROOT)
    assert report.ok and report.notes == []
    big = next(r for r in report.rows if r.job.model == "Qwen3-30B-A3B-Base")
    assert big.job.runs == 7 and big.job.refused_runs == 0 and job.topk == 20
    per_slot = 4 + 4 + 3 * 4 + 8 + 4  # mu's ids and log-probs, pi's 3 copies, padded mu fields
    assert mem.parts["update"]["Top-K gather"] == 512 * 2**20 + 18432 * 20 * per_slot
    assert math.isfinite(mem.peak)


def test_export_takes_the_best_validated_and_the_last_checkpoint(tmp_path, monkeypatch):
    from cppo.backends.verl import train

    run = paper_run("grpo")
    run.update(output_dir=str(tmp_path), snapshot_best_within=None)
    for it in (10, 20, 30):
        (tmp_path / "verl_checkpoints" / f"global_step_{it}" / "actor").mkdir(parents=True)
    merged = []

    def fake_merge(actor_dir, target, strategy):
        merged.append((actor_dir.parent.name, target.name, strategy))
        target.mkdir(parents=True)
        (target / "model.safetensors").write_text(actor_dir.parent.name)

    monkeypatch.setattr(train, "_merge", fake_merge)
    records = [
        {"kind": "validation", "step": 0, "val/mean": 0.1},
        {"kind": "validation", "step": 80, "val/mean": 0.4},  # iteration 10 x 8 updates
        {"kind": "validation", "step": 160, "val/mean": 0.3},
        {"kind": "validation", "step": 240, "val/mean": 0.2},
    ]
    assert train.export_checkpoints(run, records) == [80, 240]
    assert merged == [
        ("global_step_10", "step-80", "fsdp"), ("global_step_30", "step-240", "fsdp"),
    ]  # fmt: skip
    assert (tmp_path / "final" / "model.safetensors").read_text() == "global_step_30"
    run["snapshot_best_within"] = 100  # T_stop: the best within the first 100 steps
    records[1]["val/mean"] = 0.0
    assert train.export_checkpoints(run, records) == [80, 240]  # step-80 exists: not merged again
    assert len(merged) == 2

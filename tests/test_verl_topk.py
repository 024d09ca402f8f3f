"""The Top-K route inside verl 0.9.1 (bash .ci/verl): verl's own FSDP engine ``forward_step``
runs a tiny Qwen3 with the project's Top-K loss on a batch in the layout verl's v1 trainer
hands the actor (nested per sequence, as its agent loop writes it), packed and padded; the
loss, D and every parameter gradient equal the project's TRL-side computation on the same
batch (a padded forward, ``cppo.divergence``, the same rule, the trainer's aggregation). The
agent loop runs verl's single-turn loop against a fake server whose prefill answer goes through
verl's own ``extract_prompt_logprobs``; the trainer mode's flag and loss reach the actor update.
Skipped where verl is not installed."""

from __future__ import annotations

import asyncio
import copy
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

verl = pytest.importorskip("verl")

import torch  # noqa: E402

from cppo.backends.verl.loss import write_method_file  # noqa: E402
from cppo.backends.verl.overrides import agent_loop_entries  # noqa: E402
from cppo.backends.verl.probe import actor_config, micro_batch, topk_samples  # noqa: E402
from cppo.backends.verl.probe import composed_config as composed  # noqa: E402
from cppo.divergence import compute_divergence  # noqa: E402
from cppo.rules import RuleBatch, aggregate_loss  # noqa: E402
from cppo.run.config import method_rule  # noqa: E402

pytestmark = [pytest.mark.verl, pytest.mark.usefixtures("one_torch_thread")]
ROOT = Path(__file__).resolve().parents[1]
MODEL = "Qwen3-30B-A3B-Base"


def paper_run(method: str) -> dict:
    from cppo.pipeline.config import load_config
    from cppo.pipeline.plan import Plan
    from cppo.run.config import validate_run_config

    plan = Plan(load_config(ROOT / "config" / "paper.yaml"))
    return validate_run_config(plan.resolver.run_config(MODEL, method, 0))


def test_the_topk_overrides_compose_and_pass_verls_checks(tmp_path):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    cfg = composed(paper_run("cppo"), tmp_path)
    validate_config(
        config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg)
    )
    assert cfg.trainer.use_v1 is True and cfg.trainer.v1.trainer_mode == "cppo_topk"
    assert cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path == str(
        tmp_path / "agent_loops.yaml"
    )
    assert cfg.actor_rollout_ref.model.use_fused_kernels is False
    assert cfg.actor_rollout_ref.actor.fsdp_config.pad_to_length is False
    env = cfg.ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES
    assert env == "cppo.backends.verl.plugin,cppo.backends.verl.trainer"


# --- verl's engine with the Top-K loss ---------------------------------------------------------


def tiny_qwen3():
    from evaluation.testing import make_char_tokenizer, tiny_model_for

    tok = make_char_tokenizer()
    model = tiny_model_for(tok, seed=3).float()
    with torch.no_grad():  # sharper distributions than the init's, so the masks bind
        model.lm_head.weight.mul_(8.0)
    return model, tok


def fsdp_engine(model, monkeypatch):
    from verl.workers.engine.fsdp import transformer_impl as ti

    from cppo.backends.verl.probe import fsdp_engine as engine_for

    monkeypatch.setattr(ti, "get_device_id", lambda: "cpu")
    monkeypatch.setattr(ti, "get_device_name", lambda: "cpu")
    return engine_for(model)


def reference(model, samples, run):
    """The project's TRL-side loss on the same batch: a padded forward per sequence,
    cppo.divergence on pi's full log-softmax, the rule, the trainer's aggregation."""
    rule = method_rule(run)
    spec = rule.divergence
    rows = []
    for s in samples:
        p, r = len(s["prompts"]), len(s["responses"])
        lp_full = torch.log_softmax(model(s["input_ids"].unsqueeze(0)).logits[0].float(), -1)
        lp_resp = lp_full[p - 1 : p + r - 1]  # row t predicts response token t
        rows.append((lp_resp, s, p, r))
    T = max(r for *_, r in rows)
    B, K = len(rows), spec["topk"]

    def pad(x, fill=0.0):
        return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, T - x.shape[0]), value=fill)

    logp = torch.stack(
        [pad(lp.gather(-1, s["responses"].unsqueeze(-1)).squeeze(-1)) for lp, s, *_ in rows]
    )
    ids = torch.stack([pad(s["teacher_ids"][p - 1 : p + r - 1].long()) for _, s, p, r in rows])
    lps = torch.stack([pad(s["teacher_logprobs"][p - 1 : p + r - 1]) for _, s, p, r in rows])
    lps = lps.masked_fill((lps == 0.0) & (torch.arange(K) > 0), float("-inf"))
    pi_k = torch.stack([pad(lp.detach().gather(-1, s["teacher_ids"][p - 1 : p + r - 1].long()))
                        for lp, s, p, r in rows])  # fmt: skip
    tokens = torch.stack([pad(s["responses"]) for _, s, *_ in rows]).long()
    mask = torch.stack([pad(s["response_mask"]) for _, s, *_ in rows]).bool()
    mu = torch.stack([pad(s["old_log_probs"]) for _, s, *_ in rows])
    adv = torch.stack([pad(s["advantages"]) for _, s, *_ in rows])
    D = compute_divergence(
        spec["kind"], logp=logp.detach(), logp_mu=mu, response_mask=mask, topk_logp=pi_k,
        topk_logp_mu=lps, topk_ids=ids, token_ids=tokens, topk=K, sampled_token=spec["sampled_token"],
    )  # fmt: skip
    out = rule(RuleBatch(logp, mu, adv, mask, divergence=D, seed=0))
    cfg = rule.cfg
    loss = aggregate_loss(out.per_token_loss, mask, cfg["loss_agg_mode"], cfg["horizon"],
                          normalizer=float(B))  # fmt: skip
    return loss, D, out


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("method", ["cppo", "trm_max"])
def test_verls_engine_with_the_topk_loss_equals_the_trl_side_loss(
    method, packed, tmp_path, monkeypatch
):
    import cppo.backends.verl.topk_loss as topk_loss

    run = paper_run(method)
    run["method"]["horizon"] = 64  # the seq-mean-token-sum-norm divisor, at the batch's scale
    if method == "trm_max":
        run["method"]["delta"] = 2.0  # this batch's max KL per response is 1.1 to 2.3
    model, _ = tiny_qwen3()
    ref_model = copy.deepcopy(model)
    K = method_rule(run).divergence["topk"]
    samples = topk_samples(model, K)
    loss_fn = topk_loss.TopKPolicyLoss(actor_config(run, tmp_path))
    seen = {}
    real = topk_loss.topk_divergence

    def recording(*args, **kwargs):
        seen["D"] = real(*args, **kwargs)
        return seen["D"]

    monkeypatch.setattr(topk_loss, "topk_divergence", recording)
    engine = fsdp_engine(model, monkeypatch)
    batch = micro_batch(samples, packed)
    assert batch["prompts"].is_nested and batch["teacher_ids"].is_nested  # verl's v1 layout
    loss, output = engine.forward_step(batch, loss_fn, forward_only=False)
    loss.backward()

    want, D, out = reference(ref_model, samples, run)
    want.backward()
    torch.testing.assert_close(loss, want.to(loss.dtype), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(seen["D"].float(), D.float(), rtol=1e-5, atol=1e-6)
    binding = out.metrics["mask/fraction"].item()
    assert 0.0 < binding < 1.0, binding  # D decides which terms train
    worst = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True)
    )
    scale = max(q.grad.abs().max().item() for q in ref_model.parameters())
    assert scale > 0 and worst <= 1e-5 * scale, (worst, scale)
    metrics = output["metrics"]
    assert 0 < metrics["logprob/prefill_coverage"].aggregate() <= 1
    # mu's top-K and sampled log-probs come from one distribution here: no gap
    assert metrics["logprob/prefill_gap"].aggregate() < 1e-5


def test_the_loss_travels_to_the_workers_by_pickle_and_refuses_a_rule_without_topk(tmp_path):
    from cppo.backends.verl.topk_loss import TopKPolicyLoss

    loss = TopKPolicyLoss(actor_config(paper_run("cppo"), tmp_path))
    again = pickle.loads(pickle.dumps(loss))
    assert again.topk == 20 and again.rule.name == "cppo"
    other = tmp_path / "grpo"
    other.mkdir()
    with pytest.raises(ValueError, match="reads no Top-K divergence"):
        TopKPolicyLoss(actor_config(paper_run("grpo"), other))


def test_without_the_flag_the_loss_stops_with_the_reason(tmp_path, monkeypatch):
    from cppo.backends.verl.topk_loss import TopKPolicyLoss

    run = paper_run("cppo")
    model, _ = tiny_qwen3()
    batch = micro_batch(topk_samples(model, 20), packed=True)
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(batch, distillation_use_topk=False)
    engine = fsdp_engine(model, monkeypatch)
    with pytest.raises(ValueError, match="did not carry distillation_use_topk"):
        engine.forward_step(batch, TopKPolicyLoss(actor_config(run, tmp_path)), forward_only=False)


# --- the trainer mode: flag and loss at the actor update ---------------------------------------


class FakeActorGroup:
    def __init__(self):
        self.loss_fns, self.batches = [], []

    def set_loss_fn(self, fn):
        self.loss_fns.append(fn)

    def update_actor(self, batch):
        self.batches.append(dict(batch.extra_info))
        return {"metrics": {"mfu": 0.5, "pg_loss": 0.25}}


def test_the_flag_and_the_loss_reach_the_actor_update(tmp_path, monkeypatch):
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from cppo.backends.verl.topk_loss import TopKPolicyLoss
    from cppo.backends.verl.trainer import TopKTrainer

    cfg = composed(paper_run("cppo"), tmp_path)
    assert get_trainer_cls(cfg.trainer.v1.trainer_mode) is TopKTrainer
    # verl's own code reads the mode name (replay buffer, refill, checkpoints): it sees "sync"
    modes = []
    monkeypatch.setattr(PPOTrainer, "__init__", lambda self, config: modes.append(
        config.trainer.v1.trainer_mode))  # fmt: skip
    trainer = TopKTrainer(cfg)
    assert modes == ["sync"]
    trainer.config = cfg
    group = FakeActorGroup()
    trainer.actor_rollout_wg = group
    trainer.install_loss()
    (fn,) = group.loss_fns
    assert isinstance(fn, TopKPolicyLoss) and fn.config.policy_loss.method_file == str(
        tmp_path / "method.json"
    )
    batch = SimpleNamespace(extra_info={})
    metrics: dict = {}
    assert trainer._update_actor(batch, metrics) is batch
    (sent,) = group.batches
    assert sent["distillation_use_topk"] is True and sent["distillation_only"] is False
    assert metrics["actor/pg_loss"] == 0.25 and trainer.actor_rollout_wg is group


# --- the agent loop: mu's top-K by a prefill pass ----------------------------------------------


def verls_extract_prompt_logprobs():
    """verl's ``extract_prompt_logprobs`` (vllm_rollout/utils.py), the function its vLLM server
    runs on a prefill's output. Its module imports vLLM, which this CPU environment lacks, so
    the one function is compiled from verl's installed source on its own."""
    import ast
    import typing

    path = Path(verl.__file__).parent / "workers" / "rollout" / "vllm_rollout" / "utils.py"
    tree = ast.parse(path.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef)
             and n.name == "extract_prompt_logprobs"]  # fmt: skip
    namespace = {"Optional": typing.Optional, "RequestOutput": object}
    exec(compile(ast.Module([fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace["extract_prompt_logprobs"]


class FakeServer:
    """verl's LLMServerClient.generate: a generation returns fixed tokens and their log-probs; a
    prefill (prompt_logprobs K) returns vLLM-style ranked entries through verl's own
    extract_prompt_logprobs."""

    def __init__(self, response, response_logprobs, top):
        self.response, self.response_logprobs, self.top = response, response_logprobs, top
        self.calls = []

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        extract_prompt_logprobs = verls_extract_prompt_logprobs()
        self.calls.append((list(prompt_ids), dict(sampling_params)))
        k = sampling_params.get("prompt_logprobs")
        if k is None:
            return TokenOutput(token_ids=self.response, log_probs=self.response_logprobs,
                               stop_reason="completed", extra_fields={})  # fmt: skip
        entries = [None]  # vLLM has no log-prob for the first prompt token
        for pos in range(1, len(prompt_ids)):
            ranked = {i: SimpleNamespace(logprob=lp, rank=r + 1)
                      for r, (i, lp) in enumerate(self.top(pos))}  # fmt: skip
            actual = prompt_ids[pos]
            if actual not in ranked:  # vLLM adds the actual token with its own rank
                ranked[actual] = SimpleNamespace(logprob=-9.0, rank=k + 7)
            entries.append(ranked)
        fields: dict = {}
        extract_prompt_logprobs(SimpleNamespace(prompt_logprobs=entries), k, fields)
        return TokenOutput(token_ids=[0], log_probs=None, stop_reason="completed",
                           extra_fields=fields)  # fmt: skip


def test_the_agent_loop_brings_back_mus_topk_over_the_whole_sequence(tmp_path):
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from cppo.backends.verl.agent_loop import TopKAgentLoop
    from evaluation.testing import make_char_tokenizer

    K = 3
    cfg = composed(paper_run("cppo"), tmp_path)
    OmegaConf.update(cfg, "actor_rollout_ref.rollout.prompt_length", 64)
    OmegaConf.update(cfg, "actor_rollout_ref.rollout.response_length", 8)
    tok = make_char_tokenizer()
    response = tok.encode("1+1=2", add_special_tokens=False)

    def top(pos):  # a known list per position; position 4 has only 2 entries
        n = 2 if pos == 4 else K
        return [(10 + pos + j, -0.1 * (j + 1) - 0.01 * pos) for j in range(n)]

    server = FakeServer(response, [-0.5] * len(response), top)
    (entry,) = agent_loop_entries(K)
    assert entry["_target_"] == f"{TopKAgentLoop.__module__}.{TopKAgentLoop.__name__}"

    async def run_loop():  # verl's loop binds the running event loop when it is made
        loop = TopKAgentLoop(
            trainer_config=DictConfigWrap(cfg), server_manager=server, tokenizer=tok,
            processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(cfg.data),
            topk=entry["topk"],
        )  # fmt: skip
        messages = [{"role": "user", "content": "What is 1+1?"}]
        params = {"temperature": 1.0, "top_p": 1.0, "logprobs": True}
        return await loop.run(params, raw_prompt=messages)

    out = asyncio.run(run_loop())
    (gen, gen_params), (prefill, params) = server.calls
    assert params == {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": K}
    assert prefill == gen + list(out.response_ids) == list(out.prompt_ids) + list(out.response_ids)
    ids, lps = out.extra_fields["teacher_ids"], out.extra_fields["teacher_logprobs"]
    S = len(prefill)
    assert ids.shape == lps.shape == (S, K) and ids.dtype == torch.int32
    for row in range(S - 1):  # row j: the top-K of token j + 1
        want = top(row + 1)
        assert ids[row, : len(want)].tolist() == [i for i, _ in want]
        torch.testing.assert_close(lps[row, : len(want)], torch.tensor([lp for _, lp in want]))
    assert ids[3, 2].item() == 0 and lps[3, 2].item() == 0.0  # unfilled slot: verl's padding
    assert lps[-1].abs().sum() == 0  # the dummy last row
    assert out.response_logprobs == [-0.5] * len(response)  # mu stays the decode's


# --- Ulysses sequence parallel: each rank gathers its slice of the packed rows -----------------


def _sp_worker(rank: int, world: int, store: str, method_file: str, out: str) -> None:
    import torch.distributed as dist
    from verl.utils.ulysses import (
        gather_outputs_and_unpad,
        set_ulysses_sequence_parallel_group,
        slice_input_tensor,
    )

    from cppo.backends.verl.topk_loss import STREAM, TopKPolicyLoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        set_ulysses_sequence_parallel_group(dist.group.WORLD)
        logits, ids, lengths = sp_case()
        # the engine pads the packed sequence to a multiple of the SP size and gives each rank
        # its slice; pad rows get logits like any other row
        pad = (-logits.shape[0]) % world
        padded = torch.cat([logits, torch.randn(pad, logits.shape[1])])
        local = slice_input_tensor(padded.unsqueeze(0), dim=1, padding=False)
        nested = torch.nested.nested_tensor_from_jagged(ids, offsets=lengths)
        loss = TopKPolicyLoss(SimpleNamespace(policy_loss={"method_file": method_file}))
        streams = loss.pi_at_teacher_ids(local, {"teacher_ids": nested})
        got = torch.stack(
            [gather_outputs_and_unpad(streams[f"{STREAM}{k}"].squeeze(0), gather_dim=0,
                                      unpad_dim=0, padding_size=pad)
             for k in range(ids.shape[1])], dim=-1,
        )  # fmt: skip
        torch.save({"got": got, "rows": local.shape[1]}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def sp_case():
    g = torch.Generator().manual_seed(5)
    lengths = torch.tensor([0, 7, 12, 21])  # three sequences, 21 packed rows (odd)
    logits = torch.randn(21, 40, generator=g) * 3
    ids = torch.randint(0, 40, (21, 4), generator=g)
    return logits, ids, lengths


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_slices_gather_back_to_the_unsliced_result(tmp_path, world):
    import torch.multiprocessing as mp

    from cppo.backends.verl.topk import log_probs_at

    method = {"rule": "dppo", "divergence": "topk_tv", "topk": 4}
    path = write_method_file({"imports": [], "seed": 0, "method": method}, tmp_path / "m.json")
    mp.spawn(_sp_worker, args=(world, str(tmp_path / "store"), str(path), str(tmp_path)),
             nprocs=world, join=True)  # fmt: skip
    logits, ids, _ = sp_case()
    want = log_probs_at(logits, ids)
    for rank in range(world):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["rows"] == -(-21 // world)  # each rank held only its slice
        torch.testing.assert_close(result["got"], want, rtol=0, atol=0)


def test_the_gpu_smoke_check_of_the_topk_step_runs_on_cpu(tmp_path):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
    gpu_smoke = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = gpu_smoke
    spec.loader.exec_module(gpu_smoke)
    args = SimpleNamespace(device="cpu", vocab_size=300, hidden_size=32, layers=2, logit_std=4.0,
                           tokens=80)  # fmt: skip
    r = gpu_smoke.verl_topk(gpu_smoke.build_model(args, tmp_path / "tiny"), args)
    assert r["packed_finite_grads"] and r["padded_finite_grads"]
    assert abs(r["packed_loss"] - r["padded_loss"]) <= 1e-5 * max(1.0, abs(r["padded_loss"]))
    assert r["packed_loss"] != 0.0 and r["rows"] == 432

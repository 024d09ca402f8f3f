"""What only a GPU can show, in one short run: `bash benchmarks/gpu_smoke.sh` (see its header).

Checks, one output line each (``PASS`` / ``FAIL`` / ``SKIP <reason>`` then numbers):

- ``train_step``: `cppo.training.run.run_training` on a locally built tiny Qwen3 in bf16 on the
  device (transformers rollouts, the CPPO rule, 2 iterations x 2 optimizer steps); every
  metrics.jsonl record is finite and the peak memory of each optimizer step is printed.
- ``noise_floor``: the per-token Top-K TV (K = 20) between the fp32 policy and the same weights
  run in bf16, at step 0, on sequences sampled from the bf16 model (what a bf16 rollout engine
  would give mu while the trainer recomputes pi), with the LM head in bf16 and in fp32
  (`cast_lm_head_to_fp32`). CPPO's prefix budget admits sum_t w_t D_t <= delta + delta_b sum_t
  w_t, so the mean D over a response is what spends delta_b: the check passes when the largest
  per-response mean stays below delta_b / 4 (delta_b = 0.02, Table 3), i.e. numerical noise
  alone cannot consume the budget.
- ``vllm_topk``: if vllm is importable, top-20 log-probs of a colocated engine against the
  fp32 recomputation on the same tokens (mean |d log p| on the shared ids, Top-K TV); and
  ``vllm_prefill``: the cost of the verl backend's re-prefill (cppo.backends.verl.agent_loop),
  one ``max_tokens 1`` pass over sequences of ``--prefill-tokens`` tokens with prompt log-probs
  K = 20 against K = 0 and none (seconds, ratios; a measurement, it passes when it runs).
- ``verl_topk``: if verl is importable, one Top-K update step of the tiny model through verl's
  own FSDP engine ``forward_step`` with the project's Top-K loss (cppo.backends.verl.topk_loss:
  the CPPO rule of config/paper.yaml's 30B-A3B column, K = 20, Qwen3's vocabulary), packed and
  padded layouts; passes when both losses and every gradient are finite and the two losses
  agree (rel 1e-4); prints the wall time and the peak memory of the step.

Without ``--model`` the network is never touched: the tiny model is built here, with Qwen3's
vocabulary size and an LM head scaled so its logits are as peaked as a trained model's (random
initialisation gives near-uniform distributions, whose bf16 noise says little). ``--model DIR``
measures the noise floor on real weights instead (e.g. a prefetched Qwen3-1.7B snapshot).
``--device cpu`` runs the same code on CPU (the test suite does, with small sizes).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

DELTA_B = 0.02  # Table 3, adaptive lower bound of every Base model
TOPK = 20


def line(check: str, status: str, **numbers: Any) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()]
    text = " ".join([f"{status:<4}", f"{check:<12}", *parts])
    print(text, flush=True)
    return text


def build_model(args: argparse.Namespace, out: Path) -> Path:
    """A tiny Qwen3 with Qwen3's vocabulary, its LM head rescaled to logit std `logit_std`."""
    from evaluation.testing import make_char_tokenizer, tiny_model_for

    tok = make_char_tokenizer(args.vocab_size)
    model = tiny_model_for(
        tok,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        tie_word_embeddings=False,
        seed=0,
    )
    with torch.no_grad():
        # after the final RMSNorm the hidden state has unit scale per coordinate
        model.lm_head.weight.normal_(0.0, args.logit_std / math.sqrt(args.hidden_size))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------- noise floor
def topk_tv_rows(
    logp_mu: torch.Tensor, logp_pi: torch.Tensor, tokens: torch.Tensor, k: int = TOPK
) -> torch.Tensor:
    """Per-token Top-K TV of cppo.divergence between full log-prob rows [N, V] (mu's top-K ids
    plus the sampled token, the rest pooled), as the trainer computes it."""
    from cppo.divergence import compute_divergence

    ids = logp_mu.topk(k, dim=-1).indices
    d = compute_divergence(
        "topk_tv",
        logp=logp_pi.gather(-1, tokens[:, None]).T,
        logp_mu=logp_mu.gather(-1, tokens[:, None]).T,
        topk_logp=logp_pi.gather(-1, ids)[None],
        topk_logp_mu=logp_mu.gather(-1, ids)[None],
        topk_ids=ids[None],
        token_ids=tokens[None],
        topk=k,
    )
    return d[0]


@torch.no_grad()
def noise_floor(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    dev = torch.device(args.device)
    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(dev).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(10, 90, (args.sequences, 16), generator=g).to(dev)
    torch.manual_seed(0)
    seqs = bf16.generate(
        prompt,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        pad_token_id=0,
    )
    n_prompt = prompt.shape[1]
    targets = seqs[:, n_prompt:]

    def response_logp(hidden_model: Any, head_dtype: torch.dtype) -> torch.Tensor:
        out = hidden_model.model(seqs).last_hidden_state[:, n_prompt - 1 : -1]
        w = hidden_model.lm_head.weight
        return torch.log_softmax((out.to(head_dtype) @ w.to(head_dtype).T).float(), dim=-1)

    ref = response_logp(fp32, torch.float32)
    result: dict[str, Any] = {}
    for name, head in (("bf16_head", torch.bfloat16), ("fp32_head", torch.float32)):
        pi = response_logp(bf16, head)
        per_resp = []
        all_d = []
        for b in range(seqs.shape[0]):
            d = topk_tv_rows(ref[b], pi[b], targets[b])  # mu = fp32 reference, pi = bf16 run
            per_resp.append(float(d.mean()))
            all_d.append(d)
        d_all = torch.cat(all_d)
        result[name] = {
            "mean_D": float(d_all.mean()),
            "p99_D": float(d_all.float().quantile(0.99)),
            "max_resp_mean": max(per_resp),
        }
    same = topk_tv_rows(ref[0], ref[0], targets[0])  # the estimator's own zero
    result["self_D"] = float(same.abs().max())
    return result


# ------------------------------------------------------------------------------- train step
def train_step(model_dir: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import TrainerCallback

    from cppo.run.config import validate_run_config
    from cppo.run.metrics import read_metrics
    from cppo.training.run import run_training
    from evaluation.testing import write_train_jsonl

    cuda = args.device.startswith("cuda")
    peaks: list[float] = []

    class PeakMemory(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated() / 2**30)

    data = write_train_jsonl(work / "train.jsonl", 8)
    cfg = validate_run_config(
        {
            "output_dir": str(work / "run"),
            "model": str(model_dir),
            "train_data": str(data),
            "method": {"rule": "cppo"},
            "schedule": {
                "prompts_per_iter": 4,
                "n": 4,
                "minibatch": 2,
                "updates_per_iter": 2,
                "iterations": 2,
                "max_completion_length": args.tokens,
                "micro_batch": 4,
                "learning_rate": 1e-4,
            },
            "use_cpu": not cuda,
            "bf16": cuda,
            "cast_lm_head_to_fp32": True,
            "save_every": 4,
        }
    )
    started = time.perf_counter()
    run_training(cfg, callbacks=[PeakMemory()], progress=False)
    records = read_metrics(work / "run" / "metrics.jsonl").train
    bad = [
        (r["step"], k)
        for r in records
        for k, v in r.items()
        if isinstance(v, float) and not math.isfinite(v)
    ]
    return {
        "steps": len(records),
        "non_finite": len(bad),
        "peak_gib_per_step": [round(p, 3) for p in peaks],
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------- vLLM top-K
@torch.no_grad()
def vllm_topk(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True)
    params = SamplingParams(temperature=1.0, max_tokens=args.tokens, logprobs=TOPK, seed=0)
    prompts = [{"prompt_token_ids": list(range(10, 26))} for _ in range(args.sequences)]
    outs = llm.generate(prompts, params)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    diffs, tvs = [], []
    for prompt, out in zip(prompts, outs, strict=True):
        comp = out.outputs[0]
        ids = torch.tensor(prompt["prompt_token_ids"] + list(comp.token_ids)).cuda()
        logits = ref_model(ids[None]).logits[0, len(prompt["prompt_token_ids"]) - 1 : -1]
        ref = torch.log_softmax(logits.float(), dim=-1)
        for t, row in enumerate(comp.logprobs):
            top = sorted(row.items(), key=lambda kv: -kv[1].logprob)[:TOPK]
            eng = torch.tensor([lp.logprob for _, lp in top]).cuda()
            ref_top = ref[t, torch.tensor([i for i, _ in top]).cuda()]
            diffs.append(float((eng - ref_top).abs().mean()))
            p, q = eng.exp(), ref_top.exp()
            tvs.append(0.5 * float((p - q).abs().sum() + ((1 - p.sum()) - (1 - q.sum())).abs()))
    return {
        "mean_abs_dlogp": sum(diffs) / len(diffs),
        "mean_topk_tv": sum(tvs) / len(tvs),
        "prefill": prefill_cost(llm, args, vocab=ref_model.config.vocab_size),
    }


def prefill_cost(llm: Any, args: argparse.Namespace, vocab: int) -> dict[str, float]:
    """Seconds of one max_tokens=1 pass over fresh sequences with prompt log-probs K = none, 0,
    20 (fresh token ids per pass: nothing is served from the prefix cache)."""
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(1)
    out = {}
    for label, k in (("warmup", None), ("none", None), ("k0", 0), ("k20", TOPK)):
        prompts = [
            {
                "prompt_token_ids": torch.randint(
                    10, vocab, (args.prefill_tokens,), generator=g
                ).tolist()
            }
            for _ in range(args.sequences)
        ]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k)
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        out[f"{label}_s"] = time.perf_counter() - start
    del out["warmup_s"]
    out["k20_over_k0"] = out["k20_s"] / out["k0_s"]
    out["k20_over_none"] = out["k20_s"] / out["none_s"]
    return out


# ------------------------------------------------------------------------------- verl Top-K
def verl_topk(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM
    from verl.workers.engine.fsdp import transformer_impl as ti

    from cppo.backends.verl.probe import actor_config, fsdp_engine, micro_batch, topk_samples
    from cppo.backends.verl.topk_loss import TopKPolicyLoss
    from cppo.pipeline.config import load_config
    from cppo.pipeline.plan import Plan
    from cppo.run.config import validate_run_config

    if not args.device.startswith("cuda"):  # verl's engine asks the platform for its device
        ti.get_device_id = ti.get_device_name = lambda: "cpu"
    root = Path(__file__).resolve().parents[1]
    plan = Plan(load_config(root / "config" / "paper.yaml"))
    run = validate_run_config(plan.resolver.run_config("Qwen3-30B-A3B-Base", "cppo", 0))
    lengths = tuple((64 - 8 * i, args.tokens - 16 * i) for i in range(4))
    out: dict[str, Any] = {"rows": sum(p + r for p, r in lengths)}
    with tempfile.TemporaryDirectory() as tmp:
        loss_fn = TopKPolicyLoss(actor_config(run, Path(tmp)))
        for layout, packed in (("packed", True), ("padded", False)):
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            model = model.to(args.device)
            samples = topk_samples(model, TOPK, lengths=lengths)
            engine = fsdp_engine(model)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            loss, _ = engine.forward_step(micro_batch(samples, packed), loss_fn, False)
            loss.backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                out[f"{layout}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out[f"{layout}_s"] = time.perf_counter() - start
            out[f"{layout}_loss"] = float(loss.detach())
            out[f"{layout}_finite_grads"] = all(
                bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None
            )
            del model, engine, loss
    return out


# ------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", type=Path, default=None, help="real model dir for the noise floor")
    p.add_argument("--checks", default="train_step,noise_floor,vllm_topk,verl_topk")
    p.add_argument("--vocab-size", type=int, default=151_936)  # Qwen3
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--logit-std", type=float, default=4.0)
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prefill-tokens", type=int, default=4096)
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = p.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        for c in checks:
            line(c, "SKIP", reason="no CUDA device")
        return 0
    report: dict[str, Any] = {"torch": torch.__version__, "device": args.device}
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = build_model(args, work / "tiny")
        if "train_step" in checks:
            if importlib.util.find_spec("trl") is None:
                line("train_step", "SKIP", reason="trl not importable (see gpu_smoke.sh wheels)")
            else:
                r = train_step(tiny, work, args)
                ok = r["steps"] == 4 and r["non_finite"] == 0
                failed |= not ok
                peak = max(r["peak_gib_per_step"], default=float("nan"))
                line(
                    "train_step",
                    "PASS" if ok else "FAIL",
                    steps=r["steps"],
                    non_finite=r["non_finite"],
                    peak_gib=peak,
                    wall_s=r["wall_s"],
                )
                report["train_step"] = r
        if "noise_floor" in checks:
            r = noise_floor(args.model or tiny, args)
            for head in ("bf16_head", "fp32_head"):
                ok = r[head]["max_resp_mean"] < DELTA_B / 4 and r["self_D"] == 0.0
                failed |= not ok
                line(f"noise_{head}", "PASS" if ok else "FAIL", **r[head], delta_b=DELTA_B)
            report["noise_floor"] = r
        if "vllm_topk" in checks:
            if importlib.util.find_spec("vllm") is None:
                line("vllm_topk", "SKIP", reason="vllm not importable")
            elif not args.device.startswith("cuda"):
                line("vllm_topk", "SKIP", reason="needs CUDA")
            else:
                r = vllm_topk(tiny, args)
                ok = r["mean_topk_tv"] < DELTA_B / 4
                failed |= not ok
                line("vllm_topk", "PASS" if ok else "FAIL",
                     **{k: v for k, v in r.items() if k != "prefill"})  # fmt: skip
                line("vllm_prefill", "PASS", tokens=args.prefill_tokens, **r["prefill"])
                report["vllm_topk"] = r
        if "verl_topk" in checks:
            if importlib.util.find_spec("verl") is None:
                line("verl_topk", "SKIP", reason="verl not importable")
            else:
                r = verl_topk(tiny, args)
                ok = (
                    all(math.isfinite(r[f"{m}_loss"]) and r[f"{m}_finite_grads"]
                        for m in ("packed", "padded"))
                    and abs(r["packed_loss"] - r["padded_loss"]) <= 1e-4 * max(1.0, abs(r["padded_loss"]))
                )  # fmt: skip
                failed |= not ok
                line("verl_topk", "PASS" if ok else "FAIL", **r)
                report["verl_topk"] = r
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

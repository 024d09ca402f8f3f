"""The project's vLLM paths against the real engine on CPU (vllm-cpu; bash .ci/vllm-cpu builds
its environment): top-K log-probs against an fp32 forward, the trainer's weight sync, the
evaluation CLI, the trainer with Top-K CPPO and in-loop validation through its colocated
engine, and Avg@k from the engine against the transformers backend. Skipped where vLLM's CPU
platform is not installed (the project's main environment).

Models: the unit-test Qwen3 at hidden size 64 (head_dim 32, a size vLLM's CPU attention
supports; the default 32 gives head_dim 16, which it does not).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.platforms import current_platform  # noqa: E402

from evaluation.testing import make_tiny_model, write_train_jsonl  # noqa: E402

pytestmark = [
    pytest.mark.vllm_cpu,
    pytest.mark.skipif(not current_platform.is_cpu(), reason="vLLM's CPU platform only"),
]
ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 64  # head_dim 32
# measured fp32 engine vs fp32 forward on the toy-m model: 3.7e-5 (README, "vLLM on CPU")
LOGPROB_TOL = 1e-4
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 256, "seed": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny") / "model"
    make_tiny_model(path, hidden_size=HIDDEN, seed=0)
    return path


def hf_logprobs(path_or_model, tokenizer, ids: list[int]) -> torch.Tensor:
    """log p(x_t | x_<t) of every position, [len(ids), V], from an fp32 forward."""
    from transformers import AutoModelForCausalLM

    model = path_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def test_engine_topk_logprobs_equal_an_fp32_forward(model_dir):
    from transformers import AutoTokenizer

    llm = vllm.LLM(model=str(model_dir), enable_chunked_prefill=False, **ENGINE)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    params = vllm.SamplingParams(n=4, temperature=1.0, top_p=1.0, max_tokens=24, logprobs=20,
                                 seed=7)  # fmt: skip
    prompts = ["12+30=?", "What is 7 plus 5?", "abc"]
    worst, positions, top_sets_differ = 0.0, 0, 0
    for out in llm.generate(prompts, params):
        prompt_ids = out.prompt_token_ids
        for sample in out.outputs:
            ids = list(prompt_ids) + list(sample.token_ids)
            ref = hf_logprobs(model_dir, tok, ids)
            for t, entries in enumerate(sample.logprobs):
                row = ref[len(prompt_ids) + t - 1]
                for token, lp in entries.items():
                    worst = max(worst, abs(lp.logprob - float(row[token])))
                top = {tid for tid, lp in entries.items() if lp.rank <= 20}
                want = set(torch.topk(row, 20).indices.tolist())
                top_sets_differ += int(len(top) == 20 and top != want)
                positions += 1
    print(f"fp32 engine vs fp32 forward: max |dlogp| {worst:.2e} over {positions} positions")
    assert positions > 50 and worst < LOGPROB_TOL
    assert top_sets_differ == 0


def engine_for(model, tokenizer, **engine):
    """The trainer's engine (cppo.training.engine) around an in-memory model, as the trainer
    builds it."""
    from accelerate import Accelerator

    from cppo.training.engine import EngineGeneration

    return EngineGeneration(
        model=model,
        accelerator=Accelerator(cpu=True),
        processing_class=tokenizer,
        mode="colocate",
        tensor_parallel_size=1,
        gpu_memory_utilization=0.3,
        max_model_length=256,
        max_num_seqs=16,
        enable_sleep_mode=True,  # refused on CPU: the engine turns it off
        temperature=1.0,
        max_completion_length=16,
        engine={"dtype": "float32", "enforce_eager": True, **engine},
    )


def prompt_logprobs(llm, ids: list[int]) -> list[float]:
    """The engine's log p(x_t | x_<t) of a token sequence (positions 1..)."""
    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return [next(iter(d.values())).logprob if d else math.nan for d in out.prompt_logprobs][1:]


def test_the_weight_sync_gives_the_engine_the_trainers_new_weights(model_dir):
    # vLLM on CPU repacks its linear weights, so TRL's per-tensor load_weights fails there;
    # the project's sync reloads the model and re-packs the tied head (cppo.training.engine)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    assert model.config.tie_word_embeddings
    gen = engine_for(model, tok)
    assert gen.enable_sleep_mode is False
    ids = tok("What is 7 plus 5? Answer: 12")["input_ids"]

    def gap() -> float:
        ref = hf_logprobs(model, tok, ids)
        want = [float(ref[t - 1, ids[t]]) for t in range(1, len(ids))]
        got = prompt_logprobs(gen.llm, ids)
        return max(abs(a - b) for a, b in zip(got, want, strict=True))

    assert gap() < LOGPROB_TOL
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    stale = gap()
    assert stale > 100 * LOGPROB_TOL  # the engine still holds the old weights
    gen.sync_weights()
    synced = gap()
    print(f"engine vs trainer: before sync {stale:.3f}, after {synced:.2e}")
    assert synced < LOGPROB_TOL


def test_the_evaluation_cli_runs_on_the_engine(model_dir, tmp_path):
    bench = tmp_path / "tiny.jsonl"
    bench.write_text("".join(
        json.dumps({"id": str(i), "problem": f"{i}+1=?", "answer": str(i + 1)}) + "\n"
        for i in range(6)
    ))  # fmt: skip
    cmd = [sys.executable, "-m", "evaluation", "--model", str(model_dir), "--benchmark-file",
           str(bench), "--k", "4", "--max-new-tokens", "16", "--backend", "vllm", "--dtype",
           "float32", "--enforce-eager", "--max-model-len", "1024", "--grader-workers", "1",
           "--no-progress", "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "tiny.summary.json").read_text())
    assert summary["n_samples"] == 6 * 4 and summary["k"] == 4
    lines = (tmp_path / "out" / "tiny.samples.jsonl").read_text().splitlines()
    assert len(lines) == 24


def test_the_trainer_runs_topk_cppo_with_validation_through_its_engine(model_dir, tmp_path):
    from cppo.run.config import validate_run_config
    from cppo.run.metrics import read_metrics
    from cppo.training.run import run_training

    data = write_train_jsonl(tmp_path / "train.jsonl", 8)
    bench = tmp_path / "val.jsonl"
    bench.write_text("".join(
        json.dumps({"id": str(i), "problem": f"{i}+1", "answer": str(i + 1)}) + "\n"
        for i in range(4)
    ))  # fmt: skip
    cfg = validate_run_config({
        "output_dir": str(tmp_path / "run"), "model": str(model_dir), "train_data": str(data),
        "method": {"rule": "cppo", "delta": 0.05, "delta_b": 0.01},  # Top-K TV, K = 20
        "schedule": {"prompts_per_iter": 4, "n": 4, "minibatch": 2, "updates_per_iter": 2,
                     "iterations": 2, "max_completion_length": 12, "learning_rate": 2e-2},
        "validation": {"every": 2, "benchmarks": [str(bench)], "k": 2, "batch_size": 8},
        "backend": "vllm", "use_cpu": True, "threads": 1,
        "vllm": {"dtype": "float32", "enforce_eager": True, "max_model_length": 1024,
                 "gpu_memory_utilization": 0.3},
    })  # fmt: skip
    run_dir = run_training(cfg, progress=False)
    assert (run_dir / "DONE").exists()
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics.train] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics.validation] == [0, 2, 4]  # through the colocated engine
    for rec in metrics.train:
        # mu is the engine's; the trainer recomputes it: fp32 against fp32, to rounding
        assert rec["logprob/rel_error"] is not None and rec["logprob/rel_error"] < 1e-4
        assert rec["logprob/engine_topk_tv"] is not None and rec["logprob/engine_topk_tv"] < 1e-4
    # the on-policy step of the second iteration sees the synced weights: |rho - 1| stays at
    # rounding level, as at step 1 (a stale engine would show the first update's drift)
    assert metrics.train[2]["ratio/abs_dev_mean"] < 1e-3
    assert metrics.train[1]["ratio/abs_dev_mean"] > 10 * metrics.train[2]["ratio/abs_dev_mean"]


def test_avg_at_k_from_the_engine_equals_transformers_in_expectation(tmp_path):
    # a model taught to answer 1 or 2 with probability 1/2 each: both backends must give
    # Avg@k ~ 1/2 on gold "1" (an interval test: the backends seed differently)
    from evaluation.backends import get_backend
    from evaluation.runner import evaluate_benchmark

    path = coin_model(tmp_path / "coin")
    bench = tmp_path / "coin.jsonl"
    bench.write_text("".join(
        json.dumps({"id": str(i), "problem": "flip", "answer": "1"}) + "\n" for i in range(16)
    ))  # fmt: skip
    common = {"k": 16, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12, "seed": 0,
              "grader_workers": 1, "prompt_style": "raw", "chat_template": False}  # fmt: skip
    engine = get_backend("vllm", model=str(path), **ENGINE, progress=False)
    hf = get_backend("transformers", model=str(path), batch_size=64, dtype="float32")
    rates = {}
    for name, backend in (("vllm", engine), ("transformers", hf)):
        rates[name] = evaluate_benchmark(backend, str(bench), **common).summary["avg_at_k"]
    n = 16 * 16
    se = math.sqrt(0.25 / n + 0.25 / n)
    print(f"Avg@16 on the coin model: {rates}")
    assert all(0.3 < r < 0.7 for r in rates.values())
    assert abs(rates["vllm"] - rates["transformers"]) < 4 * se


def coin_model(out: Path) -> Path:
    """The tiny model trained briefly on one prompt answered "Answer: 1" or "Answer: 2" in
    equal shares, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tiny_model(out, hidden_size=HIDDEN, seed=3)
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    prompt = tok("flip")["input_ids"]
    seqs = [prompt + tok(f"Answer: {a}")["input_ids"] + [tok.eos_token_id] for a in (1, 2)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.tensor(seqs)  # both answers in every step: the optimum is 1/2 each
    for _ in range(150):
        logits = model(ids).logits[:, len(prompt) - 1 : -1]
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), ids[:, len(prompt) :].flatten()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    return out

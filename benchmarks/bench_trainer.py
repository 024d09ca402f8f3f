"""Step time and peak memory of the trainer with Qwen3's vocabulary (151,936) on CPU.

Variants (same tiny Qwen3, same schedule, same rollouts per seed):
  stock    TRL's GRPOTrainer (loss_type dapo, clip 0.2/0.28, beta 0), no mu recording
  grpo-noD CPPOTrainer, grpo rule, no divergence diagnostics (sampled-token mu only)
  grpo     CPPOTrainer, grpo rule, Top-K TV (K=20) recorded for diagnostics (the default)
  cppo     CPPOTrainer, cppo rule, Top-K TV (K=20)

Each variant runs in its own process (clean peak RSS). Step time = time per optimizer step
(rollout generation amortised over the iteration's updates), averaged after a warm-up iteration,
as process CPU time (robust on a shared machine) and wall time.
Peak memory = the process's peak RSS during training minus its RSS just before (VmHWM reset).

    python benchmarks/bench_trainer.py [--vocab 151936] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("stock", "grpo-noD", "grpo", "cppo")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def parity_reward(prompts, completions, completion_ids, **kwargs):
    return [1.0 if ids[0] % 2 == 0 else -1.0 for ids in completion_ids]


def run_variant(variant: str, vocab: int, work: Path, seed: int, completion: int) -> dict:
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from cppo.run.config import validate_run_config
    from cppo.training.config import grpo_config_from_run
    from cppo.training.data import build_train_dataset
    from cppo.training.lmhead import HeadCapture
    from evaluation.testing import make_tiny_model, write_train_jsonl

    model_dir = work / "model"
    if not model_dir.exists():
        make_tiny_model(model_dir, vocab_size=vocab, hidden_size=64, num_hidden_layers=2, seed=0)
    data = write_train_jsonl(work / "train.jsonl", 64)
    method = {"rule": "cppo" if variant == "cppo" else "grpo"}
    cfg = validate_run_config(
        {
            "output_dir": str(work / f"run-{variant}"),
            "model": str(model_dir),
            "train_data": str(data),
            "method": method,
            "seed": seed,
            "schedule": {
                "prompts_per_iter": 4,
                "n": 4,
                "minibatch": 2,
                "updates_per_iter": 2,
                "iterations": 4,
                "max_completion_length": completion,
                "micro_batch": 8,
                "learning_rate": 1e-3,
            },
            "save_every": 100,
            "diagnostics": {"divergence_all_methods": variant != "grpo-noD", "deviation_bins": 10},
        }
    )
    args, _ = grpo_config_from_run(cfg)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    ds, _ = build_train_dataset(data, tok, max_prompt_length=64)

    step_times: list[float] = []
    step_cpu: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, a, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)
            step_cpu.append(time.process_time() - self.c0)

    hook_time = [0.0]
    original_hook = HeadCapture._hook

    def timed_hook(self, *a, **kw):
        t = time.process_time()
        try:
            return original_hook(self, *a, **kw)
        finally:
            hook_time[0] += time.process_time() - t

    HeadCapture._hook = timed_hook
    if variant == "stock":
        from trl import GRPOConfig, GRPOTrainer

        keys = [
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "steps_per_generation",
            "num_generations",
            "max_steps",
            "max_completion_length",
            "temperature",
            "top_p",
            "top_k",
            "learning_rate",
            "weight_decay",
            "max_grad_norm",
            "lr_scheduler_type",
            "warmup_steps",
            "seed",
            "use_cpu",
            "bf16",
            "gradient_checkpointing",
            "scale_rewards",
            "beta",
            "model_init_kwargs",
            "disable_dropout",
            "mask_truncated_completions",
            "epsilon",
            "epsilon_high",
            "output_dir",
        ]
        stock_args = GRPOConfig(
            **{k: getattr(args, k) for k in keys},
            loss_type="dapo",
            vllm_importance_sampling_correction=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=str(model_dir),
            reward_funcs=[parity_reward],
            args=stock_args,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[Clock()],
        )
    else:
        from cppo.training.trainer import CPPOTrainer

        args.save_strategy = "no"
        trainer = CPPOTrainer(
            model=str(model_dir),
            args=args,
            train_dataset=ds,
            processing_class=tok,
            reward_funcs=[parity_reward],
            callbacks=[Clock()],
            progress=False,
        )
    torch.manual_seed(seed)
    rss_before = _rss_kib("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    measured = step_times[2:]  # skip the first iteration (warm-up)
    cpu = step_cpu[2:]
    return {
        "variant": variant,
        "step_s": sum(measured) / len(measured),
        "step_cpu_s": sum(cpu) / len(cpu),
        "train_s": total,
        "hook_s": hook_time[0],
        "peak_extra_mib": (peak - rss_before) / 1024,
        "peak_rss_mib": peak / 1024,
        "steps": len(step_times),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--completion", type=int, default=32, help="max completion tokens")
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    ns = ap.parse_args()
    if ns.variant:
        import torch

        torch.set_num_threads(ns.threads)
        res = run_variant(ns.variant, ns.vocab, Path(ns.work), ns.seed, ns.completion)
        print("RESULT " + json.dumps(res))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(ns.threads), HF_HUB_DISABLE_TELEMETRY="1")
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as work:
        for rep in range(ns.repeats):
            for variant in VARIANTS:  # interleaved so drifting machine load hits all variants
                cmd = [
                    sys.executable,
                    __file__,
                    "--variant",
                    variant,
                    "--work",
                    work,
                    "--vocab",
                    str(ns.vocab),
                    "--threads",
                    str(ns.threads),
                    "--seed",
                    str(ns.seed),
                    "--completion",
                    str(ns.completion),
                ]
                out = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, check=True
                ).stdout
                line = next(x for x in out.splitlines() if x.startswith("RESULT "))
                results[variant].append(json.loads(line[7:]))
                print(f"rep {rep} {variant}: {results[variant][-1]}", file=sys.stderr)
    print(
        f"vocab {ns.vocab}, completion {ns.completion} tokens, 8 completions per optimizer step, "
        f"{ns.threads} thread(s), best of {ns.repeats}"
    )
    print(
        f"{'variant':<10} {'CPU s/step':>10} {'vs grpo-noD':>12} {'vs grpo':>8} {'wall s/step':>12} "
        f"{'hook CPU s/step':>16} {'peak extra MiB':>15}"
    )
    base = min(r["step_cpu_s"] for r in results["grpo-noD"])
    grpo = min(r["step_cpu_s"] for r in results["grpo"])
    for variant in VARIANTS:
        best = min(results[variant], key=lambda r: r["step_cpu_s"])
        wall = min(r["step_s"] for r in results[variant])
        peak = min(r["peak_extra_mib"] for r in results[variant])
        cpu = best["step_cpu_s"]
        print(
            f"{variant:<10} {cpu:>10.3f} {cpu / base - 1:>+11.1%} {cpu / grpo - 1:>+8.1%} {wall:>12.3f} "
            f"{best['hook_s'] / best['steps']:>16.3f} {peak:>15.0f}"
        )


if __name__ == "__main__":
    main()

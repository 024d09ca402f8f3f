"""Command line: ``python -m evaluation`` (console script ``cppo-eval``).

Evaluate::

    python -m evaluation --model DIR_OR_HUB_ID --benchmarks val,aime24 \\
        [--benchmark-file PATH ...] --k 16 --temperature 0.7 --top-p 0.95 \\
        --max-new-tokens N --backend transformers --seed 0 --out DIR

writes ``DIR/<benchmark>.summary.json`` and ``DIR/<benchmark>.samples.jsonl`` per benchmark.
An entry of ``--benchmarks`` is a registry name (aime24, aime25, aime26, math500), a JSONL path,
or the stem of a ``--benchmark-file`` (so ``--benchmarks val --benchmark-file data/val.jsonl``
works); every ``--benchmark-file`` is evaluated.

Re-grade saved samples without generating::

    python -m evaluation --regrade DIR/aime24.samples.jsonl --grading-mode math-verify --out DIR2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from evaluation.backends import SAMPLERS
from evaluation.grading import DEFAULT_TIMEOUT, DEFAULT_WORKERS, MODES
from evaluation.runner import (
    DEFAULT_K,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation", description="Avg@k evaluation with hang-proof grading."
    )
    p.add_argument("--model", help="model directory or hub id")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    p.add_argument("--model-name", default=None, help="name recorded in the summaries")
    p.add_argument("--benchmarks", default="", help="comma-separated names, paths or file stems")
    p.add_argument("--benchmark-file", action="append", default=[], help="benchmark JSONL")
    p.add_argument("--source", choices=("auto", "bundled", "hub"), default="auto")
    p.add_argument("--allow-network", action="store_true", help="let loaders read the hub")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="samples per problem")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    p.add_argument("--batch-size", type=int, default=32, help="transformers: sequences per call")
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="generate",
        help="transformers: model.generate (any causal LM) or the KV-cache loop (evaluation.kv_loop)",
    )
    p.add_argument("--device", default=None, help="transformers: e.g. cpu, cuda")
    p.add_argument("--dtype", default=None, help="e.g. float32, bfloat16")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm")
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="vllm (default 0.9; on its CPU platform the RAM share reserved, default 0.1)",
    )
    p.add_argument("--max-model-len", type=int, default=None, help="vllm")
    p.add_argument("--enforce-eager", action="store_true", help="vllm: no graphs / compile")
    p.add_argument(
        "--chunked-prefill",
        choices=("auto", "on", "off"),
        default="auto",
        help="vllm: auto = vLLM's default, off on its CPU platform (seeded requests need it)",
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="vllm: step budget")
    p.add_argument(
        "--cpu-kvcache-space-gib", type=int, default=None, help="vllm on CPU: KV cache GiB"
    )
    p.add_argument("--prompt-style", choices=("dapo", "boxed", "raw"), default=None)
    p.add_argument("--no-chat-template", action="store_true", help="send the raw user text")
    p.add_argument("--grading-mode", choices=MODES, default="both")
    p.add_argument("--grader-timeout", type=float, default=DEFAULT_TIMEOUT)
    p.add_argument("--grader-workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--regrade", action="append", default=[], help="samples JSONL to re-grade")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true")
    return p


def _resolve_benchmarks(args) -> list[tuple[str, str | None]]:
    """(name or path, explicit file) pairs in order, without duplicates."""
    files = {Path(f).stem: f for f in args.benchmark_file}
    wanted: list[tuple[str, str | None]] = []
    for entry in [e.strip() for e in args.benchmarks.split(",") if e.strip()]:
        if entry in files:
            wanted.append((files.pop(entry), None))
        else:
            wanted.append((entry, None))
    wanted.extend((f, None) for f in files.values())
    seen, unique = set(), []
    for item in wanted:
        if item[0] not in seen:
            seen.add(item[0])
            unique.append(item)
    return unique


def _print_table(summaries: list[dict]) -> None:
    from evaluation.metrics import mean_over_benchmarks

    print(
        f"{'benchmark':<24} {'avg@k':>8} {'95% CI':>17} {'n':>6} {'trunc':>6} {'t/o':>4} {'err':>4}"
    )
    for s in summaries:
        lo, hi = s["ci95"]
        print(
            f"{s['benchmark']:<24} {100 * s['avg_at_k']:>7.2f}% [{100 * lo:>6.2f}, {100 * hi:>6.2f}] "
            f"{s['n_samples']:>6} {s['n_truncated']:>6} {s['n_grader_timeouts']:>4} {s['n_grader_errors']:>4}"
        )
    if len(summaries) > 1:
        mean = mean_over_benchmarks({s["benchmark"]: s["avg_at_k"] for s in summaries})
        print(f"{'mean (unweighted)':<24} {100 * mean:>7.2f}%")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = not args.no_progress
    from evaluation.runner import regrade, write_outputs

    summaries = []
    if args.regrade:
        for path in args.regrade:
            result = regrade(
                path,
                grading_mode=args.grading_mode,
                grader_timeout=args.grader_timeout,
                grader_workers=args.grader_workers,
                progress=progress,
            )
            write_outputs(result, args.out)
            summaries.append(result.summary)
        _print_table(summaries)
        return 0

    if not args.model:
        print("error: --model is required (or use --regrade)", file=sys.stderr)
        return 2
    targets = _resolve_benchmarks(args)
    if not targets:
        print("error: no benchmarks given (--benchmarks / --benchmark-file)", file=sys.stderr)
        return 2

    from evaluation.benchmarks import load_benchmark

    # Load (and validate) every benchmark before the model: bad data fails fast.
    loaded = [
        load_benchmark(
            name,
            source=args.source,
            prompt_style=args.prompt_style,
            allow_network=True if args.allow_network else None,
        )
        for name, _ in targets
    ]

    from evaluation.backends import get_backend
    from evaluation.runner import evaluate_benchmark

    if args.backend == "vllm":
        kwargs = {
            "revision": args.revision,
            "tensor_parallel_size": args.tensor_parallel_size,
            "seed": args.seed,
        }
        if args.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        if args.dtype:
            kwargs["dtype"] = args.dtype
        if args.max_model_len:
            kwargs["max_model_len"] = args.max_model_len
        if args.enforce_eager:
            kwargs["enforce_eager"] = True
        if args.chunked_prefill != "auto":
            kwargs["enable_chunked_prefill"] = args.chunked_prefill == "on"
        if args.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
        if args.cpu_kvcache_space_gib:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.cpu_kvcache_space_gib)
    else:
        kwargs = {
            "batch_size": args.batch_size,
            "device": args.device,
            "dtype": args.dtype,
            "revision": args.revision,
            "progress": progress,
            "sampler": args.sampler,
        }
    backend = get_backend(args.backend, model=args.model, tokenizer=args.tokenizer, **kwargs)

    iterator = loaded
    if progress and len(loaded) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(loaded, desc="benchmarks", unit="benchmark")
    for bench in iterator:
        result = evaluate_benchmark(
            backend,
            bench,
            k=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            grading_mode=args.grading_mode,
            grader_timeout=args.grader_timeout,
            grader_workers=args.grader_workers,
            chat_template=not args.no_chat_template,
            model_name=args.model_name or args.model,
            progress=progress,
        )
        summary_path, _ = write_outputs(result, args.out)
        summaries.append(result.summary)
        if progress:
            print(f"wrote {summary_path}", file=sys.stderr)
    _print_table(summaries)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluate a backend on benchmarks: prompts -> k samples -> grades -> Avg@k summary.

Outputs per (model, benchmark): ``<benchmark>.summary.json`` with exactly the keys in
:data:`SUMMARY_KEYS`, and ``<benchmark>.samples.jsonl`` with one row per sample (see
:data:`SAMPLE_KEYS`), from which :func:`regrade` recomputes the summary without generating.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evaluation import metrics
from evaluation.backends import Sample
from evaluation.benchmarks import Benchmark, load_benchmark
from evaluation.grading import DEFAULT_MODE, DEFAULT_TIMEOUT, DEFAULT_WORKERS, grade_batch
from evaluation.prompting import build_prompts

# The paper's validation protocol (16 samples, T=0.7, top-p 0.95); 8k = its T_max for the
# 1.7B/8B models. Callers at toy scale pass their own max_new_tokens.
DEFAULT_K = 16
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95
DEFAULT_MAX_NEW_TOKENS = 8192

SUMMARY_KEYS = (
    "model",
    "benchmark",
    "k",
    "n_problems",
    "n_samples",
    "avg_at_k",
    "ci95",
    "pass_at_k",
    "n_truncated",
    "n_grader_timeouts",
    "n_grader_errors",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "grading_mode",
)
SAMPLE_KEYS = (
    "id",
    "sample",
    "gold",
    "completion",
    "extracted",
    "correct",
    "dapo_correct",
    "math_verify_correct",
    "grader_status",
    "truncated",
    "n_tokens",
)


@dataclass
class EvalResult:
    summary: dict
    samples: list[dict]

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        return write_outputs(self, out_dir)


def sample_row(problem_row: dict, index: int, sample: Sample) -> dict:
    """An ungraded :data:`SAMPLE_KEYS` row for sample ``index`` of a benchmark problem."""
    return {
        "id": problem_row["id"],
        "sample": index,
        "gold": problem_row["answer"],
        "completion": sample.text,
        "extracted": None,
        "correct": False,
        "dapo_correct": False,
        "math_verify_correct": None,
        "grader_status": "ok",
        "truncated": bool(sample.truncated),
        "n_tokens": int(sample.n_tokens),
    }


def summarise(
    samples: list[dict],
    *,
    model: str,
    benchmark: str,
    k: int,
    temperature: float | None,
    top_p: float | None,
    max_new_tokens: int | None,
    seed: int | None,
    grading_mode: str,
    n_timeouts: int,
    n_errors: int,
) -> dict:
    """The :data:`SUMMARY_KEYS` summary of graded rows (only "id", "correct" and "truncated" are
    read). Problems are taken in order of first appearance: the bootstrap interval depends on it.
    """
    by_problem: dict[str, list[bool]] = {}
    for row in samples:
        by_problem.setdefault(row["id"], []).append(bool(row["correct"]))
    correct = list(by_problem.values())
    summary = {
        "model": model,
        "benchmark": benchmark,
        "k": k,
        "n_problems": len(correct),
        "n_samples": len(samples),
        "avg_at_k": metrics.avg_at_k(correct),
        "ci95": list(metrics.bootstrap_ci(correct, seed=0)),
        "pass_at_k": metrics.pass_at_ks(correct),
        "n_truncated": sum(bool(r["truncated"]) for r in samples),
        "n_grader_timeouts": n_timeouts,
        "n_grader_errors": n_errors,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "grading_mode": grading_mode,
    }
    assert tuple(summary) == SUMMARY_KEYS
    return summary


def grade_rows(
    rows: list[dict], *, mode: str, timeout: float, workers: int, progress: bool
) -> tuple[int, int]:
    """Grade sample rows in place; returns (grader timeouts, grader errors)."""
    report = grade_batch(
        [r["completion"] for r in rows],
        [r["gold"] for r in rows],
        mode=mode,
        timeout=timeout,
        workers=workers,
        progress=progress,
    )
    for row, res in zip(rows, report.results, strict=True):
        row["extracted"] = res.extracted
        row["correct"] = res.correct
        row["dapo_correct"] = res.dapo_correct
        row["math_verify_correct"] = res.math_verify_correct
        row["grader_status"] = res.status
    return report.n_timeouts, report.n_errors


def evaluate_benchmark(
    backend,
    benchmark: Benchmark | str,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    grading_mode: str = DEFAULT_MODE,
    grader_timeout: float = DEFAULT_TIMEOUT,
    grader_workers: int = DEFAULT_WORKERS,
    prompt_style: str | None = None,
    chat_template: bool = True,
    chat_template_kwargs: dict | None = None,
    model_name: str | None = None,
    progress: bool = False,
) -> EvalResult:
    """Sample ``k`` completions per problem with ``backend`` and grade them."""
    if isinstance(benchmark, str):
        benchmark = load_benchmark(benchmark)
    if k < 1:
        raise ValueError("k must be >= 1")
    prompts = build_prompts(
        benchmark.problems,
        backend.tokenizer,
        style=prompt_style or benchmark.prompt_style,
        chat_template=chat_template,
        chat_template_kwargs=chat_template_kwargs,
    )
    generated = backend.generate(
        prompts,
        n=k,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    rows = []
    for problem_row, samples in zip(benchmark.rows, generated, strict=True):
        if len(samples) != k:
            raise RuntimeError(f"backend returned {len(samples)} samples, expected {k}")
        rows.extend(sample_row(problem_row, j, sample) for j, sample in enumerate(samples))
    n_timeouts, n_errors = grade_rows(
        rows, mode=grading_mode, timeout=grader_timeout, workers=grader_workers, progress=progress
    )
    summary = summarise(
        rows,
        model=model_name or getattr(backend, "name", ""),
        benchmark=benchmark.name,
        k=k,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        grading_mode=grading_mode,
        n_timeouts=n_timeouts,
        n_errors=n_errors,
    )
    return EvalResult(summary, rows)


def evaluate_model(
    model,
    tokenizer,
    benchmarks: Sequence[str | Benchmark],
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    top_p: float = DEFAULT_TOP_P,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    seed: int = 0,
    batch_size: int = 64,
    grading_mode: str = DEFAULT_MODE,
    grader_timeout: float = DEFAULT_TIMEOUT,
    grader_workers: int = DEFAULT_WORKERS,
    chat_template_kwargs: dict | None = None,
    model_name: str | None = None,
) -> dict[str, dict]:
    """Avg@k summaries of an in-memory model (trainer in-loop validation).

    Generation is batched (``batch_size`` sequences per ``generate`` call, prompts x samples
    flattened), under ``torch.random.fork_rng`` (the trainer's RNG stream is not consumed) and
    with the model's train/eval mode restored afterwards. Grading uses the DAPO fast path in
    this process and the process-wide grader pool for the rest: the pool is started once per
    process and reused by every later call, so repeated validation pays no process start-up.
    ``chat_template_kwargs`` go to ``apply_chat_template`` (e.g. ``{"enable_thinking": False}``
    for Qwen3, as in training). Returns ``{benchmark name: summary}``; the unweighted mean is
    ``evaluation.metrics.mean_over_benchmarks({n: s["avg_at_k"] for n, s in result.items()})``.
    """
    from evaluation.backends import TransformersBackend

    backend = TransformersBackend(model, tokenizer, batch_size=batch_size)
    results = {}
    for bench in benchmarks:
        loaded = bench if isinstance(bench, Benchmark) else load_benchmark(bench)
        result = evaluate_benchmark(
            backend,
            loaded,
            k=k,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            grading_mode=grading_mode,
            grader_timeout=grader_timeout,
            grader_workers=grader_workers,
            chat_template_kwargs=chat_template_kwargs,
            model_name=model_name,
        )
        results[loaded.name] = result.summary
    return results


# ------------------------------------------------------------------ files


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def output_paths(out_dir: str | os.PathLike, benchmark: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{benchmark}.summary.json", out / f"{benchmark}.samples.jsonl"


def write_outputs(result: EvalResult, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write the samples JSONL, then the summary JSON (the summary's presence means done)."""
    summary_path, samples_path = output_paths(out_dir, result.summary["benchmark"])
    lines = [
        json.dumps({key: row[key] for key in SAMPLE_KEYS}, ensure_ascii=False)
        for row in result.samples
    ]
    _atomic_write(samples_path, "\n".join(lines) + ("\n" if lines else ""))
    _atomic_write(summary_path, json.dumps(result.summary, indent=2) + "\n")
    return summary_path, samples_path


def load_samples(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    missing = [
        key
        for key in ("id", "sample", "gold", "completion", "truncated")
        if rows and key not in rows[0]
    ]
    if missing:
        raise ValueError(f"{path}: sample rows lack {missing}")
    return rows


def regrade(
    samples_path: str | os.PathLike,
    *,
    grading_mode: str = DEFAULT_MODE,
    grader_timeout: float = DEFAULT_TIMEOUT,
    grader_workers: int = DEFAULT_WORKERS,
    progress: bool = False,
) -> EvalResult:
    """Re-grade a ``<benchmark>.samples.jsonl`` without generating.

    Sampling settings (model, temperature, ...) are taken from the neighbouring
    ``<benchmark>.summary.json`` when it exists, else left as None.
    """
    samples_path = Path(samples_path)
    rows = load_samples(samples_path)
    if not rows:
        raise ValueError(f"{samples_path}: no samples")
    stem = samples_path.name.removesuffix(".samples.jsonl")
    old_summary_path = samples_path.with_name(f"{stem}.summary.json")
    old = json.loads(old_summary_path.read_text()) if old_summary_path.exists() else {}
    n_timeouts, n_errors = grade_rows(
        rows, mode=grading_mode, timeout=grader_timeout, workers=grader_workers, progress=progress
    )
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["id"]] = counts.get(row["id"], 0) + 1
    k = old.get("k", min(counts.values()))
    summary = summarise(
        rows,
        model=old.get("model", ""),
        benchmark=old.get("benchmark", stem),
        k=k,
        temperature=old.get("temperature"),
        top_p=old.get("top_p"),
        max_new_tokens=old.get("max_new_tokens"),
        seed=old.get("seed"),
        grading_mode=grading_mode,
        n_timeouts=n_timeouts,
        n_errors=n_errors,
    )
    return EvalResult(summary, rows)

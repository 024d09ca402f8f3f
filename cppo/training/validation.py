"""In-loop validation: Avg@k on the configured benchmarks through the evaluation package.

The trainer calls `ValidationFn(model, tokenizer, benchmarks, k=..., temperature=..., top_p=...,
max_new_tokens=..., seed=..., batch_size=...) -> {benchmark name: summary}`; the default is
`evaluation.runner.evaluate_model` (the in-memory transformers path). With a colocated vLLM
engine, `vllm_engine_validation` evaluates through that engine instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

ValidationFn = Callable[..., dict[str, dict[str, Any]]]


def evaluate_in_memory(
    model: Any, tokenizer: Any, benchmarks: list[str], **kw: Any
) -> dict[str, dict]:
    """Avg@k of an in-memory model with evaluation.runner.evaluate_model."""
    from evaluation.runner import evaluate_model

    return evaluate_model(model, tokenizer, list(benchmarks), **kw)


def vllm_engine_validation(llm: Any) -> ValidationFn | None:
    """A ValidationFn sampling with an existing vLLM engine, or None if the evaluation package's
    vLLM backend cannot wrap a live engine (the caller then falls back to evaluate_in_memory)."""
    from evaluation.backends import get_backend

    try:
        backend = get_backend("vllm", model=llm)
    except TypeError:
        return None

    def run(model: Any, tokenizer: Any, benchmarks: list[str], **kw: Any) -> dict[str, dict]:
        from evaluation.benchmarks import load_benchmark
        from evaluation.runner import evaluate_benchmark

        kw.pop("batch_size", None)  # vLLM schedules its own batches
        out = {}
        for name in benchmarks:
            bench = load_benchmark(name)
            out[bench.name] = evaluate_benchmark(backend, bench, **kw).summary
        return out

    return run


def validation_record(step: int, summaries: dict[str, dict[str, Any]], k: int) -> dict[str, Any]:
    """The metrics.jsonl validation record for one evaluation round."""
    rec: dict[str, Any] = {"kind": "validation", "step": int(step)}
    values = []
    for name, summary in summaries.items():
        value = float(summary["avg_at_k"])
        rec[f"val/{name}"] = value
        values.append(value)
    rec["val/mean"] = sum(values) / len(values) if values else None
    rec["val/k"] = int(k)
    return rec


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Validation sampling must not perturb the training RNG streams (resume equality)."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

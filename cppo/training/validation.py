"""In-loop validation: Avg@k on the configured benchmarks through the evaluation package.

The trainer calls a user-supplied `ValidationFn(model, tokenizer, benchmarks, k=...,
temperature=..., top_p=..., max_new_tokens=..., seed=..., batch_size=...) -> {benchmark name:
summary}` on the main process only, with exactly these keywords. The two built-in ones also get
the run's `chat_template_kwargs=` (when set), `shard=` (a `Shard`) and, in memory,
`synced_gpus=False`; they run on every process, each sampling and grading its share of
the (problem, sample) pairs; the per-sample grades are gathered
(`torch.distributed.all_gather_object`) and the main process computes the summaries (the others
get None):

- `evaluate_in_memory`: the in-memory model, sampled by the KV-cache loop of
  evaluation.kv_loop (`sampler="kv_loop"`, what the trainer passes by default: shard `i`
  seeds batch `b` with batch_seed(seed + i, b)) or by transformers `generate`
  (`sampler="generate"`). With `generate` and one shard it is exactly
  `evaluation.runner.evaluate_model`. With several, shard `i` takes a contiguous block
  of whole problems and samples them with seed `seed + i` (the transformers backend seeds per
  generation batch, so results depend on the number of shards).
- `vllm_engine_validation(llm)`: through a live vLLM engine (the trainer's colocated one, synced
  to the current weights). Every (problem, sample) pair has its own seed
  (`evaluation.backends.sample_seed`), so the summaries do not depend on the number of shards.
  The ranks of one tensor-parallel group share an engine and must send it identical requests:
  they form one shard (`Shard.group_size`) and only the group's first rank's grades are used.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ValidationFn = Callable[..., dict[str, dict[str, Any]] | None]
# (problem index, first sample index, number of samples): a run of consecutive samples
Run = tuple[int, int, int]
GenerateRuns = Callable[[list[str], list[Run]], list[list[Any]]]
Gather = Callable[[Any], list[Any]]


@dataclass(frozen=True)
class Shard:
    """This process's place in sharded validation.

    `group_size` consecutive ranks form one shard: the ranks of a vLLM tensor-parallel group
    (TRL builds its TP groups as [0..tp-1], [tp..2tp-1], ...) drive one engine together.
    """

    rank: int = 0
    world_size: int = 1
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.world_size % self.group_size:
            raise ValueError(
                f"group_size {self.group_size} must divide the world size {self.world_size}"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a world of {self.world_size}")

    @property
    def index(self) -> int:
        return self.rank // self.group_size

    @property
    def count(self) -> int:
        return self.world_size // self.group_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, group_size: int = 1) -> Shard:
        """From the default torch.distributed process group (one process without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), group_size)
        return cls(0, 1, group_size)


def all_gather(obj: Any) -> list[Any]:
    """`obj` from every process, in rank order (torch.distributed.all_gather_object)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shard_runs(
    n_problems: int, k: int, index: int, count: int, *, whole_problems: bool
) -> list[Run]:
    """Shard `index` of `count` of the n_problems x k (problem, sample) pairs, as runs.

    The pairs are taken in order (problem-major) and cut into `count` contiguous blocks of
    near-equal size: of pairs, or of whole problems when `whole_problems`. Contiguous blocks keep
    the samples of a problem together (one engine request per run, shared prompt prefix).
    """
    if whole_problems:
        lo, hi = index * n_problems // count, (index + 1) * n_problems // count
        return [(p, 0, k) for p in range(lo, hi)]
    total = n_problems * k
    u, hi = index * total // count, (index + 1) * total // count
    runs: list[Run] = []
    while u < hi:
        problem, first = divmod(u, k)
        n = min(k - first, hi - u)
        runs.append((problem, first, n))
        u += n
    return runs


def evaluate_sharded(
    generate_runs: GenerateRuns,
    tokenizer: Any,
    benchmarks: Sequence[Any],
    *,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    shard: Shard,
    whole_problems: bool,
    model_name: str = "",
    chat_template_kwargs: dict | None = None,
    grading_mode: str | None = None,
    grader_timeout: float | None = None,
    grader_workers: int | None = None,
    gather: Gather = all_gather,
) -> dict[str, dict] | None:
    """Sample and grade this shard's pairs, gather the grades, summarise on the main process.

    Every process must call this with the same arguments except `shard.rank` (it takes part in
    one gather). Returns {benchmark name: summary} on the main process, None on the others.
    The summary is the one `evaluation.runner.evaluate_benchmark` computes from the same
    samples: rows are put back in (problem, sample) order before summarising.
    """
    from evaluation import grading
    from evaluation.benchmarks import Benchmark, load_benchmark
    from evaluation.prompting import build_prompts
    from evaluation.runner import grade_rows, sample_row, summarise

    mode = grading_mode or grading.DEFAULT_MODE
    timeout = grader_timeout if grader_timeout is not None else grading.DEFAULT_TIMEOUT
    workers = grader_workers if grader_workers is not None else grading.DEFAULT_WORKERS
    if k < 1:
        raise ValueError("k must be >= 1")
    loaded = [b if isinstance(b, Benchmark) else load_benchmark(b) for b in benchmarks]
    local = []
    for bench in loaded:
        prompts = build_prompts(
            bench.problems,
            tokenizer,
            style=bench.prompt_style,
            chat_template_kwargs=chat_template_kwargs,
        )
        runs = shard_runs(len(prompts), k, shard.index, shard.count, whole_problems=whole_problems)
        generated = generate_runs(prompts, runs) if runs else []
        rows, where = [], []
        for (problem, first, n), samples in zip(runs, generated, strict=True):
            if len(samples) != n:
                raise RuntimeError(f"backend returned {len(samples)} samples, expected {n}")
            for j, sample in enumerate(samples):
                rows.append(sample_row(bench.rows[problem], first + j, sample))
                where.append((problem, first + j))
        n_timeouts, n_errors = (
            grade_rows(rows, mode=mode, timeout=timeout, workers=workers, progress=False)
            if rows
            else (0, 0)
        )
        # only what the summary reads travels: (problem, sample, correct, truncated)
        graded = [
            (p, s, bool(r["correct"]), bool(r["truncated"]))
            for (p, s), r in zip(where, rows, strict=True)
        ]
        local.append((graded, n_timeouts, n_errors))
    parts = gather(local) if shard.world_size > 1 else [local]
    if len(parts) != shard.world_size:
        raise RuntimeError(f"gathered {len(parts)} parts from {shard.world_size} processes")
    if not shard.is_main:
        return None
    leaders = parts[:: shard.group_size]  # a TP group's ranks hold identical copies
    summaries = {}
    for b, bench in enumerate(loaded):
        graded = sorted(g for part in leaders for g in part[b][0])
        expected = [(p, s) for p in range(len(bench.rows)) for s in range(k)]
        if [(p, s) for p, s, _, _ in graded] != expected:
            raise RuntimeError(f"{bench.name}: the shards do not cover each (problem, sample) once")
        rows = [
            {"id": bench.rows[p]["id"], "correct": correct, "truncated": truncated}
            for p, _, correct, truncated in graded
        ]
        summaries[bench.name] = summarise(
            rows,
            model=model_name,
            benchmark=bench.name,
            k=k,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            grading_mode=mode,
            n_timeouts=sum(part[b][1] for part in leaders),
            n_errors=sum(part[b][2] for part in leaders),
        )
    return summaries


def evaluate_in_memory(
    model: Any,
    tokenizer: Any,
    benchmarks: list[str],
    *,
    shard: Shard | None = None,
    gather: Gather = all_gather,
    synced_gpus: bool | None = None,
    sampler: str = "generate",
    **kw: Any,
) -> dict[str, dict] | None:
    """Avg@k of an in-memory model, sampled by transformers `generate` or (`sampler="kv_loop"`)
    the KV-cache loop of evaluation.kv_loop.

    With `generate` and no `shard`, or a single one, this is evaluation.runner.evaluate_model
    (same samples, same summaries). Otherwise every process must call it (see the module
    docstring); shard `i` takes whole problems. `generate` samples them with seed `seed + i`;
    the loop draws `batch_size` samples per call (a problem's samples together, so its prompt
    is prefilled once), call `b` from a generator seeded with batch_seed(seed + i, b).
    `synced_gpus` goes to every `generate` call of the sharded path
    (TransformersBackend.generate): pass False when each process holds the whole model (ZeRO-3
    weights gathered for generation), since transformers' ZeRO-3 default steps all processes
    together, which cannot work when they sample different problems, make different numbers
    of calls, or (a shard without problems) none at all.
    """
    from evaluation.backends import SAMPLERS, TransformersBackend
    from evaluation.runner import evaluate_model

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "generate" and (shard is None or shard.count == 1):
        # one process: transformers syncs nothing without other processes
        return evaluate_model(model, tokenizer, list(benchmarks), **kw)
    shard = shard or Shard()
    backend = TransformersBackend(
        model, tokenizer, batch_size=kw.pop("batch_size", 64), sampler=sampler
    )
    k, seed = int(kw.pop("k")), int(kw.pop("seed", 0))
    sampling = {key: kw.pop(key) for key in ("temperature", "top_p", "max_new_tokens")}
    model_name = kw.pop("model_name", None) or backend.name

    def generate_runs(prompts: list[str], runs: list[Run]) -> list[list[Any]]:
        # whole problems: every run is (problem, 0, k)
        return backend.generate(
            [prompts[p] for p, _, _ in runs],
            n=k,
            seed=seed + shard.index,
            synced_gpus=synced_gpus,
            **sampling,
        )

    return evaluate_sharded(
        generate_runs,
        tokenizer,
        benchmarks,
        k=k,
        seed=seed,
        shard=shard,
        whole_problems=True,
        model_name=model_name,
        gather=gather,
        **sampling,
        **kw,
    )


def vllm_engine_validation(
    llm: Any, *, sampling_params: Callable[..., object] | None = None
) -> ValidationFn:
    """A ValidationFn sampling with a live vLLM engine (evaluation's vllm backend wraps it).

    The function takes the trainer's tokenizer (prompts are tokenised as in training) and
    `shard=` (default: one process); `model` is ignored (the engine holds the weights) and so is
    `batch_size` (vLLM schedules its own batches). `sampling_params` replaces
    `vllm.SamplingParams` (tests).
    """
    from evaluation.backends import SampleRequest, get_backend, sample_seed

    def run(
        model: Any,
        tokenizer: Any,
        benchmarks: list[str],
        *,
        k: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        shard: Shard | None = None,
        gather: Gather = all_gather,
        batch_size: int | None = None,
        model_name: str | None = None,
        **kw: Any,
    ) -> dict[str, dict] | None:
        backend = get_backend(
            "vllm", model=llm, tokenizer=tokenizer, sampling_params=sampling_params, progress=False
        )

        def generate_runs(prompts: list[str], runs: list[Run]) -> list[list[Any]]:
            requests = [
                SampleRequest(prompts[p], n, sample_seed(seed, p, first, k)) for p, first, n in runs
            ]
            return backend.generate_requests(
                requests, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
            )

        return evaluate_sharded(
            generate_runs,
            backend.tokenizer,
            benchmarks,
            k=k,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            shard=shard or Shard(),
            whole_problems=False,
            model_name=model_name or backend.name,
            gather=gather,
            **kw,
        )

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

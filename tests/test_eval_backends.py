"""Sampling backends: transformers generate on a tiny CPU model; vLLM adapter against a fake."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from fake_vllm import FakeEngine, FakeSamplingParams

from evaluation import kv_loop
from evaluation.backends import (
    Sample,
    TransformersBackend,
    VLLMBackend,
    batch_seed,
    get_backend,
    sample_seed,
)
from evaluation.testing import make_char_tokenizer, make_tiny_model

torch.set_num_threads(1)

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [
    CHAT.format("What is 2+2?"),
    CHAT.format("A much longer question about numbers, please."),
]


@pytest.fixture(scope="module")
def tiny():
    model, tok = make_tiny_model(seed=3)
    return model, tok


def _greedy_reference(model, tok, prompt: str, max_new: int) -> tuple[str, int, bool]:
    """Token-by-token argmax with full forward passes: no cache, no padding, no generate()."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tok.eos_token_id:
                return tok.decode(out[:-1], skip_special_tokens=True), len(out), False
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True), len(out), True


def test_greedy_matches_a_manual_decoding_loop(tiny):
    model, tok = tiny
    backend = TransformersBackend(model, tok, batch_size=4)
    got = backend.generate(PROMPTS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
    for prompt, samples in zip(PROMPTS, got, strict=True):
        text, n_tokens, truncated = _greedy_reference(model, tok, prompt, 12)
        for sample in samples:  # left padding in a mixed-length batch must not change anything
            assert sample == Sample(text, n_tokens, truncated)


def test_kv_loop_greedy_matches_a_manual_decoding_loop(tiny):
    model, tok = tiny
    backend = TransformersBackend(model, tok, batch_size=3, sampler="kv_loop")
    got = backend.generate(PROMPTS, n=2, temperature=0.0, top_p=1.0, max_new_tokens=12, seed=0)
    for prompt, samples in zip(PROMPTS, got, strict=True):
        text, n_tokens, truncated = _greedy_reference(model, tok, prompt, 12)
        assert samples == [Sample(text, n_tokens, truncated)] * 2


def test_kv_loop_batches_prompts_in_order_with_one_seed_per_batch(tiny):
    """Samples of the backend against kv_loop.sample called by hand: prompt order flattened,
    `batch_size` rows per call, call b seeded batch_seed(seed, b); the caller's RNG untouched."""
    model, tok = tiny
    n, size, seed = 3, 4, 11
    backend = TransformersBackend(model, tok, batch_size=size, sampler="kv_loop")
    rng_before = torch.get_rng_state()
    got = backend.generate(PROMPTS, n=n, temperature=0.9, top_p=0.9, max_new_tokens=20, seed=seed)
    assert torch.equal(torch.get_rng_state(), rng_before)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    flat = [ids[p] for p in range(len(PROMPTS)) for _ in range(n)]
    want = []
    for b, start in enumerate(range(0, len(flat), size)):
        out = kv_loop.sample(
            model,
            flat[start : start + size],
            max_new_tokens=20,
            eos_ids=[tok.eos_token_id],
            pad_id=tok.pad_token_id,
            temperature=0.9,
            top_p=0.9,
            generator=torch.Generator().manual_seed(batch_seed(seed, b)),
        )
        want += [backend.to_sample(c, [tok.eos_token_id]) for c in out.completions]
    assert [s for samples in got for s in samples] == want
    assert len({s.text for s in want}) > 1


def test_kv_loop_refuses_models_that_rescale_logits(tiny):
    model, tok = tiny
    model.config.final_logit_softcapping = 30.0
    try:
        with pytest.raises(TypeError, match="final_logit_softcapping"):
            TransformersBackend(model, tok, sampler="kv_loop").generate(
                PROMPTS[:1], n=1, temperature=0.7, top_p=1.0, max_new_tokens=2, seed=0
            )
    finally:
        model.config.final_logit_softcapping = None
    with pytest.raises(ValueError, match="unknown sampler 'vllm'"):
        TransformersBackend(model, tok, sampler="vllm")


def test_length_sorted_batches_return_results_in_prompt_order(tiny):
    # batches are formed shortest prompt first; the results must still follow the input order
    model, tok = tiny
    prompts = [PROMPTS[1], CHAT.format("Hi"), PROMPTS[0], CHAT.format("Two plus two, then three?")]
    backend = TransformersBackend(model, tok, batch_size=1)
    widths = []
    original = model.generate

    def spy(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return original(*args, **kwargs)

    model.generate = spy
    try:
        got = backend.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=10, seed=0)
    finally:
        del model.generate
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert widths == sorted(lengths)  # one prompt per batch, shortest first
    for prompt, samples in zip(prompts, got, strict=True):
        assert samples == [Sample(*_greedy_reference(model, tok, prompt, 10))]


def test_synced_gpus_reaches_generate_only_when_set(tiny):
    # sharded validation under ZeRO-3 turns transformers' synced decoding off; unset, generate
    # keeps its own default
    model, tok = tiny
    backend = TransformersBackend(model, tok, batch_size=2)
    seen = []
    original = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("synced_gpus", "unset"))
        return original(*args, **kwargs)

    model.generate = spy
    kwargs = dict(n=2, temperature=0.7, top_p=0.95, max_new_tokens=4, seed=0)
    try:
        off = backend.generate(PROMPTS, synced_gpus=False, **kwargs)
        default = backend.generate(PROMPTS, **kwargs)
    finally:
        del model.generate
    assert seen == [False, False, "unset", "unset"]  # two batches per call
    assert off == default  # one process: nothing to sync either way


def test_sampling_shapes_truncation_and_seeds(tiny):
    model, tok = tiny
    backend = TransformersBackend(model, tok, batch_size=16)
    kwargs = dict(n=32, temperature=1.0, top_p=1.0, max_new_tokens=40)
    out = backend.generate(PROMPTS, seed=5, **kwargs)
    assert [len(s) for s in out] == [32, 32]
    flat = [s for samples in out for s in samples]
    assert any(s.truncated for s in flat) and any(not s.truncated for s in flat)
    for s in flat:
        if s.truncated:
            assert s.n_tokens == 40
        else:
            assert 1 <= s.n_tokens <= 40  # counts the end-of-sequence token
            assert len(tok(s.text, add_special_tokens=False)["input_ids"]) <= s.n_tokens - 1
    assert backend.generate(PROMPTS, seed=5, **kwargs) == out
    assert backend.generate(PROMPTS, seed=6, **kwargs) != out


def test_caller_state_is_left_alone(tiny):
    model, tok = tiny
    model.train()
    config_before = model.generation_config
    rng_before = torch.get_rng_state()
    TransformersBackend(model, tok).generate(
        PROMPTS[:1], n=2, temperature=0.7, top_p=0.95, max_new_tokens=4, seed=0
    )
    assert model.training
    assert model.generation_config is config_before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert tok.padding_side == "right"
    model.eval()


def test_checkpoint_generation_defaults_do_not_leak(tiny):
    model, tok = tiny
    model.generation_config.top_k = 1  # a checkpoint default that would make sampling greedy
    try:
        ids = tok(PROMPTS[:1] * 6, add_special_tokens=False, return_tensors="pt")["input_ids"]
        torch.manual_seed(0)
        plain = model.generate(ids, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=8)
        # Without our override, the stray top_k=1 collapses every sample onto one sequence ...
        assert len({tuple(r) for r in plain.tolist()}) == 1
        out = TransformersBackend(model, tok).generate(
            PROMPTS[:1], n=6, temperature=0.7, top_p=0.95, max_new_tokens=8, seed=0
        )
        # ... with it, only temperature and top-p apply.
        assert len({s.text for s in out[0]}) > 1
    finally:
        model.generation_config.top_k = None


def test_backend_loads_a_model_directory(tmp_path):
    make_tiny_model(tmp_path / "m", seed=1)
    backend = get_backend("transformers", model=str(tmp_path / "m"), batch_size=8)
    out = backend.generate(PROMPTS[:1], n=3, temperature=0.7, top_p=0.95, max_new_tokens=5, seed=0)
    assert len(out[0]) == 3 and all(isinstance(s, Sample) for s in out[0])
    with pytest.raises(ValueError, match="unknown backend"):
        get_backend("onnx", model="x")


class _FakeLLM:
    instances: list = []

    def __init__(self, model, **kwargs):
        from evaluation.testing import make_char_tokenizer

        self.model, self.kwargs, self.calls = model, kwargs, []
        self._tok = make_char_tokenizer()
        _FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self._tok

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params))
        outputs = []
        for i, p in enumerate(params):
            samples = [
                types.SimpleNamespace(
                    text=f"p{i}s{j}",
                    token_ids=list(range(j + 1)),
                    finish_reason="length" if j % 2 else "stop",
                )
                for j in range(p.n)
            ]
            outputs.append(types.SimpleNamespace(outputs=samples))
        return outputs


def test_vllm_adapter_maps_parameters_and_outputs(monkeypatch):
    fake = types.ModuleType("vllm")
    fake.LLM = _FakeLLM
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = get_backend("vllm", model="some/model", revision="abc", tensor_parallel_size=2)
    llm = _FakeLLM.instances[-1]
    assert llm.kwargs == {"generation_config": "vllm", "revision": "abc", "tensor_parallel_size": 2}
    assert isinstance(backend, VLLMBackend)
    out = backend.generate(PROMPTS, n=3, temperature=0.7, top_p=0.95, max_new_tokens=64, seed=10)
    requests, params = llm.calls[-1]
    tok = llm.get_tokenizer()
    assert requests[0]["prompt_token_ids"] == tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    # problem i's request is seeded seed + i * n: its children take seed + i * n + j
    assert [(p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) for p in params] == [
        (3, 0.7, 0.95, -1, 64, 10),
        (3, 0.7, 0.95, -1, 64, 13),
    ]
    assert out[1] == [Sample("p1s0", 1, False), Sample("p1s1", 2, True), Sample("p1s2", 3, False)]
    with pytest.raises(TypeError, match="live engine"):
        VLLMBackend(object())  # neither a path nor anything with generate()


def test_vllm_backend_takes_a_live_engine_without_importing_vllm(monkeypatch):
    # a live engine (the trainer's colocated one) used to raise TypeError here
    monkeypatch.setitem(sys.modules, "vllm", None)  # any `import vllm` now fails
    tok = make_char_tokenizer()
    engine = FakeEngine(tok)
    backend = get_backend("vllm", model=engine, sampling_params=FakeSamplingParams)
    assert backend.llm is engine and backend.tokenizer is tok
    out = backend.generate(PROMPTS, n=3, temperature=0.7, top_p=0.95, max_new_tokens=9, seed=4)
    requests, params = engine.calls[-1]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert [r["prompt_token_ids"] for r in requests] == ids
    assert [(p.n, p.seed, p.max_tokens, p.top_k) for p in params] == [(3, 4, 9, -1), (3, 7, 9, -1)]
    # every sample is the engine's completion for (prompt, 4 + 3 * problem + sample)
    for i, samples in enumerate(out):
        for j, sample in enumerate(samples):
            ref = FakeEngine.complete(ids[i], 4 + 3 * i + j, 9)
            assert sample == Sample(ref.text, len(ref.token_ids), ref.finish_reason == "length")
    with pytest.raises(ValueError, match="engine options"):
        get_backend("vllm", model=engine, tensor_parallel_size=2)
    with pytest.raises(ImportError):  # a path still needs vLLM itself
        get_backend("vllm", model="some/model")


def test_vllm_sampling_params_are_built_lazily_from_vllm(monkeypatch):
    built = []

    def sampling_params(**kw):
        built.append(kw)
        return FakeSamplingParams(**kw)

    fake = types.ModuleType("vllm")
    fake.SamplingParams = sampling_params
    monkeypatch.setitem(sys.modules, "vllm", fake)
    backend = get_backend("vllm", model=FakeEngine(make_char_tokenizer()), progress=False)
    assert built == []
    backend.generate(PROMPTS[:1], n=2, temperature=0.0, top_p=0.5, max_new_tokens=3, seed=1)
    assert built == [
        dict(n=2, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=3, seed=1)
    ]  # greedy: no nucleus


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_sample_seeds_are_distinct_across_problems(n):
    n_problems, seed = 30, 7
    engine = FakeEngine(make_char_tokenizer())
    backend = get_backend("vllm", model=engine, sampling_params=FakeSamplingParams)
    prompts = [CHAT.format(f"problem {i}") for i in range(n_problems)]
    backend.generate(prompts, n=n, temperature=1.0, top_p=1.0, max_new_tokens=2, seed=seed)
    _, params = engine.calls[-1]
    # vLLM seeds child j of a request with seed + j: list every (problem, sample) seed
    seeds = [p.seed + j for p in params for j in range(p.n)]
    assert len(set(seeds)) == n_problems * n
    assert seeds == list(range(seed, seed + n_problems * n))
    assert seeds == [sample_seed(seed, i, j, n) for i in range(n_problems) for j in range(n)]
    if n > 1:  # the old per-problem seeds (seed + i) alias across problems
        old = [seed + i + j for i in range(n_problems) for j in range(n)]
        assert len(set(old)) < len(old)

"""Sampling backends: transformers generate on a tiny CPU model; vLLM adapter against a fake."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from evaluation.backends import Sample, TransformersBackend, VLLMBackend, get_backend
from evaluation.testing import make_tiny_model

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
    assert [(p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) for p in params] == [
        (3, 0.7, 0.95, -1, 64, 10),
        (3, 0.7, 0.95, -1, 64, 11),
    ]
    assert out[1] == [Sample("p1s0", 1, False), Sample("p1s1", 2, True), Sample("p1s2", 3, False)]
    with pytest.raises(TypeError):
        VLLMBackend(object())

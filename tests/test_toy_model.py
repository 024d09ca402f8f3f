"""The toy model factory: presets build real Qwen3 / Qwen3-MoE models that load and generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cppo.toy.models import build_model, count_parameters, read_meta, save_model_dir
from cppo.toy.presets import model_preset, model_preset_names
from cppo.toy.quick_eval import chat_prompts
from cppo.toy.task import TaskConfig, generate_splits
from cppo.toy.tokenizer import build_tokenizer, collect_words
from evaluation import tiny
from evaluation.testing import make_char_tokenizer, make_tiny_model, tiny_model_for, tiny_preset


@pytest.fixture(scope="module")
def tok():
    torch.set_num_threads(1)
    ps = generate_splits(TaskConfig(), {"train": 50}, seed=0)["train"]
    return build_tokenizer(collect_words(t for p in ps for t in (p.text, p.solution)))


def _reference_count(cfg) -> int:
    """Parameter count from the config alone (tied embeddings, no biases)."""
    h, L, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = cfg.head_dim
    attn = h * hd * cfg.num_attention_heads * 2 + h * hd * cfg.num_key_value_heads * 2 + 2 * hd
    if getattr(cfg, "num_experts", 0):
        mlp = cfg.num_experts * 3 * h * cfg.moe_intermediate_size + cfg.num_experts * h
    else:
        mlp = 3 * h * cfg.intermediate_size
    return v * h + L * (attn + mlp + 2 * h) + h


def test_presets_exist():
    assert {"toy-s", "toy-m", "toy-moe"} <= set(model_preset_names())
    with pytest.raises(KeyError, match="unknown model preset"):
        model_preset("toy-xl")


@pytest.mark.parametrize("preset", ["toy-s", "toy-m", "toy-moe"])
def test_parameter_counts(tok, preset):
    model = build_model(preset, tok)
    counts = count_parameters(model)
    assert counts["total"] == _reference_count(model.config)
    lo, hi = {"toy-s": (0.3e6, 0.7e6), "toy-m": (2e6, 4e6), "toy-moe": (0.4e6, 1.5e6)}[preset]
    assert lo <= counts["total"] <= hi


def test_seeded_init(tok):
    a, b, c = (
        build_model("toy-s", tok, seed=1),
        build_model("toy-s", tok, seed=1),
        build_model("toy-s", tok, seed=2),
    )
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n
    assert any(
        not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_unknown_preset_key(tok):
    with pytest.raises(ValueError, match="unknown keys"):
        tiny.make_config({"architecture": "qwen3", "hidden_size": 32, "num_expert": 4}, tok)


@pytest.mark.parametrize("preset", ["toy-s", "toy-moe"])
def test_save_load_generate(tok, preset, tmp_path):
    model = build_model(preset, tok, seed=0)
    save_model_dir(model, tok, tmp_path, {"preset": preset})
    assert read_meta(tmp_path)["preset"] == preset
    m2 = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    t2 = AutoTokenizer.from_pretrained(str(tmp_path))
    assert m2.config.model_type == ("qwen3" if preset == "toy-s" else "qwen3_moe")
    for p1, p2 in zip(model.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    prompts = chat_prompts(t2, ["What is 1+2?", "What is 3+4-5+6?"])
    t2.padding_side = "left"
    enc = t2(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = m2.generate(**enc, do_sample=True, max_new_tokens=6, top_k=0)
    assert out.shape[0] == 2 and 1 <= out.shape[1] - enc["input_ids"].shape[1] <= 6
    # the saved generation config stops at <|im_end|>: force it and expect one new token
    eos = t2.eos_token_id
    out = m2.generate(**enc, do_sample=False, max_new_tokens=6, sequence_bias={(eos,): 100.0})
    assert out.shape[1] == enc["input_ids"].shape[1] + 1
    assert (out[:, -1] == eos).all()


def test_moe_routes_top2(tok):
    model = build_model("toy-moe", tok, seed=0)
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts_per_tok == 2 and cfg.num_experts >= 3
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert len(routers) == cfg.num_hidden_layers
    picked = []
    hooks = [r.register_forward_hook(lambda _m, _i, out: picked.append(out)) for r in routers]
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert len(picked) == cfg.num_hidden_layers
    for logits, weights, index in picked:
        assert logits.shape == (18, cfg.num_experts)
        assert index.shape == (18, 2) and weights.shape == (18, 2)
        # the two chosen experts are the two largest router logits, weights renormalised
        assert torch.equal(index.sort(-1).values, logits.topk(2, -1).indices.sort(-1).values)
        assert torch.allclose(weights.sum(-1), torch.ones(18), atol=1e-5)
    counts = count_parameters(model)
    assert counts["active"] < counts["total"]


def test_one_builder_for_toy_and_test_models(tok):
    """The toy CLI's model, the trainer's test model and evaluation's test model all come from
    evaluation.tiny.build_model: same preset, tokenizer and seed give the same weights."""
    preset = model_preset("toy-s")
    a = build_model("toy-s", tok, seed=3).state_dict()
    b = tiny.build_model(preset, tok, seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    model, char_tok = make_tiny_model(seed=1, hidden_size=32)
    other = tiny_model_for(make_char_tokenizer(), hidden_size=32, seed=1).state_dict()
    direct = tiny.build_model(tiny_preset(32), char_tok, seed=1).state_dict()
    for sd in (other, direct):
        assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    assert model.config.vocab_size == len(char_tok)


def test_vocab_size_pads_the_test_model():
    t = make_char_tokenizer(300)
    model = tiny_model_for(t, vocab_size=300, tie_word_embeddings=False)
    assert len(t) == 300 and model.get_output_embeddings().weight.shape[0] == 300

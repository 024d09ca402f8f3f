"""SFT warm start: response-only loss, shared-prefix equivalence, loss goes down, CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cppo.toy.cli import main as cli_main
from cppo.toy.models import build_model, save_model_dir
from cppo.toy.quick_eval import toy_avg_at_k
from cppo.toy.task import read_jsonl, write_data
from cppo.toy.tokenizer import build_from_data
from cppo.toy.warm_start import (
    IGNORE,
    add_slips,
    collate,
    common_prefix_length,
    encode_examples,
    lr_at,
    response_loss,
    response_loss_shared_prefix,
    sft,
    warm_start,
)
from evaluation.dapo import dapo_correct

TINY = {
    "architecture": "qwen3",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
TINY_MOE = {
    **TINY,
    "architecture": "qwen3_moe",
    "moe_intermediate_size": 32,
    "num_experts": 3,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("toy")
    write_data(root / "data", seed=0, n_train=200, n_val=8, n_test=8)
    tok = build_from_data(root / "data")
    model = build_model(TINY, tok, seed=0)
    save_model_dir(model, tok, root / "model", {"preset": "tiny"})
    rows = read_jsonl(root / "data" / "train.jsonl")
    return root, tok, rows


def test_examples_and_labels(setup):
    _, tok, rows = setup
    ex = encode_examples(tok, rows[:4])
    for e, r in zip(ex, rows, strict=False):
        assert tok.decode(e.response_ids) == r["solution"] + tok.eos_token
        full = tok.apply_chat_template(
            [*r["prompt"], {"role": "assistant", "content": r["solution"]}], tokenize=False
        )
        # prompt + response is the chat-template rendering (minus the trailing newline)
        assert tok.decode(e.prompt_ids + e.response_ids) + "\n" == full
    b = collate(ex, tok.pad_token_id)
    for i, e in enumerate(ex):
        n_p, n_r = len(e.prompt_ids), len(e.response_ids)
        lab = b["labels"][i]
        assert (lab[:n_p] == IGNORE).all() and (lab[n_p + n_r :] == IGNORE).all()
        assert lab[n_p : n_p + n_r].tolist() == e.response_ids
        assert b["attention_mask"][i].sum() == n_p + n_r
    # every toy prompt shares the template up to the problem text
    assert common_prefix_length(b) >= 45


def _loop_loss(model, ex) -> torch.Tensor:
    """Reference: per example, per response token, no batching or padding."""
    nll, n = 0.0, 0
    for e in ex:
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        for j, t in enumerate(e.response_ids):
            nll = nll - logp[len(e.prompt_ids) + j - 1, t]
            n += 1
    return nll / n


@pytest.mark.parametrize("cfg", [TINY, TINY_MOE], ids=["dense", "moe"])
def test_losses_match_reference(setup, cfg):
    _, tok, rows = setup
    model = build_model(cfg, tok, seed=1)
    ex = encode_examples(tok, rows[:5])
    b = collate(ex, tok.pad_token_id)
    ref = _loop_loss(model, ex)
    plain = response_loss(model, b)
    torch.testing.assert_close(plain, ref, rtol=1e-4, atol=1e-5)
    plain.backward()
    g_plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared = response_loss_shared_prefix(model, b)
    torch.testing.assert_close(shared, ref, rtol=1e-4, atol=1e-5)
    shared.backward()
    for g, p in zip(g_plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-3, atol=1e-6)


def test_lr_schedule():
    s = {"learning_rate": 1.0, "warmup_steps": 4, "steps": 14, "final_lr_fraction": 0.1}
    assert lr_at(0, s) == pytest.approx(0.25)
    assert lr_at(3, s) == pytest.approx(1.0)
    assert lr_at(4, s) == pytest.approx(1.0)
    assert lr_at(9, s) == pytest.approx(0.55)
    assert lr_at(14, s) == pytest.approx(0.1)


def test_sft_lowers_loss(setup):
    _, tok, rows = setup
    model = build_model(TINY, tok, seed=0)
    ex = encode_examples(tok, rows)
    probe = collate(ex[:32], tok.pad_token_id)
    with torch.no_grad():
        before = response_loss(model, probe).item()
    settings = {
        "steps": 40,
        "batch_size": 8,
        "learning_rate": 5e-3,
        "warmup_steps": 5,
        "log_every": 10,
    }
    hist = sft(model, ex, settings, seed=0, pad_id=tok.pad_token_id, progress=False)
    with torch.no_grad():
        after = response_loss(model, probe).item()
    assert after < 0.6 * before
    assert hist[-1]["loss"] < hist[0]["loss"]


def test_warm_start_dir_is_reproducible_and_complete(setup):
    root, _, _ = setup
    ov = {"steps": 4, "batch_size": 4}
    rec = warm_start(
        root / "model", root / "data", "base", root / "ws1", seed=3, overrides=ov, progress=False
    )
    warm_start(
        root / "model", root / "data", "base", root / "ws2", seed=3, overrides=ov, progress=False
    )
    assert rec["steps"] == 4 * len(rec["phases"])
    m1 = AutoModelForCausalLM.from_pretrained(str(root / "ws1"))
    m2 = AutoModelForCausalLM.from_pretrained(str(root / "ws2"))
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    meta = json.loads((root / "ws1" / "toy_model.json").read_text())
    assert meta["preset"] == "tiny" and meta["warm_start"]["flavour"] == "base"
    tok = AutoTokenizer.from_pretrained(str(root / "ws1"))
    res = toy_avg_at_k(m1, tok, read_jsonl(root / "data" / "val.jsonl")[:3], k=2, max_new_tokens=8)
    assert 0.0 <= res["avg_at_k"] <= 1.0 and res["n_problems"] == 3
    assert res["n_truncated"] <= 6 and res["mean_length"] <= 8


def test_cli_end_to_end(tmp_path, capsys):
    d, t, m, w = (tmp_path / x for x in ("data", "tok", "model", "ws"))
    assert (
        cli_main(["data", "--out", str(d), "--n-train", "64", "--n-val", "4", "--n-test", "4"]) == 0
    )
    assert cli_main(["tokenizer", "--data", str(d), "--out", str(t)]) == 0
    assert cli_main(["model", "--preset", "toy-s", "--tokenizer", str(t), "--out", str(m)]) == 0
    capsys.readouterr()
    argv = [
        "warm-start",
        "--model",
        str(m),
        "--data",
        str(d),
        "--flavour",
        "instruct",
        "--out",
        str(w),
        "--steps",
        "2",
        "--no-progress",
        "--threads",
        "1",
    ]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flavour"] == "instruct" and all(p["steps"] == 2 for p in out["phases"])
    assert AutoTokenizer.from_pretrained(str(w)).eos_token == "<|im_end|>"
    # clear errors for missing inputs
    assert cli_main(["tokenizer", "--data", str(tmp_path / "nope"), "--out", str(t)]) == 2
    assert "python -m cppo.toy data" in capsys.readouterr().err
    assert cli_main(["model", "--preset", "toy-s", "--tokenizer", str(d), "--out", str(m)]) == 2
    with pytest.raises(SystemExit):
        cli_main(["model", "--preset", "toy-xl", "--tokenizer", str(t), "--out", str(m)])


def test_add_slips(setup):
    root, _, rows = setup
    same, n0 = add_slips(rows, 0.0, 0, root / "data")
    assert same is rows and n0 == 0
    a, n = add_slips(rows, 0.5, 7, root / "data")
    b, _ = add_slips(rows, 0.5, 7, root / "data")
    assert a == b and 0 < n < len(rows)
    changed = [x for x, r in zip(a, rows, strict=True) if x["solution"] != r["solution"]]
    assert len(changed) == n
    for x in changed:  # at least one step's result is off; slips may cancel in the answer
        steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)\.", x["solution"])
        assert any(int(a) + int(o + b) != int(c) for a, o, b, c in steps)
    assert all(
        dapo_correct(r["solution"], r["reward_model"]["ground_truth"])
        for r in rows  # the originals are untouched
    )
    assert all(x["prompt"] == r["prompt"] for x, r in zip(a, rows, strict=True))
    with pytest.raises(ValueError, match="terms"):
        add_slips([{k: v for k, v in rows[0].items() if k != "terms"}], 1.0, 0, root / "data")

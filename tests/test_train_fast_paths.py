"""The transformers backend's fast paths against plain HF forwards: the KV-cache sampling loop
(per-token log-probs, top-K, the distribution it draws from, greedy = generate) and the
shared-prompt loss forward (log-probs, top-K gather, entropies, gradients), on a GQA Qwen3
and a Qwen3-MoE."""

from __future__ import annotations

import pytest
import torch

from cppo.training.lmhead import head_spec_for
from cppo.training.shared_prompt import shared_prompt_forward
from evaluation.kv_loop import filter_logits, sample, sdpa_gqa
from evaluation.testing import make_char_tokenizer
from evaluation.tiny import build_model

torch.set_num_threads(1)

GQA = {
    "architecture": "qwen3",
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 12,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
MOE = {
    **GQA,
    "architecture": "qwen3_moe",
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
}


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


@pytest.fixture(scope="module", params=[GQA, MOE], ids=["qwen3-gqa", "qwen3-moe"])
def model(request, tok):
    m = build_model(request.param, tok, seed=1)
    # sharper than a random init so that samples end at different lengths
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(2.0)
    return m.eval()


def encode(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def reference_logps(model, prompt, completion, temperature):
    """log_softmax(z / T) at each completion position, from one unpadded HF forward."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(dim=-1)


def test_loop_logps_and_topk_equal_an_hf_forward(model, tok):
    prompts = encode(tok, ["2+2=", "a much longer prompt, padded less", "x"])
    rows = [prompts[i] for i in (0, 1, 1, 2, 0, 1, 2, 2)]  # repeated, interleaved
    gen = torch.Generator().manual_seed(0)
    # frequent characters end a row too, so rows stop at different steps (and get dropped)
    eos = [tok.eos_token_id, *encode(tok, ["eta "])[0]]
    out = sample(
        model,
        rows,
        max_new_tokens=24,
        eos_ids=eos,
        pad_id=tok.pad_token_id,
        temperature=0.8,
        record_topk=6,
        generator=gen,
    )
    lengths = [len(c) for c in out.completions]
    assert len(set(lengths)) > 1 and min(lengths) < 24, "want rows that stop early (compaction)"
    for prompt, completion, logps, ids, top in zip(
        rows, out.completions, out.logps, out.topk_ids, out.topk_logps, strict=True
    ):
        ref = reference_logps(model, prompt, completion, 0.8)
        sampled = ref.gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        torch.testing.assert_close(logps, sampled, rtol=0, atol=1e-5)
        want = ref.topk(6, dim=-1)
        assert torch.equal(ids, want.indices)
        torch.testing.assert_close(top, want.values, rtol=0, atol=1e-5)
    ended = [c[-1] in eos for c in out.completions]
    assert ended == [not t for t in out.truncated]
    assert all(t not in eos for c in out.completions for t in c[:-1])


def test_loop_draws_from_the_filtered_distribution(tok):
    """Frequencies of the first two tokens over 40,000 samples against the model's
    probabilities after temperature, top-k and top-p (transformers' order), within 5 sigma."""
    model = build_model(GQA, tok, seed=2).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(6.0)
    prompt = encode(tok, ["q:"])[0]
    n, temperature = 40_000, 1.3
    for top_k, top_p in ((0, 1.0), (0, 0.8), (7, 0.9)):
        gen = torch.Generator().manual_seed(top_k)
        out = sample(
            model,
            [prompt] * n,
            max_new_tokens=2,
            eos_ids=[tok.eos_token_id],
            pad_id=tok.pad_token_id,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=gen,
        )
        first = torch.tensor([c[0] for c in out.completions])
        with torch.no_grad():
            z = model(torch.tensor([prompt])).logits[0, -1].float() / temperature
        probs = filter_logits(z[None], top_k, top_p).softmax(-1)[0]
        kept = int((probs > 0).sum())
        if top_k or top_p < 1:
            assert kept < probs.numel() and kept <= (top_k or kept)
        check_frequencies(first, probs, n)
        # the second token, given the most frequent first one: through the cache
        a = int(torch.mode(first).values)
        rows = [c for c in out.completions if c[0] == a and len(c) == 2]
        with torch.no_grad():
            z2 = model(torch.tensor([prompt + [a]])).logits[0, -1].float() / temperature
        probs2 = filter_logits(z2[None], top_k, top_p).softmax(-1)[0]
        check_frequencies(torch.tensor([c[1] for c in rows]), probs2, len(rows))


def check_frequencies(tokens, probs, n):
    freq = torch.bincount(tokens, minlength=probs.numel()).double() / n
    p = probs.double()
    assert torch.all(freq[p == 0] == 0), "drew a token the filters remove"
    sigma = (p * (1 - p) / n).sqrt() + 1 / n
    assert torch.all((freq - p).abs() <= 5 * sigma), float(((freq - p).abs() / sigma).max())


def test_greedy_loop_equals_transformers_generate(tok):
    model = build_model(GQA, tok, seed=4).eval()
    prompts = encode(tok, ["1+1=", "tell me more about it", "ok"])
    out = sample(
        model,
        prompts,
        max_new_tokens=16,
        eos_ids=[tok.eos_token_id],
        pad_id=tok.pad_token_id,
        temperature=0.0,
    )
    for prompt, completion in zip(prompts, out.completions, strict=True):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=16, top_k=None
            )[0, len(prompt) :].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert completion == ref


def padded_batch(tok, model, common, seed=0):
    """Three prompts that share their first `common` tokens, repeated over 7 rows."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    head = torch.randint(5, vocab, (common,), generator=g)
    prompts = [torch.cat([head, torch.randint(5, vocab, (n,), generator=g)]) for n in (7, 11, 4)]
    owner = [0, 0, 1, 1, 1, 2, 0]
    width, n_comp = common + 11, 9
    prompt_ids = torch.full((len(owner), width), tok.pad_token_id)
    prompt_mask = torch.zeros(len(owner), width, dtype=torch.long)
    for i, o in enumerate(owner):
        prompt_ids[i, width - len(prompts[o]) :] = prompts[o]
        prompt_mask[i, width - len(prompts[o]) :] = 1
    completion_ids = torch.randint(5, vocab, (len(owner), n_comp), generator=g)
    lengths = torch.tensor([9, 3, 1, 9, 6, 2, 5])
    completion_mask = (torch.arange(n_comp)[None] < lengths[:, None]).long()
    completion_ids[completion_mask == 0] = tok.pad_token_id
    gather_ids = torch.randint(0, vocab, (len(owner), n_comp, 5), generator=g)
    return prompts, owner, prompt_ids, prompt_mask, completion_ids, completion_mask, gather_ids


@pytest.mark.parametrize("common", [0, 6])
def test_shared_prompt_forward_equals_row_by_row_forwards(model, tok, common):
    prompts, owner, pids, pmask, cids, cmask, gids = padded_batch(tok, model, common)
    temperature = 0.7
    spec = head_spec_for(model, temperature, cast_fp32=True)
    model.train()
    try:
        # the longest completion (9) is shorter than the padded width (12): trimmed columns
        wide = torch.nn.functional.pad(cids, (0, 3), value=tok.pad_token_id)
        wide_mask = torch.nn.functional.pad(cmask, (0, 3))
        wide_g = torch.nn.functional.pad(gids, (0, 0, 0, 3))
        full = shared_prompt_forward(model, pids, pmask, wide, spec, wide_g, wide_mask)
        stats = shared_prompt_forward(model, pids, pmask, cids, spec, gids)
        assert full.logps.shape == wide.shape and full.gathered.shape == wide_g.shape
        torch.testing.assert_close(full.logps[:, :9], stats.logps, rtol=0, atol=1e-6)
        torch.testing.assert_close(full.gathered[:, :9], stats.gathered, rtol=0, atol=1e-6)
        m = cmask.bool()
        weights = torch.linspace(0.5, 1.5, cids.numel()).view_as(cids.float())
        loss = (stats.logps * weights * m).sum() + 0.1 * (stats.gathered * m[..., None]).sum()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        ref_loss = 0.0
        for i, o in enumerate(owner):
            n = int(m[i].sum())
            full = reference_logps_grad(
                model, prompts[o].tolist(), cids[i, :n].tolist(), temperature
            )
            sampled = full.gather(1, cids[i, :n, None]).squeeze(1)
            gathered = full.gather(1, gids[i, :n])
            entropy = -(full.exp() * full).sum(-1)
            torch.testing.assert_close(
                stats.logps[i, :n].detach(), sampled.detach(), rtol=0, atol=1e-5
            )
            torch.testing.assert_close(
                stats.gathered[i, :n].detach(), gathered.detach(), rtol=0, atol=1e-5
            )
            torch.testing.assert_close(stats.entropies[i, :n], entropy.detach(), rtol=0, atol=1e-5)
            ref_loss = ref_loss + (sampled * weights[i, :n]).sum() + 0.1 * gathered.sum()
        ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    finally:
        model.eval()
    compared = 0
    for g, r in zip(grads, ref_grads, strict=True):
        if r is None:  # an expert no token was routed to
            assert g is None or torch.count_nonzero(g) == 0
            continue
        assert float((g - r).norm() / r.norm().clamp_min(1e-12)) < 1e-4
        compared += 1
    assert compared >= 10


def reference_logps_grad(model, prompt, completion, temperature):
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return (logits.float() / temperature).log_softmax(dim=-1)


def attention_by_loop(q, k, v, mask, scale):
    """Per row and head, in float64: query head h reads KV head h // (heads / kv_heads)
    (transformers' repeat_kv); mask True = attend."""
    b, heads, q_len, _ = q.shape
    rep = heads // k.shape[1]
    out = torch.zeros(b, q_len, heads, q.shape[-1], dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            scores = q[i, h].double() @ k[i, h // rep].double().T * scale
            scores = scores.masked_fill(~mask[i, 0], float("-inf"))
            out[i, :, h] = scores.softmax(-1) @ v[i, h // rep].double()
    return out


@pytest.mark.parametrize("q_len", [1, 5])
def test_gqa_attention_equals_a_loop_over_heads(q_len):
    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, keys, dim = 3, 6, 2, 9, 8
    q = torch.randn(b, heads, q_len, dim, generator=g)
    k = torch.randn(b, kv_heads, keys, dim, generator=g)
    v = torch.randn(b, kv_heads, keys, dim, generator=g)
    mask = torch.rand(b, 1, q_len, keys, generator=g) > 0.3
    mask[..., -1] = True  # every query sees at least one key
    ref = attention_by_loop(q, k, v, mask, 0.3).float()
    out, _ = sdpa_gqa(None, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(
        sdpa_gqa(None, q, k, v, additive, scaling=0.3)[0], ref, rtol=1e-5, atol=1e-6
    )
    # no mask: causal, the last query aligned to the last key (queries continue a cache)
    causal = torch.ones(q_len, keys, dtype=torch.bool).tril(keys - q_len).expand(b, 1, -1, -1)
    torch.testing.assert_close(
        sdpa_gqa(None, q, k, v, None)[0],
        attention_by_loop(q, k, v, causal, dim**-0.5).float(),
        rtol=1e-5,
        atol=1e-6,
    )

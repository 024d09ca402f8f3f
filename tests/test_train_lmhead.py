"""mu's top-K and pi's gathered log-probs from the fused head equal a full log_softmax."""

from __future__ import annotations

import pytest
import torch
from trl.trainer.utils import add_fused_lm_head

from cppo.training.lmhead import (
    HeadCapture,
    HeadRequest,
    HeadSpec,
    gathered_logits,
    head_spec_for,
    topk_ids,
)
from evaluation.testing import make_char_tokenizer, tiny_model_for

torch.set_num_threads(1)


def test_headspec_transform_matches_formula():
    z = torch.randn(5, 7, dtype=torch.float64) * 30
    spec = HeadSpec(temperature=0.7, logit_scale=0.5, softcap=30.0)
    expected = 30.0 * torch.tanh(z * 0.5 / 30.0) / 0.7
    torch.testing.assert_close(spec.transform(z), expected.float())


def test_gathered_logits_and_topk_match_full_matmul():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g)
    weight = torch.randn(300, 16, generator=g)
    bias = torch.randn(300, generator=g)
    spec = HeadSpec(temperature=1.3, logit_scale=2.0)
    full = spec.transform(hidden @ weight.t() + bias)
    ids = torch.randint(0, 300, (37, 5), generator=g)
    got = gathered_logits(hidden, weight, bias, ids, spec, chunk_tokens=8)
    torch.testing.assert_close(got, full.gather(1, ids), rtol=1e-5, atol=1e-5)
    top = topk_ids(hidden, weight, bias, 6, spec, chunk_tokens=5)
    assert torch.equal(top, torch.topk(full, 6, dim=-1).indices)


def _model(temperature=1.0, tie=True, scale=None, seed=0):
    tok = make_char_tokenizer()
    model = tiny_model_for(
        tok, hidden_size=32, num_hidden_layers=2, tie_word_embeddings=tie, seed=seed
    )
    if scale is not None:
        model.config.logit_scale = scale  # read by the fused head as a pre-temperature multiplier
    model.eval()
    reference_forward = model.forward  # unpatched: returns full logits
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy"))
    return model, reference_forward


def _batch(vocab, completion=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(4, vocab, (4, 6), generator=g)
    comp = torch.randint(4, vocab, (4, completion), generator=g)
    input_ids = torch.cat([prompt, comp], dim=1)
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0  # left padding in the prompt
    mask[1, -3:] = 0  # right padding in the completion
    mask[2, -8:] = 0  # a one-token completion
    return input_ids, mask, completion


def _fused(model, input_ids, mask, c):
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, :-c] = -100
    out = model(input_ids=input_ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    return out.log_probs[:, -c:]


def _reference_logprobs(reference_forward, input_ids, mask, c, temperature, scale=1.0):
    with torch.no_grad():
        logits = reference_forward(input_ids=input_ids, attention_mask=mask).logits.float()
    return torch.log_softmax(logits[:, -c - 1 : -1] * scale / temperature, dim=-1)


@pytest.mark.parametrize(("temperature", "tie", "scale"), [(1.0, True, None), (0.7, False, 1.5)])
def test_mu_topk_and_sampled_logps_equal_full_log_softmax(temperature, tie, scale):
    model, ref_fwd = _model(temperature, tie, scale)
    spec = head_spec_for(model, temperature, cast_fp32=False)
    capture = HeadCapture(model, spec)
    input_ids, mask, c = _batch(model.config.vocab_size)
    k = 7
    req = HeadRequest(logits_to_keep=c, topk=k, chunk_tokens=5)
    with torch.no_grad(), capture.armed(req):
        # two row chunks, as TRL's batched no-grad pass does
        parts = [_fused(model, input_ids[s : s + 2], mask[s : s + 2], c) for s in (0, 2)]
    req.finish(torch.cat(parts))
    full = _reference_logprobs(ref_fwd, input_ids, mask, c, temperature, scale or 1.0)
    valid = mask[:, -c:].bool()
    sampled_ref = full.gather(-1, input_ids[:, -c:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(req.sampled_logps[valid], sampled_ref[valid], rtol=1e-5, atol=1e-5)
    top_ref = torch.topk(full, k, dim=-1)
    assert torch.equal(req.ids.long()[valid], top_ref.indices[valid])
    torch.testing.assert_close(req.logps[valid], top_ref.values[valid], rtol=1e-5, atol=1e-5)
    capture.remove()


def test_pi_gathered_logps_equal_full_log_softmax_and_keep_the_graph():
    model, ref_fwd = _model()
    capture = HeadCapture(model, head_spec_for(model, 1.0, cast_fp32=False))
    input_ids, mask, c = _batch(model.config.vocab_size, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (4, c, 5))
    req = HeadRequest(logits_to_keep=c, gather_ids=ids)
    model.train()
    with capture.armed(req):
        logps = _fused(model, input_ids, mask, c)
    req.finish(logps)
    full = _reference_logprobs(ref_fwd, input_ids, mask, c, 1.0)
    valid = mask[:, -c:].bool()
    torch.testing.assert_close(req.logps[valid], full.gather(-1, ids)[valid], rtol=1e-5, atol=1e-5)
    # gathered values are stop-gradient; the sampled log-probs carry the gradient
    assert not req.logps.requires_grad
    assert logps.requires_grad
    capture.remove()


def test_hook_is_idle_during_generation():
    model, _ = _model()
    capture = HeadCapture(model, head_spec_for(model, 1.0, cast_fp32=False))
    req = HeadRequest(logits_to_keep=3, topk=4)
    input_ids, mask, _ = _batch(model.config.vocab_size)
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert req._diff == []  # not armed: nothing captured
    with pytest.raises(RuntimeError, match="did not fire"):
        req.finish(torch.zeros(4, 3))
    capture.remove()

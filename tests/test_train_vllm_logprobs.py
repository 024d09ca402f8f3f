"""mu's sampled-token and top-K log-probs from vLLM-style logprob lists (no vLLM needed)."""

from __future__ import annotations

import math

import torch

from cppo.vllm_logprobs import pad_topk, split_vllm_logprobs


def test_sampled_inside_and_outside_topk():
    k = 3
    completion = [[5, 9]]
    # position 0: sampled 5 is rank 2 (inside the top-3: 3 entries)
    # position 1: sampled 9 is rank 7 (outside: 4 entries, sorted by rank, sampled last)
    logprobs = [[[-0.5, -1.0, -2.0], [-0.1, -2.5, -3.0, -6.0]]]
    token_ids = [[[1, 5, 2], [4, 7, 8, 9]]]
    sampled, topk = split_vllm_logprobs(completion, logprobs, token_ids, k)
    assert sampled == [[-1.0, -6.0]]
    ids, lps = topk[0]
    assert ids == [[1, 5, 2], [4, 7, 8]]
    assert lps == [[-0.5, -1.0, -2.0], [-0.1, -2.5, -3.0]]


def test_tie_with_kth_keeps_the_true_topk():
    # the sampled token ties with the K-th and vLLM ranks it before it: K+1 entries, sampled second
    completion = [[6]]
    logprobs = [[[-0.2, -1.5, -1.5]]]
    token_ids = [[[3, 6, 4]]]
    sampled, topk = split_vllm_logprobs(completion, logprobs, token_ids, 2)
    assert sampled == [[-1.5]]
    assert topk[0][0] == [[3, 4]]  # the sampled token is not counted as one of the K


def test_missing_values_and_short_lists():
    completion = [[2, 3]]
    logprobs = [[[None, -1.0], [-0.3]]]
    token_ids = [[[2, 1], [3]]]
    sampled, topk = split_vllm_logprobs(completion, logprobs, token_ids, 2)
    assert math.isnan(sampled[0][0]) and sampled[0][1] == -0.3
    ids, lps = topk[0]
    assert ids[1] == [3, 0] and lps[1][1] == -math.inf  # padded slot carries no mass


def test_pad_topk_shapes():
    topk = [([[1, 2], [3, 4]], [[-0.1, -0.2], [-0.3, -0.4]]), ([[5, 6]], [[-1.0, -2.0]])]
    ids, lps = pad_topk(topk, width=3, k=2, device=torch.device("cpu"))
    assert ids.shape == (2, 3, 2) and ids.dtype == torch.int32
    assert ids[1, 0].tolist() == [5, 6] and ids[1, 1].tolist() == [0, 0]
    assert lps[0, 1].tolist() == [-0.30000001192092896, -0.4000000059604645]

"""mu's sampled-token and top-K log-probs from vLLM's per-token logprob lists (no vLLM import;
shared by the TRL trainer and the verl rollout, so it imports torch only).

With `logprobs=K`, vLLM returns for every generated position the top-K tokens plus the sampled
token when it is not among them (K or K+1 entries; TRL sorts them by rank). The sampled token's
entry gives mu(y_t); the other entries are mu's top-K. Selecting "all entries except the sampled
one when there are K+1" (instead of "the first K by rank") stays right when the sampled token
ties with the K-th.
"""

from __future__ import annotations

import math

import torch


def split_vllm_logprobs(
    completion_ids: list[list[int]],
    logprobs: list[list[list[float | None]]],
    logprob_token_ids: list[list[list[int]]],
    k: int,
) -> tuple[list[list[float]], list[tuple[list[list[int]], list[list[float]]]]]:
    """Per sequence: the sampled-token log-probs (NaN when vLLM gave none) and (top-K ids, log-probs).

    Positions with fewer than K entries are padded with id 0 and log-prob -inf (no mass).
    """
    sampled_all: list[list[float]] = []
    topk_all: list[tuple[list[list[int]], list[list[float]]]] = []
    for seq, seq_lp, seq_ids in zip(completion_ids, logprobs, logprob_token_ids, strict=True):
        if not (len(seq) == len(seq_lp) == len(seq_ids)):
            raise ValueError("vLLM returned logprobs that do not match the completion length")
        sampled: list[float] = []
        ids_rows: list[list[int]] = []
        lp_rows: list[list[float]] = []
        for tok, lps, tids in zip(seq, seq_lp, seq_ids, strict=True):
            lps = [math.nan if v is None else float(v) for v in lps]
            j = tids.index(tok) if tok in tids else -1
            sampled.append(lps[j] if j >= 0 else math.nan)
            if len(tids) > k and j >= 0:
                pairs = [(t, v) for i, (t, v) in enumerate(zip(tids, lps, strict=True)) if i != j]
            else:
                pairs = list(zip(tids, lps, strict=True))
            pairs = pairs[:k]
            pairs += [(0, -math.inf)] * (k - len(pairs))
            ids_rows.append([t for t, _ in pairs])
            lp_rows.append([v for _, v in pairs])
        sampled_all.append(sampled)
        topk_all.append((ids_rows, lp_rows))
    return sampled_all, topk_all


def pad_topk(
    topk: list[tuple[list[list[int]], list[list[float]]]], width: int, k: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-sequence top-K lists into [B, width, K] (ids int32, log-probs fp32)."""
    ids = torch.zeros(len(topk), width, k, dtype=torch.int32)
    lps = torch.zeros(len(topk), width, k, dtype=torch.float32)
    for i, (seq_ids, seq_lp) in enumerate(topk):
        n = min(len(seq_ids), width)
        if n:
            ids[i, :n] = torch.tensor(seq_ids[:n], dtype=torch.int32)
            lps[i, :n] = torch.tensor(seq_lp[:n], dtype=torch.float32)
    return ids.to(device), lps.to(device)

"""mu's top-K log-probs from vLLM, as verl's ``teacher_ids`` / ``teacher_logprobs`` fields.

verl 0.9.1's vLLM server asks for the sampled token's log-prob only (``logprobs=0``); with
``logprobs=K`` vLLM returns, per generated position, a dict token id -> log-prob holding the
top-K and the sampled token. :func:`teacher_fields` turns those dicts into verl's padded
``[T, K]`` fields with the project's extraction rule (``cppo.vllm_logprobs``: the sampled
token's entry is left out when there are K+1) and verl's padding (id ``pad_id``, log-prob 0.0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cppo.vllm_logprobs import split_vllm_logprobs

__all__ = ["teacher_fields"]


def _value(entry: Any) -> float:
    """A vLLM ``Logprob`` (``.logprob``) or a plain number."""
    return float(getattr(entry, "logprob", entry))


def teacher_fields(
    token_ids: Sequence[int],
    position_logprobs: Sequence[Mapping[int, Any]],
    k: int,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampled log-probs ``[T]``, top-K ids ``[T, K]``, top-K log-probs ``[T, K]``) of one
    response; missing slots are (pad_id, 0.0) as verl pads its teacher fields."""
    if len(token_ids) != len(position_logprobs):
        raise ValueError(
            f"{len(position_logprobs)} logprob entries for {len(token_ids)} generated tokens"
        )
    ids = [[int(t) for t in d] for d in position_logprobs]
    lps = [[_value(v) for v in d.values()] for d in position_logprobs]
    sampled, [(top_ids, top_lps)] = split_vllm_logprobs([list(token_ids)], [lps], [ids], k)
    sampled_t = torch.tensor(sampled[0], dtype=torch.float32)
    ids_t = torch.tensor(top_ids, dtype=torch.long).reshape(len(token_ids), k)
    lps_t = torch.tensor(top_lps, dtype=torch.float32).reshape(len(token_ids), k)
    missing = torch.isinf(lps_t) & (lps_t < 0)  # slots split_vllm_logprobs padded
    ids_t = ids_t.masked_fill(missing, pad_id)
    lps_t = lps_t.masked_fill(missing, 0.0)
    if any(math.isnan(x) for x in sampled[0]):
        raise ValueError("vLLM returned no log-prob for a sampled token")
    return sampled_t, ids_t, lps_t

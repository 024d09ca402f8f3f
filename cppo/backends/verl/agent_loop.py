"""mu's top-K from verl's rollout: a single-turn agent loop that re-prefills the sampled sequence.

verl 0.9.1's vLLM server keeps only the sampled token's log-prob of a generation
(``vLLMHttpServer.generate`` turns ``logprobs`` into 0 or None), but passes ``prompt_logprobs``
through and returns them, rank-ordered per position, as ``extra_fields["prompt_ids"]`` /
``["prompt_logprobs"]`` (``extract_prompt_logprobs``): row j = the top-K of the distribution of
token j + 1, a dummy last row, the layout of verl's distillation fields. So after the generation
this loop sends prompt + response back to the same policy server (``max_tokens 1, temperature
1.0, prompt_logprobs K``), as verl's distillation teacher does, and stores the lists as
``teacher_ids`` / ``teacher_logprobs``, which verl's agent-loop output moves into the batch.
The rollout's own log-prob of each sampled token stays mu in the ratio (``rollout_log_probs``).

Registered under ``cppo.backends.verl.overrides.TOPK_AGENT`` by the file of
``rollout.agent.agent_loop_config_path`` (``agent_loop_entries``: the class and K), and named by
the training rows' ``agent_name``.

Why a second pass rather than a server that keeps decode-time top-K: config hooks only
(``agent_loop_config_path``, the dataset's ``agent_name``), no copy of verl's server; the cost
is one prefill per response, and mu's top-K come from a prefill forward of the same weights.
How far that sits from the decode pass is logged per step (``logprob/prefill_gap``, the mean
|prefill - decode| log-prob of the sampled tokens, ``cppo.backends.verl.topk.prefill_gap``).
Validation rows name verl's plain ``single_turn_agent``: no second pass there.
"""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import torch
from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

__all__ = ["TopKAgentLoop", "teacher_tensors"]


def teacher_tensors(
    ids: list[list[int | None]], logprobs: list[list[float | None]], length: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's prompt-log-prob lists -> ``[length, K]`` int32 ids and fp32 log-probs.

    A slot vLLM left empty (``None``: fewer than K ranked entries) becomes (0, 0.0), verl's
    padding, which ``cppo.backends.verl.topk.teacher_topk`` reads as no mass.
    """
    if len(ids) != length or len(logprobs) != length:
        raise ValueError(f"prompt log-probs for {len(ids)} positions, the sequence has {length}")
    out_ids = torch.zeros(length, topk, dtype=torch.int32)
    out_lps = torch.zeros(length, topk, dtype=torch.float32)
    for row, (row_ids, row_lps) in enumerate(zip(ids, logprobs, strict=True)):
        if len(row_ids) > topk:
            raise ValueError(f"position {row}: {len(row_ids)} ranked entries, K is {topk}")
        for slot, (i, lp) in enumerate(zip(row_ids, row_lps, strict=True)):
            if i is not None and lp is not None:
                out_ids[row, slot], out_lps[row, slot] = int(i), float(lp)
    return out_ids, out_lps


class TopKAgentLoop(SingleTurnAgentLoop):
    """verl's single-turn loop, then mu's top-K of the whole sequence by a prefill pass."""

    def __init__(self, *args: Any, topk: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topk = int(topk)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        output = await super().run(sampling_params, **kwargs)
        if not output.response_ids:  # an aborted request: nothing to train on
            return output
        sequence = list(output.prompt_ids) + list(output.response_ids)
        prefill = await self.server_manager.generate(
            request_id=uuid4().hex,
            prompt_ids=sequence,
            sampling_params={"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": self.topk},
        )
        fields = prefill.extra_fields
        output.extra_fields["teacher_ids"], output.extra_fields["teacher_logprobs"] = (
            teacher_tensors(
                fields["prompt_ids"], fields["prompt_logprobs"], len(sequence), self.topk
            )
        )
        return output

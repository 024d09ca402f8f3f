"""verl's actor loss for a rule that reads a Top-K divergence (FSDP engine, verl 0.9.1).

verl's ``FSDPEngineWithLMHead.prepare_model_outputs`` calls the worker's loss function twice per
micro-batch when the micro-batch carries the non-tensor flag ``distillation_use_topk``
(``cppo.backends.verl.plugin`` sets it):

1. ``loss(student_logits=[1, rows, V], data=micro_batch)`` with pi's temperature-scaled logits
   of the packed rows (this rank's Ulysses slice when sequence parallel), before verl takes its
   own log-probs. Each returned ``[1, rows]`` tensor is gathered over the slices, unpadded and
   nested per sequence into ``model_output``. Here: pi's log-probs at mu's top-K ids
   (``teacher_ids``, row j = the distribution of token j + 1, the layout of the packed logits),
   one tensor per slot, by ``cppo.backends.verl.topk.log_probs_at`` (chunked, no gradient).
2. ``loss(model_output=..., data=micro_batch, dp_group=...)``: D at the response positions from
   those streams, mu's top-K fields and the sampled tokens, then verl's own ``ppo_loss`` (which
   calls the registered policy loss ``cppo`` with D passed alongside, and keeps verl's metrics,
   entropy and KL handling). The prefill gap of mu's top-K is logged with the loss's metrics.

Packed (``use_remove_padding``) and padded engine layouts both hand over the packed rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor
from verl.utils.metric import AggregationType, Metric
from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size, slice_input_tensor
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import no_padding_2_padding

from cppo.backends.verl.loss import load_method, passing_divergence
from cppo.backends.verl.topk import log_probs_at, prefill_gap, topk_divergence
from cppo.rules import BoundRule

__all__ = ["STREAM", "TopKPolicyLoss"]

STREAM = "cppo_pi_topk_"  # model_output key prefix: pi's log-prob at mu's k-th id


def _values(x: Tensor) -> Tensor:
    """The packed rows of a nested per-sequence field (``[tokens, ...]``)."""
    return x.values() if x.is_nested else x


class TopKPolicyLoss:
    """The worker's loss function (``set_loss_fn``) for a Top-K rule: see the module doc.

    ``config`` is verl's ``ActorConfig`` (what verl's own ``ppo_loss`` is bound to); the rule
    and K come from its ``policy_loss.method_file``.
    """

    def __init__(self, config: Any) -> None:
        self.config = config  # the only state: the object travels to every worker by pickle
        if not self.rule.needs_topk:
            raise ValueError(f"rule {self.rule.name!r} reads no Top-K divergence")

    @property
    def rule(self) -> BoundRule:
        return load_method(self.config.policy_loss.get("method_file")).rule

    @property
    def topk(self) -> int:
        return int(self.rule.divergence["topk"])

    def __call__(
        self,
        *,
        data: TensorDict,
        student_logits: Tensor | None = None,
        model_output: dict[str, Any] | None = None,
        dp_group: Any = None,
    ) -> Any:
        if student_logits is not None:
            return self.pi_at_teacher_ids(student_logits, data)
        return self.loss(model_output, data, dp_group)

    def pi_at_teacher_ids(self, student_logits: Tensor, data: TensorDict) -> dict[str, Tensor]:
        """K streams ``[1, rows]``: log softmax(pi's logits) at mu's top-K ids, per packed row."""
        ids = _values(data["teacher_ids"]).unsqueeze(0)  # [1, tokens, K]
        if ids.shape[-1] != self.topk:
            raise ValueError(
                f"teacher_ids carry {ids.shape[-1]} ids per position; the rule reads K={self.topk}"
            )
        if get_ulysses_sequence_parallel_world_size() > 1:
            ids = slice_input_tensor(ids, dim=1)  # this rank's rows, padded as the logits are
        logits = student_logits.squeeze(0)
        if ids.shape[1] != logits.shape[0]:
            raise ValueError(
                f"teacher_ids hold {ids.shape[1]} rows for {logits.shape[0]} rows of logits; "
                "pad_to_length must be off with a Top-K rule"
            )
        lp = log_probs_at(logits, ids.squeeze(0).to(logits.device))
        return {f"{STREAM}{k}": lp[:, k].unsqueeze(0) for k in range(self.topk)}

    def loss(
        self, model_output: dict[str, Any], data: TensorDict, dp_group: Any = None
    ) -> tuple[Tensor, dict[str, Any]]:
        missing = [k for k in range(self.topk) if f"{STREAM}{k}" not in model_output]
        if missing:
            raise ValueError(
                "model_output lacks pi's top-K log-probs: the micro-batch did not carry "
                "distillation_use_topk (the trainer mode of cppo.backends.verl.plugin sets it)"
            )
        pi_topk = torch.stack(
            [no_padding_2_padding(model_output[f"{STREAM}{k}"], data) for k in range(self.topk)],
            dim=-1,
        )
        teacher_ids = no_padding_2_padding(data["teacher_ids"], data)
        teacher_logprobs = no_padding_2_padding(data["teacher_logprobs"], data)
        logp = no_padding_2_padding(model_output["log_probs"], data).detach()
        resp = data.select("responses", "response_mask", "old_log_probs").to_padded_tensor()
        tokens, mask, logp_mu = (
            resp["responses"],
            resp["response_mask"].bool(),
            resp["old_log_probs"],
        )
        if tokens.shape != logp.shape:
            raise ValueError(
                f"responses {tuple(tokens.shape)} and log-probs {tuple(logp.shape)} differ in "
                "shape after padding"
            )
        spec = self.rule.divergence
        divergence = topk_divergence(
            spec["kind"],
            logp=logp,
            logp_mu=logp_mu,
            pi_topk=pi_topk,
            teacher_ids=teacher_ids,
            teacher_logprobs=teacher_logprobs,
            token_ids=tokens,
            response_mask=mask,
            topk=self.topk,
            sampled_token=spec["sampled_token"],
        )
        with passing_divergence(divergence):
            loss, metrics = ppo_loss(self.config, model_output, data, dp_group)
        gap, coverage = prefill_gap(teacher_ids, teacher_logprobs, tokens, logp_mu, mask)
        for name, value in (("logprob/prefill_gap", gap), ("logprob/prefill_coverage", coverage)):
            if math.isfinite(value):
                metrics[name] = Metric(aggregation=AggregationType.MEAN, value=value)
        return loss, metrics

"""What a backend cannot run as asked: one list of messages per run.yaml, read by the backend's
train command (which stops before any GPU starts) and by the pipeline's resource check (which
leaves such runs out of the plan's costs and names them). One owner for both, so the dry run
and the job agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cppo.run.config import method_rule

__all__ = ["verl_refusals"]


def verl_refusals(cfg: Mapping[str, Any]) -> list[str]:
    """What verl 0.9.1 with this project's plugin cannot run in ``cfg`` (a validated run.yaml),
    one message per key; empty when it can run it."""
    out = []
    if cfg["rl"]["mask_std_0"]:
        out.append(
            "rl.mask_std_0: verl counts zero-variance groups in its loss normalisers; set it "
            "false (the pipeline does for verl models)"
        )
    rule = method_rule(cfg)
    if not rule.needs_topk:
        return out
    what = f"rule {rule.name!r} reads {rule.divergence['kind']} (K={rule.divergence['topk']})"
    if cfg["verl"]["strategy"] != "fsdp":
        out.append(
            f"verl.strategy: {what}, wired into verl's FSDP engine only; Megatron's "
            "vocabulary-parallel logits need a per-shard gather and a logsumexp over tensor "
            "parallel ranks that is not written (README, 'verl backend'): use strategy fsdp"
        )
    if cfg["anchor"] != "rollout":
        out.append(
            f"anchor: {what}: mu's top-K come from the rollout engine, so the ratio's anchor "
            "must be the rollout's log-probs too (anchor: rollout)"
        )
    if cfg["schedule"]["temperature"] != 1.0:
        out.append(
            f"schedule.temperature: {what}: the engine's top-K log-probs are of the untempered "
            f"distribution while verl's loss divides pi's logits by "
            f"{cfg['schedule']['temperature']}; sample at temperature 1.0"
        )
    return out

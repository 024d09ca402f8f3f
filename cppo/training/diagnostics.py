"""Per-optimizer-step diagnostics: the train records of metrics.jsonl (cppo.run.metrics).

Micro-steps add sums and counts (device tensors, no host sync); at the optimizer-step boundary
`StepAccumulator.finalize` reduces them over processes and returns one record with exactly the
keys of the metrics contract (plus the optional deviation bins). Definitions:

- reward/mean, accuracy (reward > 0), length/mean, length/max (completion tokens),
  truncation_rate, groups/zero_std_fraction: over the responses used in this optimizer step
  (each response of a rollout batch is used in exactly one step).
- entropy, divergence/mean, ratio/abs_dev_mean, deviation bins: over all response tokens.
- mask/*: over the loss-eligible tokens (response tokens of groups kept by mask_std_0):
  mask/fraction = share of terms the rule masked (as the rule reports it; else the share with
  keep False); mask/token_fraction and
  mask/prefix_fraction split it for CPPO (token threshold vs prefix budget; both are shares of
  all eligible tokens, so the prefix budget's share of masked tokens is their ratio);
  cppo/delta_b_eff = mean effective delta_b (CPPO only, else null).
- logprob/rel_error: sum |log mu_engine - log mu_trainer| / sum |log mu_trainer| over response
  tokens when the rollout engine and the trainer both give log-probs (vLLM), else null.
- logprob/engine_topk_tv: mean per response token of the Top-K TV between the engine's
  distribution (its top-K, the rollout anchor) and the trainer's at the same positions and
  weights, when the engine records mu's top-K (vLLM, anchor rollout, a Top-K divergence): the
  rollout/training mismatch of the paper's Fig. 2 (a bf16 engine under an fp32 trainer).
- every other diagnostic the rule reports (e.g. grpo/dual_clip_fraction, cispo/capped_fraction,
  trm/reject_fraction, cppo/prefix_share, outward/fraction), by its own name, averaged over
  the micro-steps weighted by their eligible tokens; the trainer's own keys above win.
- deviation/bin{i}/mean and /top10: |pi(y_t) - mu(y_t)| in relative-position bin i
  (t / T in [i/n, (i+1)/n)), its mean and the mean of its largest 10%.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from transformers import TrainerCallback

from cppo.run.metrics import RULE_KEYS, TRAIN_KEYS

_MEANS = {
    # record key: (numerator, denominator) accumulator names
    "reward/mean": ("reward", "responses"),
    "accuracy": ("correct", "responses"),
    "length/mean": ("length", "responses"),
    "truncation_rate": ("truncated", "responses"),
    "groups/zero_std_fraction": ("zero_std", "responses"),
    "entropy": ("entropy", "tokens"),
    "divergence/mean": ("divergence", "tokens"),
    "ratio/abs_dev_mean": ("abs_dev", "tokens"),
    "mask/fraction": ("masked", "eligible"),
}
_SUMS = (
    "reward",
    "correct",
    "length",
    "truncated",
    "zero_std",
    "responses",
    "entropy",
    "divergence",
    "abs_dev",
    "tokens",
    "masked",
    "eligible",
    "rel_err_num",
    "rel_err_den",
    "engine_tv",
    "engine_tokens",
    "processed_tokens",
)


def _finite_or_none(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(x)


class StepAccumulator:
    """Sums over the micro-steps of one optimizer step."""

    def __init__(self, device: torch.device, deviation_bins: int = 0):
        self.device = device
        self.deviation_bins = deviation_bins
        self.reset()

    def reset(self) -> None:
        self.sums = {k: torch.zeros((), dtype=torch.float64, device=self.device) for k in _SUMS}
        self.length_max = torch.zeros((), dtype=torch.float64, device=self.device)
        self.has_rel_err = False
        # key -> [sum(value * w), sum(w)] as float64 device tensors, reduced once per step
        self.rule: dict[str, list[torch.Tensor]] = {}
        self.deviation: list[list[torch.Tensor]] = [[] for _ in range(self.deviation_bins)]

    def add(self, name: str, value: torch.Tensor | float) -> None:
        self.sums[name] += torch.as_tensor(value, dtype=torch.float64, device=self.device).sum()

    def add_max(self, value: torch.Tensor) -> None:
        if value.numel():
            self.length_max = torch.maximum(self.length_max, value.max().to(torch.float64))

    def add_rule_metrics(self, metrics: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
        """A rule's diagnostics (0-dim tensors) weighted by the micro-step's eligible tokens."""
        w = torch.as_tensor(weight, dtype=torch.float64, device=self.device)
        for key, value in metrics.items():
            v = torch.as_tensor(value, dtype=torch.float64, device=self.device) * w
            if key in self.rule:
                self.rule[key][0] += v
                self.rule[key][1] += w
            else:
                self.rule[key] = [v, w.clone()]

    @torch.no_grad()
    def add_micro_step(
        self,
        inputs: dict[str, Any],
        logps: torch.Tensor,
        entropies: torch.Tensor,
        divergence: torch.Tensor | None,
        resp: torch.Tensor,
        eligible: torch.Tensor,
        rows: torch.Tensor,
        out: Any,
    ) -> None:
        """One micro-step of the loss: its responses, tokens and the rule's output `out`
        (None when no row was eligible) over the loss rows `rows`."""
        rewards = inputs["rewards"]
        self.add("responses", float(rewards.numel()))
        self.add("reward", rewards)
        self.add("correct", (rewards > 0).float())
        lengths = inputs["completion_lengths"].float()
        self.add("length", lengths)
        self.add_max(lengths)
        self.add("truncated", inputs["truncated"].float())
        self.add("zero_std", (~inputs["group_keep"]).float())
        self.add("processed_tokens", inputs["prompt_mask"].sum() + inputs["completion_mask"].sum())
        mu = inputs["mu_logps"]
        self.add("tokens", resp.sum())
        self.add("entropy", entropies[resp])
        if divergence is not None:
            self.add("divergence", divergence[resp])
        log_ratio = (logps - mu)[resp]
        self.add("abs_dev", (torch.exp(log_ratio) - 1.0).abs())
        n_elig = eligible.sum().to(torch.float64)
        self.add("eligible", n_elig)
        if out is not None:
            self.add("masked", (~out.keep & eligible[rows]).sum())
            self.add_rule_metrics(out.metrics, n_elig)
        if "trainer_logps" in inputs:
            self.add("rel_err_num", (inputs["engine_logps"] - inputs["trainer_logps"]).abs()[resp])
            self.add("rel_err_den", inputs["trainer_logps"].abs()[resp])
        if "engine_topk_tv" in inputs:
            self.add("engine_tv", inputs["engine_topk_tv"][resp])
            self.add("engine_tokens", resp.sum())
        if self.deviation_bins:
            dev = (torch.exp(logps) - torch.exp(mu)).abs()[resp]
            lengths_resp = resp.sum(dim=1, keepdim=True).clamp(min=1)
            pos = torch.cumsum(resp.long(), dim=1) - 1
            rel = (pos.float() / lengths_resp.float())[resp]
            self.add_deviation(dev, rel)

    def add_deviation(self, dev: torch.Tensor, rel_pos: torch.Tensor) -> None:
        """dev, rel_pos: 1-d tensors over response tokens; rel_pos in [0, 1)."""
        if not self.deviation_bins or dev.numel() == 0:
            return
        bins = (rel_pos * self.deviation_bins).long().clamp(0, self.deviation_bins - 1)
        for i in range(self.deviation_bins):
            self.deviation[i].append(dev[bins == i].detach().float())

    def finalize(self, accelerator: Any) -> dict[str, float | None]:
        """Reduce over processes; returns the record's statistics (without grad_norm, lr, time)."""
        names = list(_SUMS)
        local = torch.stack([self.sums[k] for k in names])
        total = (
            accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
        )
        tot = dict(zip(names, total.tolist(), strict=True))
        lmax = self.length_max
        if accelerator.num_processes > 1:
            lmax = accelerator.gather(lmax.reshape(1)).max()
        out: dict[str, float | None] = {}
        for key, (num, den) in _MEANS.items():
            out[key] = tot[num] / tot[den] if tot[den] > 0 else None
        out["length/max"] = float(lmax) if tot["responses"] > 0 else None
        out["logprob/rel_error"] = (
            tot["rel_err_num"] / tot["rel_err_den"] if tot["rel_err_den"] > 0 else None
        )
        out["logprob/engine_topk_tv"] = (
            tot["engine_tv"] / tot["engine_tokens"] if tot["engine_tokens"] > 0 else None
        )
        rule = self._reduce_rule(accelerator)
        for key in RULE_KEYS:
            # the rule's own count wins (a soft gate down-weights without zeroing)
            out[key] = rule.get(key, out.get(key) if key == "mask/fraction" else None)
        for key, value in rule.items():
            out.setdefault(key, value)
        out["_processed_tokens"] = tot["processed_tokens"]
        out.update(self._deviation_stats(accelerator))
        return {k: (_finite_or_none(v) if k != "_processed_tokens" else v) for k, v in out.items()}

    def _reduce_rule(self, accelerator: Any) -> dict[str, float]:
        keys = sorted(self.rule)
        if accelerator.num_processes > 1:
            # a process whose micro-steps had nothing eligible reported no keys
            from accelerate.utils import gather_object

            keys = sorted(set(gather_object(keys)))
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        pairs = [v for key in keys for v in self.rule.get(key, (zero, zero))]
        local = torch.stack(pairs) if pairs else zero.new_zeros(0)
        if accelerator.num_processes > 1:
            local = accelerator.reduce(local, reduction="sum")
        vals = local.tolist()
        res = {}
        for i, key in enumerate(keys):
            s, w = vals[2 * i], vals[2 * i + 1]
            if w > 0:
                res[key] = s / w
        return res

    def _deviation_stats(self, accelerator: Any) -> dict[str, float | None]:
        res: dict[str, float | None] = {}
        for i in range(self.deviation_bins):
            vals = (
                torch.cat(self.deviation[i])
                if self.deviation[i]
                else torch.zeros(0, device=self.device)
            )
            if accelerator.num_processes > 1:
                padded = accelerator.pad_across_processes(vals, dim=0, pad_index=-1.0)
                vals = accelerator.gather(padded)
                vals = vals[vals >= 0]
            if vals.numel() == 0:
                res[f"deviation/bin{i}/mean"] = None
                res[f"deviation/bin{i}/top10"] = None
                continue
            k = max(1, math.ceil(0.1 * vals.numel()))
            res[f"deviation/bin{i}/mean"] = float(vals.mean())
            res[f"deviation/bin{i}/top10"] = float(torch.topk(vals, k).values.mean())
        return res


class StepLog(TrainerCallback):
    """Per-optimizer-step bookkeeping: times the step, holds its micro-step sums (`acc`) and turns
    them into the step's metrics.jsonl record.

    `rule_keys` (the rule's diagnostic keys) are written at every step, null where the rule did
    not run; `logs_divergence` False writes divergence/mean as null (no divergence computed).
    """

    def __init__(
        self,
        device: torch.device,
        deviation_bins: int,
        rule_keys: list[str],
        logs_divergence: bool,
    ):
        self.acc = StepAccumulator(device, deviation_bins)
        self.keys = [*TRAIN_KEYS, *rule_keys]
        self.logs_divergence = logs_divergence
        self.started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def record(self, step: int, logs: dict[str, Any], accelerator: Any) -> dict[str, Any]:
        """The record of optimizer step `step` (the trainer's `logs` give grad_norm and lr);
        resets the sums for the next step."""
        stats = self.acc.finalize(accelerator)
        self.acc.reset()
        elapsed = time.perf_counter() - self.started if self.started is not None else None
        processed = stats.pop("_processed_tokens")
        stats["grad_norm"] = logs.get("grad_norm")
        stats["learning_rate"] = logs.get("learning_rate")
        stats["time/step_s"] = elapsed
        stats["throughput/tokens_per_s"] = processed / elapsed if elapsed else None
        if not self.logs_divergence:
            stats["divergence/mean"] = None
        record: dict[str, Any] = {"kind": "train", "step": int(step)}
        # the contract keys and the rule's own, then the deviation bins
        for key in dict.fromkeys([*self.keys, *stats]):
            value = stats.get(key)
            record[key] = None if value is None or not math.isfinite(float(value)) else float(value)
        return record

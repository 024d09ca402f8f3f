"""Rule metrics are 0-dim detached tensors, and float() of each is bit for bit the python float
the rule reported before metrics became tensors.

The expected values are computed here from the metrics' definitions: per-token decisions by
python loops over the batch (or the plain-Python references), reductions with the former
python-float formulas (``float(sum / int(n))`` in the values' dtype, python ``int / int``, the
mean of the selected rows)."""

from __future__ import annotations

import math
import random
import struct

import pytest
import torch

from cppo.rules import RuleBatch, available_rules, get_rule, metrics_to_floats
from cppo.rules.reference import cppo_batch_reference, is_outward

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIGS = {
    "grpo": [{}, {"dual_clip": None, "ratio_cap": 1.1}],
    "cispo": [{}, {"cap": 1.1, "cap_low": 0.95}],
    "dppo": [{}, {"ratio_cap": 1.1}],
    "none": [{}],
    "minpro": [{}, {"include_current": False, "eps_low": 0.02, "eps_high": 0.02}],
    "trm_max": [{}, {"delta": 0.2, "keep_inward": True, "ratio_cap": 1.1}],
    "trm_avg": [{}, {"delta_avg": 0.1}],
    "cppo": [
        {},
        {"gate": "soft", "ratio_cap": 1.1},
        {"adaptive_delta_b": False, "delta": 0.1, "w_min": 0.5},
    ],
    "gspo": [{}, {"eps_low": 0.05, "eps_high": 0.05}],
    "gmpo": [{}, {"eps_low": 0.05, "eps_high": 0.1}],
    "sapo": [{}],
    "icepop": [{}, {"low": 0.9, "high": 1.1}],
    "opsm": [{}, {"threshold": 0.01}],
    "m2po": [{}, {"tau": 0.001, "scope": "outward"}],
}

# Diagnostics of the rules beyond the paper that are means of real numbers (not shares of
# counts), compared to a python float64 computation within 1e-12 (1e-6 for float32 batches)
APPROX_KEYS = {
    "gspo/seq_ratio_abs_dev_mean",
    "gmpo/seq_ratio_abs_dev_mean",
    "sapo/gate_mean",
    "sapo/gate_outward_mean",
    "sapo/damping_mean",
    "m2po/m2_before",
    "m2po/m2_after",
}


def random_batch(rng: random.Random, dtype: torch.dtype, empty_row: bool) -> RuleBatch:
    B, T = rng.randint(2, 6), rng.randint(1, 40)
    lengths = [rng.randint(1, T) for _ in range(B)]
    if empty_row:
        lengths[rng.randrange(B)] = 0
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    logp_mu = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = logp_mu + torch.randn(B, T, generator=g, dtype=torch.float64) * rng.choice([0.02, 0.2])
    D = torch.rand(B, T, generator=g, dtype=torch.float64) ** 2 * rng.choice([0.1, 0.4])
    if rng.random() < 0.5:
        A = torch.randn(B, generator=g, dtype=torch.float64)
    else:
        A = torch.randn(B, T, generator=g, dtype=torch.float64)
    logp = logp.masked_fill(~mask, float("nan")).to(dtype).requires_grad_(True)
    D = D.masked_fill(~mask, float("nan")).to(dtype)
    return RuleBatch(logp, logp_mu.to(dtype), A.to(dtype), mask, divergence=D, seed=3)


def old_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """The former masked_mean: the masked sum in x's dtype over a python int, as a python float."""
    n = int(mask.sum())
    if n == 0:
        return 0.0
    return float(torch.where(mask, x, torch.zeros((), dtype=x.dtype)).sum() / n)


def share(count: int, n: int, dtype: torch.dtype) -> float:
    """The mean of a 0/1 indicator in ``dtype``: count / n rounded once to dtype (the sum of
    0/1 values is exact; rounding the double quotient to float32 is innocuous)."""
    return torch.tensor(count / n, dtype=dtype).item() if n else 0.0


def tokens(mask: torch.Tensor):
    """(b, t) of every real token."""
    B, T = mask.shape
    return [(b, t) for b in range(B) for t in range(T) if mask[b, t]]


def expected_metrics(name: str, cfg: dict, batch: RuleBatch, out) -> dict[str, float]:
    rule = get_rule(name)
    c = rule.resolve(cfg)
    mask = batch.mask
    real = tokens(mask)
    n = len(real)
    lr = batch.log_ratio().detach()
    dt = lr.dtype
    r = torch.exp(lr.clamp(-c["log_ratio_clamp"], c["log_ratio_clamp"]))
    rl, al = r.tolist(), batch.advantages_2d().tolist()
    lrl = lr.tolist()
    keep = out.keep.tolist()
    e: dict[str, float] = {"ratio/abs_dev_mean": old_mean((r - 1.0).abs(), mask)}
    e["mask/fraction"] = share(sum(not keep[b][t] for b, t in real), n, dt)
    # every rule reports the batch's divergence: finite on real tokens here, 0 on padding
    e["divergence/mean"] = old_mean(batch.divergence_2d().to(dt), mask)
    outward = {(b, t): is_outward(al[b][t], lrl[b][t]) for b, t in real}
    if name not in ("cispo", "minpro"):
        e["outward/fraction"] = share(sum(outward.values()), n, dt)
    cap = c.get("ratio_cap")
    if cap is not None:
        passing = sum(rl[b][t] > cap and keep[b][t] for b, t in real)
        e["ratio/capped_fraction"] = share(passing, n, dt)

    if name == "grpo" and c["dual_clip"] is not None:
        dual = sum(al[b][t] < 0 and rl[b][t] > c["dual_clip"] for b, t in real)
        e["grpo/dual_clip_fraction"] = share(dual, n, dt)
    if name == "cispo":
        e["cispo/capped_fraction"] = share(sum(rl[b][t] > c["cap"] for b, t in real), n, dt)
        e["cispo/weight_mean"] = old_mean(out.weight, mask)
    if name == "minpro":
        B, T = mask.shape
        log_m = [[0.0] * T for _ in range(B)]
        for b in range(B):
            run = math.inf  # min of the clamped log-ratios of the earlier real tokens
            for t in range(T):
                if mask[b, t]:
                    log_m[b][t] = 0.0 if math.isinf(run) else run
                    run = min(run, max(-20.0, min(20.0, lrl[b][t])))
        lm = torch.tensor(log_m, dtype=dt)
        raw = torch.exp(lm + lr.clamp(-20.0, 20.0)) if c["include_current"] else torch.exp(lm)
        lo, hi = 1.0 - c["eps_low"], 1.0 + c["eps_high"]
        rawl = raw.tolist()
        e["minpro/weight_mean"] = old_mean(out.weight, mask)
        e["minpro/prefix_min_mean"] = old_mean(torch.exp(lm), mask)
        e["minpro/clip_fraction"] = share(
            sum(not lo <= rawl[b][t] <= hi for b, t in real), n, lm.dtype
        )
    if name.startswith("trm"):
        kl = batch.divergence_2d().double().tolist()
        rows = [b for b in range(mask.shape[0]) if mask[b].any()]
        scores = []
        for b in rows:
            vals = [kl[b][t] for t in range(mask.shape[1]) if mask[b, t]]
            if name == "trm_max":
                scores.append(max(vals))
            else:  # the rule's own row mean: torch's row sum over the padded row / its length
                row = torch.tensor(kl[b], dtype=torch.float64).masked_fill(~mask[b], 0.0)
                scores.append((row.sum() / len(vals)).item())
        threshold = c["delta"] if name == "trm_max" else c["delta_avg"]
        rejected = sum(s > threshold for s in scores)
        e["trm/reject_fraction"] = rejected / len(rows) if rows else 0.0
        e["trm/score_mean"] = (
            float(torch.tensor(scores, dtype=torch.float64).mean()) if rows else 0.0
        )
    e.update(extended_metrics(name, c, mask, real, n, lrl, rl, al, keep, outward, dt))
    if name == "cppo":
        lengths = mask.sum(-1).tolist()
        w, db, kinds = cppo_batch_reference(
            batch.divergence_2d().double().tolist(),
            lr.double().tolist(),
            batch.advantages_2d().double().tolist(),
            lengths,
            delta=c["delta"],
            delta_b=c["delta_b"],
            w_min=c["w_min"],
            adaptive_delta_b=c["adaptive_delta_b"],
            soft=c["gate"] == "soft",
        )
        n_token = sum(k == "token" for row in kinds for k in row)
        n_prefix = sum(k == "prefix" for row in kinds for k in row)
        f64 = torch.float64
        e["mask/fraction"] = share(n_token + n_prefix, n, f64)
        e["mask/token_fraction"] = share(n_token, n, f64)
        e["mask/prefix_fraction"] = share(n_prefix, n, f64)
        e["cppo/prefix_share"] = n_prefix / (n_token + n_prefix) if n_token + n_prefix else 0.0
        rows = [b for b, L in enumerate(lengths) if L]
        e["cppo/delta_b_eff"] = (
            float(torch.tensor([db[b] for b in rows], dtype=f64).mean()) if rows else c["delta_b"]
        )
        if c["gate"] == "soft":
            e["cppo/gate_mean"] = old_mean(torch.tensor(w, dtype=f64), mask)
        if cap is not None:  # the terms passing gradient: weight > 0
            passing = sum(rl[b][t] > cap and w[b][t] > 0 for b, t in real)
            e["ratio/capped_fraction"] = share(passing, n, dt)
    return e


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def extended_metrics(name, c, mask, real, n, lrl, rl, al, keep, outward, dt) -> dict[str, float]:
    """The rule-specific diagnostics of the rules beyond the paper, from their definitions."""
    e: dict[str, float] = {}
    rows = [[t for t in range(mask.shape[1]) if mask[b, t]] for b in range(mask.shape[0])]
    if name in ("gspo", "gmpo"):
        dev = []
        for b, ts in enumerate(rows):
            if not ts:
                continue
            if name == "gspo":
                s = math.exp(max(-20.0, min(20.0, _mean([lrl[b][t] for t in ts]))))
            else:
                logs = []
                for t in ts:
                    lr = max(-20.0, min(20.0, lrl[b][t]))
                    clipped = min(max(lr, -c["eps_low"]), c["eps_high"])
                    a = al[b][t]
                    logs.append(min(lr, clipped) if a > 0 else max(lr, clipped) if a < 0 else 0.0)
                s = math.exp(_mean(logs))
            dev.append(abs(s - 1.0))
        e[f"{name}/seq_ratio_abs_dev_mean"] = _mean(dev)
    if name == "sapo":
        gate = {}
        for b, t in real:
            tau = c["tau_pos"] if al[b][t] > 0 else c["tau_neg"]
            sig = 1.0 / (1.0 + math.exp(-tau * (rl[b][t] - 1.0)))
            gate[b, t] = 4.0 * sig * (1.0 - sig)
        e["sapo/gate_mean"] = _mean(list(gate.values()))
        e["sapo/gate_outward_mean"] = _mean([g for bt, g in gate.items() if outward[bt]])
        e["sapo/damping_mean"] = _mean([1.0 - g for g in gate.values()])
    if name == "icepop":
        e["icepop/below_fraction"] = share(sum(rl[b][t] < c["low"] for b, t in real), n, dt)
        e["icepop/above_fraction"] = share(sum(rl[b][t] > c["high"] for b, t in real), n, dt)
    if name == "opsm":
        dropped = 0
        for b, ts in enumerate(rows):
            drift = -_mean([lrl[b][t] for t in ts]) if ts else 0.0
            dropped += sum(al[b][t] < 0 and drift > c["threshold"] for t in ts)
        e["opsm/masked_fraction"] = share(dropped, n, dt)
    if name == "m2po":
        sel = [bt for bt in real if c["scope"] == "all" or outward[bt]]
        sq = {bt: lrl[bt[0]][bt[1]] ** 2 for bt in sel}
        e["m2po/m2_before"] = _mean(list(sq.values()))
        e["m2po/m2_after"] = _mean([v for bt, v in sq.items() if keep[bt[0]][bt[1]]])
    return e


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_every_rule_has_configs_here():
    assert set(CONFIGS) == set(available_rules())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_metrics_are_tensors_equal_to_the_former_python_floats(name):
    rng = random.Random(sum(map(ord, name)))
    for i in range(24):
        dtype = (torch.float64, torch.float32)[i % 2]
        batch = random_batch(rng, dtype, empty_row=i % 3 == 0)
        for cfg in CONFIGS[name]:
            out = get_rule(name)(batch, cfg)
            for key, v in out.metrics.items():
                assert isinstance(v, torch.Tensor) and v.dim() == 0, key
                assert not v.requires_grad and v.device == batch.logp.device, key
            got = {k: float(v) for k, v in out.metrics.items()}
            want = expected_metrics(name, cfg, batch, out)
            assert got.keys() == want.keys(), (name, cfg)
            for key in want:
                if key in APPROX_KEYS:
                    tol = 1e-6 if dtype == torch.float32 else 1e-12
                    assert got[key] == pytest.approx(want[key], rel=tol, abs=tol), (name, key)
                else:
                    assert bits(got[key]) == bits(want[key]), (name, cfg, key, got[key], want[key])
            assert metrics_to_floats(out.metrics) == got


def test_empty_batch_metrics_are_zero():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    x = torch.full((2, 3), float("nan"), dtype=torch.float64)
    batch = RuleBatch(x, x, torch.ones(2, dtype=torch.float64), mask, divergence=x)
    for name in available_rules():
        out = get_rule(name)(batch, {})
        want = {k: 0.0 for k in out.metrics}
        if name == "cppo":
            want["cppo/delta_b_eff"] = 0.02  # the configured delta_b
        assert metrics_to_floats(out.metrics) == want, name

"""The GPU smoke script's CPU-checkable parts: its divergence and its noise-floor run."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "benchmarks" / "gpu_smoke.py")
gpu_smoke = importlib.util.module_from_spec(spec)
sys.modules["gpu_smoke"] = gpu_smoke
spec.loader.exec_module(gpu_smoke)


def direct_topk_tv(p_mu: list[float], p_pi: list[float], k: int, token: int) -> float:
    """0.5 (sum over mu's top-k ids and the sampled token of |p - q| + |rest_p - rest_q|)."""
    order = sorted(range(len(p_mu)), key=lambda i: -p_mu[i])
    ids = set(order[:k]) | {token}
    diff = sum(abs(p_pi[i] - p_mu[i]) for i in ids)
    rest = abs((1 - sum(p_pi[i] for i in ids)) - (1 - sum(p_mu[i] for i in ids)))
    return 0.5 * (diff + rest)


def test_topk_tv_rows_equals_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    logp_mu = torch.log_softmax(3 * torch.randn(5, 40, generator=g, dtype=torch.float64), -1)
    logp_pi = torch.log_softmax(
        logp_mu + 0.3 * torch.randn(5, 40, generator=g, dtype=torch.float64), -1
    )
    # rows 0-2: a sampled token outside mu's top-k; rows 3-4: inside
    tokens = torch.stack(
        [logp_mu[i].argsort()[i] for i in range(3)] + [logp_mu[3].argmax(), logp_mu[4].argmax()]
    )
    got = gpu_smoke.topk_tv_rows(logp_mu, logp_pi, tokens, k=6)
    for n in range(5):
        want = direct_topk_tv(
            logp_mu[n].exp().tolist(), logp_pi[n].exp().tolist(), 6, int(tokens[n])
        )
        assert math.isclose(float(got[n]), want, rel_tol=1e-9, abs_tol=1e-12)


def test_noise_floor_runs_on_cpu(tmp_path):
    ns = type(
        "A",
        (),
        dict(
            vocab_size=300,
            hidden_size=32,
            layers=1,
            logit_std=4.0,
            sequences=2,
            tokens=8,
            device="cpu",
        ),
    )()
    model = gpu_smoke.build_model(ns, tmp_path / "m")
    r = gpu_smoke.noise_floor(model, ns)
    assert r["self_D"] == 0.0
    for head in ("bf16_head", "fp32_head"):
        s = r[head]
        # bf16 rounding moves the distribution (D > 0); responses have equal length, so the
        # token mean is the mean of the per-response means, at most their maximum
        assert 0.0 < s["mean_D"] <= s["max_resp_mean"] + 1e-12 < 1.0
        assert s["p99_D"] <= 1.0

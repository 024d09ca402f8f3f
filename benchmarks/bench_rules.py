"""Benchmark the trust-region rules and divergences at training scale (default B=64, T=8192,
fp32, one thread), against ``torch.cumsum`` + ``torch.quantile`` and against loops.

    python benchmarks/bench_rules.py [--batch 64] [--length 8192] [--threads 1]

Prints one table: case, median and best time over ``--repeats`` runs, and peak extra memory
(peak resident memory during one call above the memory held before it, inputs excluded,
output included). Memory is measured in a child process started with
``MALLOC_MMAP_THRESHOLD_=65536`` so that every large buffer is its own mapping, returned to the
OS when freed; peak RSS then follows live tensor memory. Timing runs in this process with the
default allocator.

Inputs: responses of random length in [T/2, T] (the first one full), D ~ U(0,1)^3 * 0.3,
log-ratio ~ N(0, 0.05^2), one advantage per response, Top-K inputs with K = 20.

Loops (too slow to run in full; timed on a subset and extrapolated linearly in the number of
tokens, marked "extrapolated"):
  * Algorithm 1, plain Python: :func:`cppo.rules.reference.cppo_batch_reference` on python
    floats, including the tensor -> list conversion, on ``--loop-rows`` responses;
  * Algorithm 1, torch per token: the same loop written with torch scalar ops on tensors, on
    ``--torch-loop-tokens`` tokens;
  * per-response torch loop (not extrapolated): a loop over responses, each vectorised with
    cumsum and ``torch.quantile``, the shape of the official implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from cppo.divergence import binary_kl, binary_tv, topk_kl, topk_tv
from cppo.rules import RuleBatch, aggregate_loss, cppo_mask, dppo_mask, get_rule
from cppo.rules.reference import cppo_batch_reference

DELTA, DELTA_B, W_MIN, K = 0.15, 0.02, 0.8, 20


def make_inputs(B: int, T: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(-1)
    D = torch.rand(B, T, generator=g) ** 3 * 0.3
    lr = torch.randn(B, T, generator=g) * 0.05
    A = torch.randn(B, generator=g)
    logp_mu = -torch.rand(B, T, generator=g) * 3
    logp = (logp_mu + lr).requires_grad_(True)
    topk_logp_mu, _ = torch.sort(torch.log_softmax(torch.randn(B, T, K, generator=g), -1), -1, True)
    topk_logp_mu = topk_logp_mu - 0.1  # top-K holds ~90% of the mass
    topk_logp = topk_logp_mu + torch.randn(B, T, K, generator=g) * 0.05
    topk_ids = torch.randint(0, 151936, (B, T, K), generator=g)
    token_ids = torch.where(
        torch.rand(B, T, generator=g) < 0.8, topk_ids[..., 0], torch.randint(0, 151936, (B, T))
    )
    return dict(
        mask=mask,
        D=D,
        lr=lr,
        A=A,
        logp=logp,
        logp_mu=logp_mu,
        topk_logp=topk_logp,
        topk_logp_mu=topk_logp_mu,
        topk_ids=topk_ids,
        token_ids=token_ids,
    )


def cases(x: dict) -> dict[str, Callable[[], object]]:
    m, D, lr, A = x["mask"], x["D"], x["lr"], x["A"]
    batch = RuleBatch(x["logp"], x["logp_mu"], A, m, divergence=D, seed=1)
    kw = dict(delta=DELTA, delta_b=DELTA_B, w_min=W_MIN)
    tk = (
        x["logp"].detach(),
        x["logp_mu"],
        x["topk_logp"],
        x["topk_logp_mu"],
        x["topk_ids"],
        x["token_ids"],
        m,
    )

    def rule(name: str, cfg: dict | None = None):
        r = get_rule(name).bind(cfg)  # the config resolved once, as the trainer does
        return lambda: r(batch)

    def rule_and_backward(name: str):
        r = get_rule(name).bind()

        def f():
            out = r(batch)
            loss = aggregate_loss(out.per_token_loss, m)
            torch.autograd.grad(loss, batch.logp)

        return f

    return {
        "baseline: torch.cumsum [B,T]": lambda: torch.cumsum(D, -1),
        "baseline: torch.quantile(q=0.9, dim=-1)": lambda: torch.quantile(D, 0.9, dim=-1),
        "cppo_mask fixed delta_b": lambda: cppo_mask(D, lr, A, m, **kw),
        "cppo_mask adaptive delta_b": lambda: cppo_mask(D, lr, A, m, adaptive_delta_b=True, **kw),
        "cppo_mask adaptive + shuffled w": lambda: cppo_mask(
            D, lr, A, m, adaptive_delta_b=True, shuffle_seed=1, **kw
        ),
        "dppo_mask": lambda: dppo_mask(D, lr, A, m, delta=DELTA),
        "rule cppo (hard, adaptive; loss+metrics)": rule("cppo"),
        "rule cppo (soft gate)": rule("cppo", {"gate": "soft"}),
        "rule cppo + aggregate + backward": rule_and_backward("cppo"),
        "rule dppo": rule("dppo"),
        "rule grpo": rule("grpo"),
        "rule cispo": rule("cispo"),
        "rule trm_max": rule("trm_max"),
        "rule trm_avg": rule("trm_avg"),
        "rule minpro": rule("minpro"),
        "binary_tv": lambda: binary_tv(x["logp"].detach(), x["logp_mu"], m),
        "binary_kl": lambda: binary_kl(x["logp"].detach(), x["logp_mu"], m),
        f"topk_tv K={K} (from [B,T,K] log-probs)": lambda: topk_tv(*tk),
        f"topk_tv K={K}, sampled_token=replace": lambda: topk_tv(*tk, sampled_token="replace"),
        f"topk_kl K={K}": lambda: topk_kl(*tk),
    }


def time_it(f: Callable[[], object], repeats: int) -> tuple[float, float]:
    f()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), min(ts)


# ---------------------------------------------------------------------------------------------
# loops
# ---------------------------------------------------------------------------------------------


def loop_python(x: dict, rows: int) -> float:
    """Seconds for the plain-Python Algorithm 1 on `rows` responses (conversion included)."""
    m = x["mask"][:rows]
    n = m.sum(-1).tolist()
    t0 = time.perf_counter()
    D = x["D"][:rows].double().tolist()
    lr = x["lr"][:rows].double().tolist()
    A = x["A"][:rows].double().unsqueeze(-1).expand(m.shape).tolist()
    cppo_batch_reference(
        D, lr, A, n, delta=DELTA, delta_b=DELTA_B, w_min=W_MIN, adaptive_delta_b=True
    )
    return time.perf_counter() - t0


def loop_torch_per_token(x: dict, tokens: int) -> float:
    """Seconds for Algorithm 1 with torch scalar ops on the first `tokens` of response 0."""
    D, lr, A = x["D"][0], x["lr"][0], x["A"][0]
    T = int(x["mask"][0].sum())
    t0 = time.perf_counter()
    db = torch.quantile(D[:T], 0.9).clamp(DELTA_B, 2 * DELTA_B)
    S = torch.zeros(())
    W = torch.zeros(())
    keep = torch.zeros(tokens, dtype=torch.bool)
    for t in range(tokens):
        w = 1.0 - (1.0 - W_MIN) * t / (T - 1)
        Z = w * D[t]
        c = torch.minimum(torch.tensor(DELTA), DELTA + db * W - S)
        outward = A * (torch.exp(lr[t]) - 1.0) > 0
        keep[t] = (~outward) | (c >= Z)
        S = S + Z
        W = W + w
    return time.perf_counter() - t0


def loop_per_response(x: dict) -> float:
    """Seconds for a loop over responses, each vectorised (the official code's shape)."""
    m, D, lr, A = x["mask"], x["D"], x["lr"], x["A"]
    t0 = time.perf_counter()
    out = []
    for b in range(m.shape[0]):
        n = int(m[b].sum())
        d = D[b, :n]
        pos = torch.arange(1, n + 1, dtype=d.dtype)
        w = 1.0 - (1.0 - W_MIN) * (pos - 1) / max(n - 1, 1)
        z = w * d
        s_prev = torch.cat([z.new_zeros(1), torch.cumsum(z, 0)[:-1]])
        w_prev = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)[:-1]])
        db = torch.quantile(d, 0.9).clamp(DELTA_B, 2 * DELTA_B)
        c = torch.minimum(torch.full_like(z, DELTA), DELTA + db * w_prev - s_prev)
        inward = A[b] * (torch.exp(lr[b, :n]) - 1.0) <= 0
        out.append(inward | (z <= c))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# memory (child process)
# ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory(B: int, T: int, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    x = make_inputs(B, T)
    out: dict[str, float] = {}
    for name, f in cases(x).items():
        f()  # warm-up: lazy initialisations are not the rule's memory
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset the peak-RSS counter
        base = _status_kb("VmRSS")
        res = f()
        out[name] = (_status_kb("VmHWM") - base) / 1024.0
        del res
    return out


def memory_in_child(args: argparse.Namespace) -> dict[str, float] | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(args.threads))
    cmd = [
        sys.executable,
        __file__,
        "--memory-child",
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--threads",
        str(args.threads),
    ]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        print(f"(memory measurement failed: {e})", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--loop-rows", type=int, default=4)
    p.add_argument("--torch-loop-tokens", type=int, default=1024)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_child:
        print(json.dumps(measure_memory(args.batch, args.length, args.threads)))
        return

    torch.set_num_threads(args.threads)
    B, T = args.batch, args.length
    x = make_inputs(B, T)
    n_tokens = int(x["mask"].sum())
    mem = None if args.no_memory else memory_in_child(args)

    rows: list[tuple[str, float, float, float | None]] = []
    times: dict[str, float] = {}
    for name, f in cases(x).items():
        med, best = time_it(f, args.repeats)
        times[name] = med
        rows.append((name, med * 1e3, best * 1e3, None if mem is None else mem.get(name)))

    sub_rows = min(args.loop_rows, B)
    sub_tokens = int(x["mask"][:sub_rows].sum())
    t_py = loop_python(x, sub_rows) * n_tokens / sub_tokens
    tok = min(args.torch_loop_tokens, int(x["mask"][0].sum()))
    t_pt = loop_torch_per_token(x, tok) * n_tokens / tok
    t_resp = statistics.median(loop_per_response(x) for _ in range(3))
    rows.append(
        (
            f"Alg.1 plain-Python loop (extrapolated from {sub_rows} rows)",
            t_py * 1e3,
            float("nan"),
            None,
        )
    )
    rows.append(
        (
            f"Alg.1 torch per-token loop (extrapolated from {tok} tokens)",
            t_pt * 1e3,
            float("nan"),
            None,
        )
    )
    rows.append(("per-response torch loop (official-code shape)", t_resp * 1e3, float("nan"), None))

    print(
        f"B={B}, T={T}, fp32, {n_tokens} response tokens, threads={args.threads}, "
        f"median/best of {args.repeats}; torch {torch.__version__}"
    )
    w = max(len(r[0]) for r in rows)
    print(f"| {'case':<{w}} | median ms | best ms | peak extra MiB |")
    print(f"|{'-' * (w + 2)}|----------:|--------:|---------------:|")
    for name, med, best, mb in rows:
        best_s = "" if best != best else f"{best:.2f}"
        mb_s = "" if mb is None else f"{mb:.1f}"
        print(f"| {name:<{w}} | {med:9.2f} | {best_s:>7} | {mb_s:>14} |")

    base = times["baseline: torch.cumsum [B,T]"] + times["baseline: torch.quantile(q=0.9, dim=-1)"]
    ad = times["cppo_mask adaptive delta_b"]
    print()
    print(
        f"cumsum + quantile = {base * 1e3:.2f} ms; cppo_mask (adaptive) = {ad * 1e3:.2f} ms "
        f"-> {ad / base:.2f}x of it (target < 2x)"
    )
    print(
        f"speed-up of cppo_mask (adaptive) over: plain-Python Alg.1 loop {t_py / ad:.0f}x, "
        f"torch per-token Alg.1 loop {t_pt / ad:.0f}x, per-response loop {t_resp / ad:.1f}x "
        f"(target >= 200x vs the Algorithm 1 loop)"
    )
    bt_k = B * T * (K + 1) * 4 / 2**20
    print(
        f"Top-K inputs are [B,T,K]; one [B,T,K+1] fp32 buffer = {bt_k:.0f} MiB; a [B,T,V] "
        f"fp32 tensor at V=151936 would be {B * T * 151936 * 4 / 2**30:.0f} GiB."
    )


if __name__ == "__main__":
    main()

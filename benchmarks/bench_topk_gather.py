"""Memory and time of pi's log-probs at mu's top-K ids from ``[tokens, V]`` logits, on CPU:
a full fp32 log-softmax then a gather, against ``cppo.backends.verl.topk.log_probs_at`` (fp32
chunks of rows, the verl Top-K loss's path).

    python benchmarks/bench_topk_gather.py [--tokens 4096] [--vocab 151936] [--topk 20]

Each alternative runs in a fresh process on one thread, holding the same bf16 logits; the
extra memory is the process's peak resident set (VmHWM, reset once the logits exist) minus its
resident set at that point (VmRSS), both from /proc. Results agree to fp32 rounding (printed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

GIB = 2**30


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _run(method: str, tokens: int, vocab: int, topk: int) -> dict:
    import torch

    from cppo.backends.verl.topk import log_probs_at

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(tokens, vocab, generator=g) * 3).bfloat16()
    ids = torch.randint(0, vocab, (tokens, topk), generator=g)
    with open("/proc/self/clear_refs", "w") as fh:  # the peak so far (the fp32 draw) is reset
        fh.write("5")
    base = _status("VmRSS")
    start = time.perf_counter()
    if method == "full":
        out = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids)
    else:
        out = log_probs_at(logits, ids)
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "extra_gib": (_status("VmHWM") - base) / GIB,
        "seconds": seconds,
        "checksum": float(out.double().sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_run(a.child, a.tokens, a.vocab, a.topk)))
        return 0
    rows = []
    for method in ("full", "chunked"):
        cmd = [sys.executable, __file__, "--child", method, "--tokens", str(a.tokens),
               "--vocab", str(a.vocab), "--topk", str(a.topk)]  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    logits_gib = a.tokens * a.vocab * 2 / GIB
    print(f"{a.tokens} tokens x {a.vocab} vocabulary, K={a.topk}; bf16 logits {logits_gib:.2f} GiB")
    for r in rows:
        print(f"  {r['method']:<8} extra peak {r['extra_gib']:.2f} GiB  {r['seconds']:.2f} s")
    full, chunked = rows
    print(f"  memory ratio full / chunked {full['extra_gib'] / max(chunked['extra_gib'], 1e-9):.1f}x;"
          f" time ratio {full['seconds'] / chunked['seconds']:.2f}x;"
          f" checksum difference {abs(full['checksum'] - chunked['checksum']):.3g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

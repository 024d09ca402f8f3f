"""Wall time of the toy testbed's preparation steps, and Avg@16 after each warm start.

Runs the CLI as the pipeline would (one process per step) in a work directory:
data -> tokenizer -> model (per preset) -> warm-start (per preset x flavour) -> quick-eval.

    python benchmarks/bench_toy_build.py --work /tmp/toybench --threads 2 \
        --runs toy-s:base toy-s:instruct toy-m:base toy-moe:base --out bench_toy_build.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def run(args: list[str], threads: int) -> tuple[dict, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cppo.toy", *args], env=env, capture_output=True, text=True
    )
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout), dt


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", nargs="+", default=["toy-s:base", "toy-s:instruct"])
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    w, th = args.work, str(args.threads)
    res: dict = {"load_before": os.getloadavg(), "threads": args.threads, "steps": {}}
    _, res["steps"]["data_s"] = run(
        ["data", "--out", str(w / "data"), "--seed", str(args.seed)], args.threads
    )
    tok, res["steps"]["tokenizer_s"] = run(
        ["tokenizer", "--data", str(w / "data"), "--out", str(w / "tok")], args.threads
    )
    res["vocab_size"] = tok["vocab_size"]
    presets = sorted({r.split(":")[0] for r in args.runs})
    for p in presets:
        out, dt = run(
            ["model", "--preset", p, "--tokenizer", str(w / "tok"), "--out", str(w / p / "init")],
            args.threads,
        )
        res["steps"][f"model_{p}_s"] = dt
        res[f"parameters_{p}"] = out["parameters"]
    res["warm_starts"] = []
    for r in args.runs:
        p, flavour = r.split(":")
        ws_dir = w / p / flavour
        cmd = ["warm-start", "--model", str(w / p / "init"), "--data", str(w / "data")]
        cmd += ["--flavour", flavour, "--out", str(ws_dir), "--threads", th, "--no-progress"]
        cmd += ["--seed", str(args.seed)]
        load = os.getloadavg()
        out, dt = run(cmd, args.threads)
        ev, ev_dt = run(
            [
                "quick-eval",
                "--model",
                str(ws_dir),
                "--benchmark",
                str(w / "data" / "val.jsonl"),
                "--k",
                str(args.k),
                "--limit",
                str(args.eval_limit),
                "--threads",
                th,
                "--max-new-tokens",
                str(args.max_new_tokens),
                "--no-progress",
            ],
            args.threads,
        )
        rec = {
            "run": r,
            "warm_start_wall_s": dt,
            "train_s": out["train_seconds"],
            "steps": out["steps"],
            "final_loss": out["final_loss"],
            "load_at_start": load,
            f"val_avg@{args.k}": ev["avg_at_k"],
            f"val_pass@{args.k}": ev["pass_at_k"],
            "val_truncated": ev["n_truncated"],
            "val_mean_length": ev["mean_length"],
            "eval_wall_s": ev_dt,
        }
        res["warm_starts"].append(rec)
        print(json.dumps(rec), flush=True)
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

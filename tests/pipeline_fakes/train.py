"""Fake `python -m cppo.train --config run.yaml`: deterministic metrics, checkpoints, resume.

Validation accuracy follows a fixed curve per method (so tables have known values); training
records carry every contract key. FAKE_TRAIN_FAIL_AT=<step> makes the first attempt of each
run exit with an error right after that step (a crash); the next attempt resumes from the last
checkpoint like the real trainer. FAKE_TRAIN_STEP_SLEEP=<s> makes every step take that long. With FAKE_TRAIN_CHECK_RULE the run config is loaded as the
real train command loads it: its `imports` are imported and its rule must accept the method.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from pathlib import Path

import yaml


def val_curve(method: str, step: int, bench: str) -> float:
    """A hump-shaped curve whose peak height and position depend on the method."""
    h = zlib.crc32(method.encode()) % 1000 / 1000.0
    peak = 4 + int(h * 8)
    base = 0.1 + 0.4 * h + (0.01 if bench == "test" else 0.0)
    return round(max(0.0, base + 0.02 * (peak - abs(step - peak))), 6)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    a = p.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    if os.environ.get("FAKE_TRAIN_CHECK_RULE"):
        from cppo.run.config import load_run_config

        load_run_config(a.config)  # raises if a plugin module is missing or the rule refuses
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    sched, val = cfg["schedule"], cfg["validation"]
    total = sched["iterations"] * sched["updates_per_iter"]
    benches = [Path(b).stem for b in val["benchmarks"]]
    ckpts = sorted(int(d.name.split("-")[1]) for d in out.glob("checkpoint-*"))
    start = ckpts[-1] if ckpts else 0
    metrics = out / "metrics.jsonl"
    kept = []
    if metrics.exists() and start:
        kept = [
            line
            for line in metrics.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= start
        ]
    metrics.write_text("".join(line + "\n" for line in kept))
    (out / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    fail_at = int(os.environ.get("FAKE_TRAIN_FAIL_AT", "0"))
    method = cfg.get("method_name") or cfg["method"]["rule"]
    print(f"fake trainer: {cfg['run_name']} from step {start} to {total}", flush=True)

    def validate(step: int) -> None:
        rec = {"kind": "validation", "step": step}
        for b in benches:
            rec[f"val/{b}"] = val_curve(method, step // sched["updates_per_iter"], b)
        rec["val/mean"] = sum(rec[f"val/{b}"] for b in benches) / len(benches)
        rec["val/k"] = val["k"]
        with metrics.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")

    if start == 0:
        validate(0)
    pause = float(os.environ.get("FAKE_TRAIN_STEP_SLEEP", "0"))
    for step in range(start + 1, total + 1):
        time.sleep(pause)
        rec = {
            "kind": "train",
            "step": step,
            "reward/mean": 0.1 * step,
            "accuracy": 0.5,
            "length/mean": 40.0 + step,
            "length/max": 60,
            "truncation_rate": 0.0,
            "entropy": 1.0,
            "grad_norm": 0.5,
            "learning_rate": sched["learning_rate"],
            "mask/fraction": 0.1,
            "mask/token_fraction": 0.06,
            "mask/prefix_fraction": 0.04,
            "cppo/delta_b_eff": 0.02 if cfg["method"]["rule"] == "cppo" else None,
            "divergence/mean": 0.01,
            "ratio/abs_dev_mean": 0.02,
            "logprob/rel_error": None,
            "groups/zero_std_fraction": 0.2,
            "time/step_s": 0.01,
            "throughput/tokens_per_s": 1000.0,
        }
        for i in range(4):
            rec[f"deviation/bin{i}/mean"] = 0.01 * (i + 1)
            rec[f"deviation/bin{i}/top10"] = 0.03 * (i + 1)
        with metrics.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if val["every"] and step % val["every"] == 0:
            validate(step)
        if step % cfg["save_every"] == 0:
            d = out / f"checkpoint-{step}"
            d.mkdir(exist_ok=True)
            (d / "config.json").write_text("{}")
        if step == fail_at and not (out / ".failed_once").exists():
            (out / ".failed_once").write_text("")
            print("fake trainer: simulated crash", flush=True)
            return 3
    (out / "final").mkdir(exist_ok=True)
    (out / "final" / "config.json").write_text("{}")
    (out / "DONE").write_text(json.dumps({"steps": total, "resumed_from": start or None}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

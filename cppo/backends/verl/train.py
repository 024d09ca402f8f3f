"""``python -m cppo.backends.verl.train --config run.yaml``: one training run on verl 0.9.1.

The run directory ends up as the project's trainer leaves it, so selection, evaluation, tables
and figures read it unchanged:

1. run.yaml is validated (the project's schema), and what verl cannot run as asked is refused
   before any GPU starts (``cppo.run.backends.verl_refusals``: ``rl.mask_std_0``, a Top-K
   divergence on Megatron, off the rollout anchor or at a temperature other than 1), as are
   batch-std advantages.
2. ``verl/`` gets the method JSON, the training data and each validation benchmark as
   DAPO-schema parquet (data_source = the benchmark's name; with a Top-K rule the training rows
   name the Top-K agent loop, registered by ``agent_loops.yaml``), and the attempt's overrides.
3. ``python -m verl.trainer.main_ppo <overrides>`` runs; verl resumes from its last checkpoint
   (``trainer.resume_mode=auto``). Its file logger truncates its file at every start, so each
   attempt logs to its own file.
4. metrics.jsonl is rebuilt from all attempts (``cppo.backends.verl.metrics``).
5. verl's checkpoints of the best validated iteration and of the last one become Hugging Face
   directories ``snapshots/step-<step>`` and ``final/`` (``python -m verl.model_merger``), then
   DONE is written.

``--dry-run`` stops after step 2 and prints the overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cppo.backends.verl.loss import write_method_file
from cppo.backends.verl.metrics import convert, read_verl_log
from cppo.backends.verl.overrides import (
    TOPK_AGENT,
    VerlSetupError,
    agent_loop_entries,
    external_modules,
    hydra_overrides,
)
from cppo.run.backends import verl_refusals
from cppo.run.config import RunConfigError, load_run_config, method_rule
from cppo.run.directory import snapshot_dir, write_done
from cppo.run.metrics import best_validation

__all__ = ["main", "prepare", "refusals"]

STATE = "verl"
CHECKPOINTS = "verl_checkpoints"


def refusals(cfg: dict[str, Any]) -> list[str]:
    """What in run.yaml verl cannot run as asked, one message per key."""
    out = []
    if cfg["backend"] != "verl":
        out.append(f"backend: {cfg['backend']!r}; this command runs backend verl")
    return out + verl_refusals(cfg)


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)


def _train_rows(path: str, agent_name: str | None = None) -> list[dict[str, Any]]:
    rows = []
    with open(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                rows.append(
                    {
                        "data_source": row.get("data_source", "train"),
                        "prompt": row["prompt"],
                        "reward_model": {
                            "ground_truth": str(row["reward_model"]["ground_truth"]),
                            "style": "rule",
                        },
                        "extra_info": row.get("extra_info") or {},
                        **({"agent_name": agent_name} if agent_name else {}),
                    }
                )
    return rows


def _benchmark_rows(path: str) -> list[dict[str, Any]]:
    from evaluation.benchmarks import load_benchmark
    from evaluation.prompting import user_message

    bench = load_benchmark(path)
    return [
        {
            "data_source": bench.name,
            "prompt": [{"role": "user", "content": user_message(r["problem"], bench.prompt_style)}],
            "reward_model": {"ground_truth": str(r["answer"]), "style": "rule"},
            "extra_info": {"id": r["id"]},
        }
        for r in bench.rows
    ]


def prepare(cfg: dict[str, Any]) -> tuple[Path, list[str], int]:
    """Files of one attempt and its overrides: (state dir, overrides, attempt number)."""
    run_dir = Path(cfg["output_dir"]).resolve()
    state = run_dir / STATE
    state.mkdir(parents=True, exist_ok=True)
    method_file = write_method_file(cfg, state / "method.json")
    rule = method_rule(cfg)
    agent_loop_file = None
    if rule.needs_topk:
        agent_loop_file = state / "agent_loops.yaml"
        agent_loop_file.write_text(yaml.safe_dump(agent_loop_entries(rule.divergence["topk"])))
    train_file = state / "train.parquet"
    agent = TOPK_AGENT if rule.needs_topk else None
    _write_parquet(_train_rows(cfg["train_data"], agent), train_file)
    val_files = []
    for bench in cfg["validation"]["benchmarks"]:
        out = state / f"val-{Path(bench).stem}.parquet"
        _write_parquet(_benchmark_rows(bench), out)
        val_files.append(str(out))
    attempt = len(list(state.glob("metrics-attempt-*.jsonl"))) + 1
    overrides = hydra_overrides(
        cfg,
        method_file=method_file,
        train_file=train_file,
        val_files=val_files,
        checkpoint_dir=run_dir / CHECKPOINTS,
        metrics_file=state / f"metrics-attempt-{attempt}.jsonl",
        agent_loop_file=agent_loop_file,
    )
    (state / f"overrides-attempt-{attempt}.txt").write_text("\n".join(overrides) + "\n")
    return state, overrides, attempt


def write_metrics(cfg: dict[str, Any], state: Path) -> list[dict[str, Any]]:
    files = sorted(
        state.glob("metrics-attempt-*.jsonl"), key=lambda p: int(p.stem.rsplit("-", 1)[1])
    )
    records = convert(
        read_verl_log(files),
        updates_per_iter=cfg["schedule"]["updates_per_iter"],
        val_k=cfg["validation"]["k"],
        rule_keys=method_rule(cfg).metric_keys(),
    )
    path = Path(cfg["output_dir"]) / "metrics.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
    return records


def export_checkpoints(cfg: dict[str, Any], records: list[dict[str, Any]]) -> list[int]:
    """verl's global_step_<it>/actor of the best validated step (within
    snapshot_best_within) and of the last iteration -> snapshots/step-<it x updates> (Hugging
    Face) and final/, as the project's trainer leaves them (snapshots: best). verl keeps every
    full checkpoint it saved unless trainer.max_actor_ckpt_to_keep says otherwise; the best is
    then taken among those kept."""
    run_dir = Path(cfg["output_dir"])
    upi = cfg["schedule"]["updates_per_iter"]
    saved = {
        int(d.name.rsplit("_", 1)[1]) * upi: d / "actor"
        for d in (run_dir / CHECKPOINTS).glob("global_step_*")
        if d.name.rsplit("_", 1)[1].isdigit()
    }
    if not saved:
        return []
    within = cfg["snapshot_best_within"] or max(saved)
    kept = [r for r in records if r.get("kind") == "validation" and r["step"] in saved]
    best = best_validation(kept, within)
    exported = sorted({max(saved), *([best["step"]] if best else [])})
    for step in exported:
        target = snapshot_dir(run_dir, step)
        if not target.exists():
            _merge(saved[step], target, cfg["verl"]["strategy"])
    final = run_dir / "final"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(snapshot_dir(run_dir, max(saved)), final)
    return exported


def _merge(actor_dir: Path, target: Path, strategy: str) -> None:
    tmp = target.with_name(target.name + ".tmp")
    backend = "fsdp" if strategy == "fsdp" else "megatron"
    cmd = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", backend,
           "--local_dir", str(actor_dir), "--target_dir", str(tmp)]  # fmt: skip
    subprocess.run(cmd, check=True)
    tmp.replace(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cppo.backends.verl.train")
    parser.add_argument("--config", required=True, help="run.yaml")
    parser.add_argument("--dry-run", action="store_true", help="prepare and print the overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config)
    except (RunConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    problems = refusals(cfg)
    if problems:
        print("verl cannot run " + args.config + ":\n" + "\n".join(f"  - {p}" for p in problems),
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        state, overrides, attempt = prepare(cfg)
    except VerlSetupError as err:
        print(f"{args.config}: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(overrides))
        return 0
    env = dict(os.environ)
    env["VERL_USE_EXTERNAL_MODULES"] = external_modules(method_rule(cfg).needs_topk)
    env["VERL_FILE_LOGGER_PATH"] = str(state / f"metrics-attempt-{attempt}.jsonl")
    start = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "verl.trainer.main_ppo", *overrides], env=env)
    records = write_metrics(cfg, state)
    print(f"metrics.jsonl: {len(records)} records from {attempt} attempt(s)", file=sys.stderr)
    if code != 0:
        return code
    steps = export_checkpoints(cfg, records)
    done = {
        "run_name": cfg["run_name"],
        "steps": cfg["schedule"]["iterations"] * cfg["schedule"]["updates_per_iter"],
        "iterations": cfg["schedule"]["iterations"],
        "backend": "verl",
        "attempts": attempt,
        "checkpoints": steps,
        "wall_time_s": round(time.monotonic() - start, 3),
    }
    write_done(cfg["output_dir"], done)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One training run from a validated run config: run directory, resume, final model, DONE marker.

Run directory: config.resolved.yaml (written first), metrics.jsonl, checkpoint-<step>/ (TRL /
transformers checkpoints, always at rollout-iteration boundaries), final/ (HF model dir with the
tokenizer), DONE (written last). Re-running the same command resumes from the last checkpoint;
metrics records written after that checkpoint by the interrupted process are dropped first, so
the resumed file equals an uninterrupted run's (time and throughput aside).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from cppo.training.runconfig import RunConfigError, dump_run_config

log = logging.getLogger(__name__)

# Keys that may differ between the original and a resumed invocation.
RESUME_MUTABLE_KEYS = ("threads", "report_to", "wandb")


def _checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json present) in run_dir."""
    candidates = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(candidates, key=_checkpoint_step) if candidates else None


def _check_resume_config(path: Path, cfg: dict[str, Any]) -> None:
    with open(path) as fh:
        old = yaml.safe_load(fh) or {}
    diff = sorted(
        k for k in set(old) | set(cfg) if k not in RESUME_MUTABLE_KEYS and old.get(k) != cfg.get(k)
    )
    if diff:
        raise RunConfigError(
            f"run.yaml differs from {path} in {diff}; the run directory belongs to another "
            "configuration (use a new output_dir or delete the old one)"
        )


def _setup_env(cfg: dict[str, Any], run_dir: Path) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    if cfg["threads"]:
        import torch

        torch.set_num_threads(cfg["threads"])
    if cfg["report_to"] == "wandb":
        wb = cfg["wandb"]
        # WANDB_MODE / WANDB_PROJECT from the environment win (e.g. WANDB_MODE=online on a cluster)
        os.environ.setdefault("WANDB_MODE", wb["mode"])
        os.environ.setdefault("WANDB_PROJECT", wb["project"])
        if wb["group"]:
            os.environ["WANDB_RUN_GROUP"] = wb["group"]
        os.environ["WANDB_DIR"] = str(run_dir)
        # a resumed run continues the same wandb run
        run_id = hashlib.sha1(f"{cfg['run_name']}|{run_dir.resolve()}".encode()).hexdigest()[:16]
        os.environ["WANDB_RUN_ID"] = run_id
        os.environ["WANDB_RESUME"] = "allow"


def run_training(
    cfg: dict[str, Any],
    *,
    validation_fn: Any = None,
    callbacks: list[Any] | None = None,
    reward_funcs: list[Any] | None = None,
    progress: bool = True,
) -> Path:
    """Train one {model, method, seed} as described by a validated run config; returns the run dir.

    `reward_funcs` replaces the DAPO answer-line reward (tests, benchmarks only).
    """
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from cppo.training.config import grpo_config_from_run
    from cppo.training.data import build_train_dataset
    from cppo.training.diagnostics import truncate_metrics
    from cppo.training.trainer import CPPOTrainer

    run_dir = Path(cfg["output_dir"])
    state = PartialState()
    if (run_dir / "DONE").exists():
        log.info("%s: already done", run_dir)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_env(cfg, run_dir)
    resolved = run_dir / "config.resolved.yaml"
    if resolved.exists():
        _check_resume_config(resolved, cfg)
    state.wait_for_everyone()
    if state.is_main_process and not resolved.exists():
        dump_run_config(cfg, resolved)

    tokenizer = AutoTokenizer.from_pretrained(
        cfg["model"], revision=cfg["model_revision"], padding_side="left", truncation_side="left"
    )
    dataset, dropped = build_train_dataset(
        cfg["train_data"],
        tokenizer,
        max_prompt_length=cfg["schedule"]["max_prompt_length"],
        chat_template_kwargs=cfg["chat_template_kwargs"],
    )
    if dropped:
        log.warning(
            "dropped %d prompts longer than %d tokens",
            dropped,
            cfg["schedule"]["max_prompt_length"],
        )
    args, plan = grpo_config_from_run(cfg, world_size=state.num_processes)

    checkpoint = last_checkpoint(run_dir)
    if state.is_main_process:
        if checkpoint is not None:
            truncate_metrics(args.metrics_path, _checkpoint_step(checkpoint))
        elif args.metrics_path.exists():
            args.metrics_path.unlink()  # a run killed before its first checkpoint restarts from scratch
    state.wait_for_everyone()

    trainer = CPPOTrainer(
        model=cfg["model"],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        reward_funcs=reward_funcs,
        validation_fn=validation_fn,
        progress=progress,
    )
    started = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    final = run_dir / "final"
    trainer.save_model(str(final))
    if state.is_main_process:
        tokenizer.save_pretrained(final)
        done = {
            "run_name": cfg["run_name"],
            "steps": trainer.state.global_step,
            "iterations": trainer.state.global_step // plan.updates_per_iter,
            "resumed_from": checkpoint.name if checkpoint else None,
            "wall_time_s": round(time.time() - started, 3),
            "prompts_dropped": dropped,
        }
        (run_dir / "DONE").write_text(json.dumps(done, indent=2) + "\n")
    state.wait_for_everyone()
    return run_dir

"""One training run from a validated run config: run directory, resume, final model, DONE marker.

Run directory: config.resolved.yaml (written first), metrics.jsonl, checkpoint-<step>/ (TRL /
transformers checkpoints, always at rollout-iteration boundaries, the newest `keep_checkpoints`
kept), snapshots/step-<step>/ (model-only, at validated steps; cppo.training.checkpoints),
final/ (HF model dir with the tokenizer), DONE (written last, with the model's provenance).
Re-running the same command resumes from the last checkpoint; metrics records and snapshots
written after that checkpoint by the interrupted process are dropped first, so the resumed file
equals an uninterrupted run's (time and throughput aside).

A hub model (`model: <id>`, `model_revision: <commit>`) is loaded from its snapshot directory in
the local Hugging Face cache (cppo.hub): the policy, the tokenizer and the vLLM engine all read
that one directory, and HF_HUB_OFFLINE=1 works once the snapshot is cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import yaml

from cppo.hub import ResolvedModel, resolve_model
from cppo.run.config import RunConfigError, dump_run_config
from cppo.run.directory import DONE, check_integrity, write_done
from cppo.run.metrics import truncate_metrics

log = logging.getLogger(__name__)

# Keys that may differ between the original and a resumed invocation (keep_checkpoints: to free
# disk mid-run; the checkpoint selection reads snapshots, not full checkpoints).
RESUME_MUTABLE_KEYS = ("threads", "report_to", "wandb", "keep_checkpoints")


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


def resolve_run_model(cfg: dict[str, Any]) -> ResolvedModel:
    """The local directory the run loads its model from (see the module doc); hub downloads, when
    the snapshot is not cached and the hub is reachable, happen on each node's first process
    first."""
    from accelerate import PartialState

    try:
        # per node: with a node-local HF_HOME every node downloads, and all the processes of a
        # node would otherwise fetch at once; on a shared cache the hub's file locks serialise
        with PartialState().local_main_process_first():
            return resolve_model(cfg["model"], cfg["model_revision"])
    except ValueError as err:
        raise RunConfigError(str(err)) from err


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

    from cppo.training.checkpoints import (
        SNAPSHOT_DTYPES,
        CheckpointPolicy,
        checkpoint_step,
        drop_snapshots_after,
        last_checkpoint,
    )
    from cppo.training.config import grpo_config_from_run
    from cppo.training.data import build_train_dataset
    from cppo.training.trainer import CPPOTrainer

    run_dir = Path(cfg["output_dir"])
    state = PartialState()
    if (run_dir / DONE).exists():
        check_integrity(run_dir)
        log.info("%s: already done", run_dir)
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_env(cfg, run_dir)
    resolved = run_dir / "config.resolved.yaml"
    checkpoint = last_checkpoint(run_dir)
    resumable = checkpoint is not None
    if resolved.exists() and resumable:
        # only a checkpoint ties the directory to its configuration: a run that stopped before
        # its first one (a failed start) starts afresh under the corrected run.yaml
        _check_resume_config(resolved, cfg)
    state.wait_for_everyone()
    if state.is_main_process and not (resolved.exists() and resumable):
        dump_run_config(cfg, resolved)

    model = resolve_run_model(cfg)
    log.info("model %s: loading %s", cfg["model"], model.path)
    tokenizer = AutoTokenizer.from_pretrained(
        str(model.path), padding_side="left", truncation_side="left"
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

    if state.is_main_process:
        if checkpoint is not None:
            truncate_metrics(args.metrics_path, checkpoint_step(checkpoint))
        elif args.metrics_path.exists():
            args.metrics_path.unlink()  # a run killed before its first checkpoint restarts from scratch
        # snapshots after the checkpoint belong to steps the resume recomputes
        drop_snapshots_after(run_dir, checkpoint_step(checkpoint) if checkpoint else 0)
    state.wait_for_everyone()

    trainer = CPPOTrainer(
        model=str(model.path),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        reward_funcs=reward_funcs,
        validation_fn=validation_fn,
        progress=progress,
    )
    trainer.add_callback(
        CheckpointPolicy(
            trainer,
            run_dir,
            keep_checkpoints=None if cfg["keep_checkpoints"] == "all" else cfg["keep_checkpoints"],
            snapshots=cfg["snapshots"],
            snapshot_dtype=SNAPSHOT_DTYPES[cfg["snapshot_dtype"]],
            best_within=cfg["snapshot_best_within"],
            validation=cfg["validation"],
            metrics_path=args.metrics_path,
        )
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
            "model": model.provenance(),
        }
        write_done(run_dir, done)
    state.wait_for_everyone()
    return run_dir

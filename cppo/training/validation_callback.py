"""In-loop validation as a trainer callback: Avg@k at step 0, every `validation.every` optimizer
steps and at the last step, written to metrics.jsonl as a `kind: validation` record.

It runs from `on_log` of a step log, i.e. after that step's train record is written and before
the step's checkpoint is saved, so a checkpoint policy that keeps the best validated snapshot
sees the step's validation. The sampling itself lives in cppo.training.validation.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.models import unwrap_model_for_generation

from cppo.training.validation import (
    Shard,
    ValidationFn,
    evaluate_in_memory,
    preserved_rng,
    validation_record,
    vllm_engine_validation,
)


def validation_due(step: int, max_steps: int, validation: dict[str, Any] | None) -> bool:
    """Whether `validation` (run.yaml's section) asks for a validation at optimizer step `step`."""
    val = validation or {}
    every = int(val.get("every") or 0)
    if not every or not val.get("benchmarks"):
        return False
    if step == 0:
        return bool(val.get("at_start", True))
    return step % every == 0 or step == max_steps


class InLoopValidation(TrainerCallback):
    """Validates the trainer's model when due; `run(step)` validates now.

    The built-in validation runs on every process, each sampling its shard of the (problem,
    sample) pairs (see cppo.training.validation); a user-supplied `fn` runs on the main process
    while the others wait, and gets the ValidationFn keywords only.
    """

    def __init__(self, trainer: Any, fn: ValidationFn | None = None):
        self.trainer = trainer
        self.fn: ValidationFn = fn or evaluate_in_memory
        self.done: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._maybe_run(0, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # a training step's log (not the validation record's own, nor the end-of-train summary)
        if logs and "loss" in logs and "train_runtime" not in logs:
            self._maybe_run(state.global_step, state.max_steps)

    def _maybe_run(self, step: int, max_steps: int) -> None:
        if step not in self.done and validation_due(step, max_steps, self.trainer.args.validation):
            self.done.add(step)
            self.run(step)

    def run(self, step: int) -> dict[str, Any] | None:
        """Avg@k on the validation benchmarks; writes and returns the validation record."""
        tr = self.trainer
        val = tr.args.validation
        kwargs: dict[str, Any] = dict(
            k=val["k"],
            temperature=val["temperature"],
            top_p=val["top_p"],
            max_new_tokens=val["max_new_tokens"],
            seed=val["seed"],
            batch_size=val["batch_size"],
        )
        benchmarks = list(val["benchmarks"])
        acc = tr.accelerator
        gather_weights = tr.args.ds3_gather_for_generation
        started = time.perf_counter()
        summaries = None
        with self._sampler() as (fn, uses_engine, group_size), preserved_rng(acc.device):
            every_rank = group_size > 0  # the built-in functions
            if every_rank:
                kwargs["shard"] = Shard(acc.process_index, acc.num_processes, group_size)
                template_kwargs = getattr(tr, "chat_template_kwargs", None)
                if template_kwargs:
                    # the chat template options of the training prompts (e.g. Qwen3's
                    # enable_thinking); not for a user function, whose keywords are fixed
                    kwargs["chat_template_kwargs"] = dict(template_kwargs)
            if every_rank and not uses_engine:
                if not gather_weights and acc.num_processes > 1 and is_deepspeed_zero3_enabled():
                    raise ValueError(
                        "in-memory validation shards the problems over the processes, each "
                        "generating on the whole model: under ZeRO-3 it needs "
                        "ds3_gather_for_generation=True"
                    )
                # Each process samples its own problems on the gathered weights. transformers
                # would step all processes' decoding together under ZeRO-3 (synced_gpus), which
                # hangs when they make different numbers of generate calls (an empty shard
                # makes none) and then meet in the gather of the grades.
                kwargs["synced_gpus"] = False
                if self.fn is evaluate_in_memory:
                    kwargs["sampler"] = tr.args.sampler
            if uses_engine:
                # the engine holds the synced weights: no need to gather the trainer's copy
                summaries = fn(None, tr.processing_class, benchmarks, **kwargs)
                acc.wait_for_everyone()
            else:
                with unwrap_model_for_generation(
                    tr.model_wrapped, acc, gather_deepspeed3_params=gather_weights
                ) as unwrapped:
                    was_training = unwrapped.training
                    unwrapped.eval()
                    try:
                        if every_rank or acc.is_main_process:
                            with torch.no_grad():
                                summaries = fn(unwrapped, tr.processing_class, benchmarks, **kwargs)
                    finally:
                        unwrapped.train(was_training)
                    acc.wait_for_everyone()
        if not acc.is_main_process or summaries is None:
            return None
        record = validation_record(step, summaries, val["k"])
        tr._writer.write(record)
        logs = {k: v for k, v in record.items() if k.startswith("val/") and v is not None}
        logs["val/time_s"] = time.perf_counter() - started
        # straight to the trackers: TRL's log() would fold in (and clear) training metrics
        tr.control = tr.callback_handler.on_log(tr.args, tr.state, tr.control, logs)
        return record

    @contextlib.contextmanager
    def _sampler(self) -> Iterator[tuple[Callable[..., Any], bool, int]]:
        """Yields (validation function, samples with the vLLM engine?, shard group size).

        The group size is 0 for a user-supplied function (main process only), else the number
        of consecutive ranks that compute one shard together: 1, or with a colocated vLLM
        engine the tensor-parallel size (TRL's TP groups are consecutive ranks sharing one
        engine, which must see identical requests). With a colocated engine the built-in
        validation samples with it, synced to the current weights.
        """
        tr = self.trainer
        builtin = self.fn is evaluate_in_memory
        if not (builtin and tr.use_vllm and tr.args.vllm_mode == "colocate"):
            yield self.fn, False, 1 if builtin else 0
            return
        vg = tr.vllm_generation
        vg.sync_weights()  # collective under ZeRO-3: every rank takes part
        tr._last_loaded_step = tr.state.global_step
        engine_fn = vllm_engine_validation(vg.llm)
        if vg.enable_sleep_mode:
            vg.llm.wake_up(tags=["kv_cache"])
        try:
            yield engine_fn, True, int(tr.args.vllm_tensor_parallel_size)
        finally:
            if vg.enable_sleep_mode:
                vg.llm.sleep(level=2)
                vg._llm_weights_sleeping = True

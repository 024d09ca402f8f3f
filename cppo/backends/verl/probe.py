"""verl's FSDP engine around an unwrapped module and a micro-batch in the layout verl's v1
trainer hands the actor, with mu's top-K: what the CPU tests (tests/test_verl_topk.py) and the
GPU smoke check (benchmarks/gpu_smoke.py) run the Top-K loss through. FSDP itself needs a
device mesh; the code under test is the engine's forward_step and output handling."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import verl
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

from cppo.backends.verl.loss import write_method_file
from cppo.backends.verl.overrides import hydra_overrides

__all__ = [
    "LENGTHS",
    "actor_config",
    "composed_config",
    "fsdp_engine",
    "micro_batch",
    "topk_samples",
]

LENGTHS = ((5, 7), (3, 9), (6, 4), (4, 6))  # (prompt, response) tokens per sequence


def composed_config(run: Mapping[str, Any], workdir: Path) -> DictConfig:
    """verl's composed trainer config for a validated run.yaml, from the generated overrides
    (the method file is written to ``workdir``; the data paths are placeholders)."""
    workdir = Path(workdir)
    overrides = hydra_overrides(
        run,
        method_file=write_method_file(run, workdir / "method.json"),
        train_file=workdir / "train.parquet",
        val_files=[str(workdir / "val.parquet")],
        checkpoint_dir=workdir / "checkpoints",
        metrics_file=workdir / "log.jsonl",
        agent_loop_file=workdir / "agent_loops.yaml",
    )
    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


def actor_config(run: Mapping[str, Any], workdir: Path) -> Any:
    """verl's ActorConfig of a run, as the Top-K trainer mode builds it for the loss."""
    return omega_conf_to_dataclass(composed_config(run, workdir).actor_rollout_ref.actor)


def fsdp_engine(module: torch.nn.Module, autocast_dtype: torch.dtype = torch.float32) -> Any:
    """verl's ``FSDPEngineWithLMHead`` holding ``module`` unwrapped (no sharding, no SP)."""
    engine = object.__new__(FSDPEngineWithLMHead)
    engine.module = module
    engine.pad_to_length = False
    engine.use_ulysses_sp = False
    engine._autocast_dtype = autocast_dtype
    engine.engine_config = SimpleNamespace(entropy_checkpointing=False)
    engine.get_data_parallel_group = lambda: None
    return engine


def topk_samples(
    model: torch.nn.Module,
    topk: int,
    *,
    seed: int = 0,
    lengths: tuple[tuple[int, int], ...] = LENGTHS,
    noise: float = 1.5,
) -> list[dict[str, torch.Tensor]]:
    """Per-sequence fields as verl's v1 agent loop and trainer leave them: prompts, responses,
    masks, mu's sampled log-probs and top-K over the whole sequence (row j: token j + 1; a dummy
    last row), GRPO advantages. mu = pi's logits plus Gaussian noise; on the first response row
    the last two top-K slots are left unfilled (0, 0.0), as vLLM leaves them; the longest
    response's last two tokens are masked out."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    longest = max(r for _, r in lengths)
    samples = []
    for p_len, r_len in lengths:
        seq = torch.randint(3, vocab, (p_len + r_len,), generator=g)
        with torch.no_grad():
            logits = model(seq.unsqueeze(0).to(device)).logits[0].double().cpu()
        shifted = logits + noise * torch.randn(logits.shape, generator=g, dtype=torch.float64)
        mu = torch.log_softmax(shifted, -1)
        top_lp, top_ids = mu.topk(topk, dim=-1)
        top_lp, top_ids = top_lp.float(), top_ids.int()
        top_lp[-1], top_ids[-1] = 0.0, 0
        top_lp[p_len, topk - 2 :], top_ids[p_len, topk - 2 :] = 0.0, 0
        resp = seq[p_len:]
        old = mu[p_len - 1 : -1].gather(-1, resp.unsqueeze(-1)).squeeze(-1).float()
        mask = torch.ones(r_len, dtype=torch.int64)
        if r_len == longest:
            mask[-2:] = 0
        samples.append(
            {
                "prompts": seq[:p_len],
                "responses": resp,
                "response_mask": mask,
                "loss_mask": mask,
                "input_ids": seq,
                "position_ids": torch.arange(p_len + r_len),
                "old_log_probs": old,
                "advantages": torch.full((r_len,), float(torch.randn((), generator=g))),
                "teacher_ids": top_ids,
                "teacher_logprobs": top_lp,
            }
        )
    return samples


def micro_batch(samples: list[dict[str, torch.Tensor]], packed: bool) -> TensorDict:
    """One micro-batch of ``samples`` (nested per sequence) with the non-tensor fields verl's
    actor update sets, the Top-K flag included."""
    td = tu.list_of_dict_to_tensordict(samples)
    tu.assign_non_tensor(
        td,
        use_remove_padding=packed,
        temperature=1.0,
        distillation_use_topk=True,
        calculate_entropy=False,
        dp_size=1,
        batch_num_tokens=int(sum(int(s["response_mask"].sum()) for s in samples)),
        global_batch_size=len(samples),
    )
    return td

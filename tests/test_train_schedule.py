"""The Table-3 schedule -> TRL batching map reproduces the paper's batch arithmetic."""

from __future__ import annotations

import pytest
from trl import GRPOConfig

from cppo.training.schedule import plan_batches

# Table 3: model, prompts/iter, n, minibatch (prompts), updates/iter
TABLE3 = [
    ("Qwen3-1.7B", 64, 8, 32, 2),
    ("Qwen3-1.7B-Base", 64, 8, 32, 2),
    ("Qwen3-8B-Base", 128, 8, 32, 4),
    ("Qwen3-30B-A3B-Base", 256, 16, 32, 8),
]


@pytest.mark.parametrize(("model", "prompts", "n", "minibatch", "updates"), TABLE3)
@pytest.mark.parametrize(("world", "micro"), [(1, None), (1, 8), (8, 4), (8, 16), (16, 2)])
def test_table3_arithmetic(model, prompts, n, minibatch, updates, world, micro):
    plan = plan_batches(
        prompts_per_iter=prompts,
        n=n,
        minibatch=minibatch,
        updates_per_iter=updates,
        iterations=10,
        world_size=world,
        micro_batch=micro,
    )
    b = plan.per_device_train_batch_size
    # responses generated per iteration = prompts x n, in one TRL generation batch
    assert plan.generation_batch_size == prompts * n
    assert b * world * plan.steps_per_generation == prompts * n
    # one optimizer step consumes one minibatch: minibatch prompts x n responses
    assert b * world * plan.gradient_accumulation_steps == minibatch * n == plan.responses_per_step
    # optimizer steps per generation = updates per iteration; every response used exactly once
    assert plan.steps_per_generation // plan.gradient_accumulation_steps == updates
    assert plan.steps_per_generation % plan.gradient_accumulation_steps == 0
    assert plan.num_iterations == 1
    assert plan.max_steps == 10 * updates
    assert plan.num_generations == n


def test_hand_computed_case():
    # 1.7B on 8 GPUs, 4 completions per forward: 256 responses/step -> 8 micro-steps per GPU
    plan = plan_batches(
        prompts_per_iter=64,
        n=8,
        minibatch=32,
        updates_per_iter=2,
        iterations=1120,
        world_size=8,
        micro_batch=4,
    )
    assert plan.gradient_accumulation_steps == 8
    assert plan.steps_per_generation == 16
    assert plan.max_steps == 2240


@pytest.mark.parametrize("micro", [None, 2, 4])
def test_trl_derives_the_same_generation_batch(micro, tmp_path):
    plan = plan_batches(
        prompts_per_iter=8, n=4, minibatch=4, updates_per_iter=2, iterations=3, micro_batch=micro
    )
    cfg = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **plan.trl_kwargs()
    )
    assert cfg.generation_batch_size == plan.generation_batch_size == 32
    assert cfg.steps_per_generation == plan.steps_per_generation
    # TRL regenerates when the data would otherwise be reused (GA < steps_per_generation)
    assert cfg.gradient_accumulation_steps * 2 == cfg.steps_per_generation


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"prompts_per_iter": 64, "minibatch": 30, "updates_per_iter": 2}, "prompts_per_iter"),
        ({"micro_batch": 3}, "micro_batch"),
        ({"n": 1}, "schedule.n"),
        ({"world_size": 3}, "processes"),
        ({"iterations": 0}, "schedule.iterations"),
    ],
)
def test_bad_schedules_name_the_key(kwargs, key):
    base = dict(prompts_per_iter=64, n=8, minibatch=32, updates_per_iter=2, iterations=5)
    base.update(kwargs)
    with pytest.raises(ValueError, match=key):
        plan_batches(**base)

"""The paper's update scheme (Table 3) mapped onto TRL's batching knobs.

The paper (verl) samples `prompts_per_iter` prompts x `n` responses per iteration, splits them into
minibatches of `minibatch` prompts (x n responses) and takes one optimizer step per minibatch:
`updates_per_iter` = prompts_per_iter / minibatch steps per iteration, each response used once.

TRL generates `generation_batch_size` completions (globally) every `steps_per_generation` micro-steps
and takes one optimizer step every `gradient_accumulation_steps` micro-steps of
`per_device_train_batch_size` completions per process. So, with W processes and b completions per
micro-step per process:

    generation_batch_size       = prompts_per_iter * n
    gradient_accumulation_steps = minibatch * n / (b * W)
    steps_per_generation        = updates_per_iter * gradient_accumulation_steps
    num_iterations (TRL's mu)   = 1   (every response is used in exactly one optimizer step)
    max_steps                   = iterations * updates_per_iter   (optimizer steps)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BatchPlan:
    """TRL settings that realise one Table-3 schedule."""

    num_generations: int
    generation_batch_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    steps_per_generation: int
    num_iterations: int
    max_steps: int
    responses_per_step: int
    updates_per_iter: int
    world_size: int

    def trl_kwargs(self) -> dict[str, int]:
        """Keyword arguments for GRPOConfig (generation_batch_size is derived by TRL from these)."""
        return {
            "num_generations": self.num_generations,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "steps_per_generation": self.steps_per_generation,
            "num_iterations": self.num_iterations,
            "max_steps": self.max_steps,
        }

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def plan_batches(
    *,
    prompts_per_iter: int,
    n: int,
    minibatch: int,
    updates_per_iter: int,
    iterations: int,
    world_size: int = 1,
    micro_batch: int | None = None,
) -> BatchPlan:
    """Map the paper's schedule onto TRL's batching; raise ValueError naming the offending key.

    `micro_batch` is the number of completions per process per forward/backward pass (memory knob;
    it never changes the maths). Default: the whole per-process share of a minibatch (no
    gradient accumulation).
    """
    for key, value in {
        "prompts_per_iter": prompts_per_iter,
        "n": n,
        "minibatch": minibatch,
        "updates_per_iter": updates_per_iter,
        "iterations": iterations,
        "world_size": world_size,
    }.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"schedule.{key} must be a positive integer, got {value!r}")
    if n < 2:
        raise ValueError(f"schedule.n must be >= 2 (group-relative advantages), got {n}")
    if minibatch * updates_per_iter != prompts_per_iter:
        raise ValueError(
            f"schedule: prompts_per_iter ({prompts_per_iter}) must equal minibatch ({minibatch}) x "
            f"updates_per_iter ({updates_per_iter}): each response is used in exactly one update"
        )
    responses_per_step = minibatch * n
    if responses_per_step % world_size:
        raise ValueError(
            f"schedule: minibatch x n = {responses_per_step} responses per optimizer step is not "
            f"divisible by the number of processes ({world_size})"
        )
    per_process = responses_per_step // world_size
    if micro_batch is None:
        micro_batch = per_process
    if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 1:
        raise ValueError(f"schedule.micro_batch must be a positive integer, got {micro_batch!r}")
    if per_process % micro_batch:
        raise ValueError(
            f"schedule.micro_batch ({micro_batch}) must divide the per-process share of a minibatch "
            f"({per_process} = minibatch x n / processes)"
        )
    grad_accum = per_process // micro_batch
    steps_per_generation = updates_per_iter * grad_accum
    plan = BatchPlan(
        num_generations=n,
        generation_batch_size=prompts_per_iter * n,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        steps_per_generation=steps_per_generation,
        num_iterations=1,
        max_steps=iterations * updates_per_iter,
        responses_per_step=responses_per_step,
        updates_per_iter=updates_per_iter,
        world_size=world_size,
    )
    # TRL derives the generation batch as b * W * steps_per_generation; it must be the paper's.
    assert micro_batch * world_size * steps_per_generation == plan.generation_batch_size
    return plan

"""Fails loudly when TRL internals that CPPOTrainer overrides or relies on change.

CPPOTrainer subclasses GRPOTrainer and overrides private methods; a TRL upgrade that renames a
parameter, changes a default or stops producing a key would otherwise break it silently. Update
the trainer and these expectations together, after reading the new TRL code.
"""

from __future__ import annotations

import inspect

import pytest
import trl
from trl import GRPOTrainer
from trl.generation.vllm_generation import VLLMGeneration
from trl.models import unwrap_model_for_generation
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import RepeatSampler, add_fused_lm_head, maybe_gather_lm_head_ctx

E = inspect.Parameter.empty

SIGNATURES = {
    GRPOTrainer._generate_and_score_completions: [("self", E), ("inputs", E)],
    GRPOTrainer._get_per_token_logps_and_entropies: [
        ("self", E),
        ("model", E),
        ("input_ids", E),
        ("attention_mask", E),
        ("logits_to_keep", E),
        ("batch_size", None),
        ("compute_entropy", False),
        ("compute_aux_loss", False),
        ("pixel_values", None),
        ("image_grid_thw", None),
        ("num_images", None),
        ("pixel_attention_mask", None),
        ("spatial_shapes", None),
        ("num_tiles", None),
        ("image_sizes", None),
        ("token_type_ids", None),
        ("mm_token_type_ids", None),
        ("image_position_ids", None),
    ],
    GRPOTrainer._compute_loss: [("self", E), ("model", E), ("inputs", E)],
    GRPOTrainer._calculate_rewards: [
        ("self", E),
        ("inputs", E),
        ("prompts", E),
        ("completions", E),
        ("completion_ids_list", E),
    ],
    GRPOTrainer._generate_single_turn: [
        ("self", E),
        ("prompt_ids", E),
        ("images", E),
        ("multimodal_fields", E),
        ("num_generations", E),
        ("has_tool_images", False),
    ],
    GRPOTrainer._prepare_inputs: [("self", E), ("generation_batch", E)],
    GRPOTrainer._get_train_sampler: [("self", E), ("dataset", None)],
    GRPOTrainer.log: [("self", E), ("logs", E), ("start_time", None)],
    RepeatSampler.__init__: [
        ("self", E),
        ("data_source", E),
        ("mini_repeat_count", E),
        ("batch_size", 1),
        ("repeat_count", 1),
        ("shuffle", True),
        ("seed", None),
    ],
    add_fused_lm_head: [
        ("model", E),
        ("temperature", 1.0),
        ("cast_lm_head_to_fp32", False),
        ("outputs", ("log_probs",)),
    ],
    maybe_gather_lm_head_ctx: [("params", E)],
    VLLMGeneration.generate: [
        ("self", E),
        ("prompts", E),
        ("images", E),
        ("num_generations", E),
        ("profiler", None),
    ],
    VLLMGeneration.sync_weights: [("self", E)],
    unwrap_model_for_generation: [
        ("model", E),
        ("accelerator", E),
        ("gather_deepspeed3_params", True),
        ("generation_kwargs", None),
        ("gradient_checkpointing_kwargs", None),
    ],
    disable_gradient_checkpointing: [("model", E), ("gradient_checkpointing_kwargs", None)],
}


def test_trl_version_is_the_pinned_one():
    assert trl.__version__ == "1.16.0"


@pytest.mark.parametrize("fn", list(SIGNATURES), ids=lambda f: f.__qualname__)
def test_signature(fn):
    params = [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]
    assert params == SIGNATURES[fn]


# Source facts the trainer relies on (names of keys and attributes inside TRL's methods).
SOURCE_FACTS = [
    (
        GRPOTrainer._generate_and_score_completions,
        [
            "old_per_token_logps",
            "sampling_per_token_logps",
            "self._calculate_rewards(",
            "self._generate(",
            '"completion_mask"',
            '"advantages"',
        ],
    ),
    (
        GRPOTrainer._prepare_inputs,
        [
            "self._buffered_inputs",
            "self._step % self.args.steps_per_generation",
            "self._generate_and_score_completions(",
        ],
    ),
    (GRPOTrainer._generate, ["self._generate_single_turn("]),
    (
        GRPOTrainer._generate_single_turn,
        ["self.vllm_generation.generate(", "self._last_loaded_step", "lp[0] for lp in seq"],
    ),
    (GRPOTrainer.training_step, ["self._step += 1"]),
    (VLLMGeneration.generate, ['"logprobs": self.logprobs', "logprob_token_ids"]),
    (
        GRPOTrainer.__init__,
        [
            "add_fused_lm_head(",
            "self.eos_token_ids",
            "self.reward_weights",
            "self._buffered_inputs = None",
        ],
    ),
]


@pytest.mark.parametrize(
    ("fn", "needles"), SOURCE_FACTS, ids=lambda x: getattr(x, "__qualname__", "")
)
def test_source_facts(fn, needles):
    src = inspect.getsource(fn)
    for needle in needles:
        assert needle in src, f"{fn.__qualname__} no longer contains {needle!r}"


def test_telemetry_hook_still_exists():
    # CPPOTrainer overrides it with a no-op
    from trl.trainer.base_trainer import _BaseTrainer

    params = [p.name for p in inspect.signature(_BaseTrainer._send_telemetry).parameters.values()]
    assert params == ["self"]


def test_loss_is_not_rescaled_for_gradient_accumulation():
    # our loss already carries the minibatch normaliser; Trainer must not divide it again
    assert GRPOTrainer.loss_is_scaled_for_ga is True

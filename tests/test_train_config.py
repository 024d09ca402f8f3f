"""run.yaml validation (bad keys named), defaults, and the TRL knobs the config pins."""

from __future__ import annotations

import pytest
import yaml

from cppo.rules import get_rule
from cppo.run.config import (
    SCHEMA,
    DivergencePlan,
    RunConfigError,
    default_run_name,
    divergence_plan,
    load_run_config,
    schema_table,
    validate_run_config,
)
from cppo.training.config import CPPOConfig, grpo_config_from_run


def minimal(**over):
    cfg = {
        "output_dir": "runs/x",
        "model": "models/toy-s",
        "train_data": "data/train.jsonl",
        "method": {"rule": "cppo"},
        "schedule": {
            "prompts_per_iter": 8,
            "n": 4,
            "minibatch": 4,
            "updates_per_iter": 2,
            "iterations": 3,
            "max_completion_length": 64,
        },
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def test_defaults_are_filled():
    cfg = validate_run_config(minimal())
    assert cfg["seed"] == 0
    assert cfg["anchor"] == "rollout"
    assert cfg["backend"] == "transformers"
    assert cfg["bf16"] is False and cfg["use_cpu"] is True
    assert cfg["report_to"] == "none"
    assert cfg["schedule"]["temperature"] == 1.0
    assert cfg["schedule"]["top_p"] == 1.0 and cfg["schedule"]["top_k"] == 0
    assert cfg["validation"]["k"] == 16
    assert cfg["validation"]["temperature"] == 0.7 and cfg["validation"]["top_p"] == 0.95
    assert cfg["validation"]["max_new_tokens"] == 64  # follows max_completion_length
    assert cfg["rl"]["mask_std_0"] is True
    assert cfg["save_every"] % 2 == 0
    assert cfg["run_name"] == "toy-s__cppo__s0"
    # every schema key is present after validation
    flat = {k for k, _ in schema_table()}
    for dotted in flat:
        node = cfg
        for part in dotted.split("."):
            node = node[part]


def test_run_name_convention():
    assert default_run_name("Qwen/Qwen3-1.7B", "cppo", 2) == "Qwen3-1.7B__cppo__s2"
    cfg = validate_run_config(
        minimal(method_name="grpo_clip_higher", seed=1, method={"rule": "grpo"})
    )
    assert cfg["run_name"] == "toy-s__grpo_clip_higher__s1"


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"schedul": {}}, r"unknown key 'schedul'.*did you mean 'schedule'"),
        (
            {"schedule": {"minibach": 4}},
            r"schedule: unknown key 'minibach' \(did you mean 'minibatch'\?\)",
        ),
        ({"validation": {"evry": 2}}, r"validation: unknown key 'evry' \(did you mean 'every'\?\)"),
        ({"seed": "one"}, r"seed: expected integer, got 'one'"),
        ({"seed": True}, r"seed: expected integer, got True"),
        ({"anchor": "engine"}, r"anchor: 'engine' is not one of"),
        ({"divergence": {"kind": "tv"}}, r"divergence.kind: 'tv' is not one of"),
        ({"schedule": {"n": 1}}, r"schedule.n: 1 is less than the minimum of 2"),
        ({"schedule": {"minibatch": 3}}, r"'schedule.prompts_per_iter' must equal"),
        ({"save_every": 3}, r"'save_every'.*multiple of schedule.updates_per_iter"),
        ({"bf16": True}, r"'bf16' must be false on CPU"),
        ({"vllm": {"dtype": "fp8"}}, r"vllm.dtype: 'fp8' is not one of"),
        ({"validation": {"every": 5}}, r"'validation.benchmarks' is empty"),
        ({"schedule": {"top_p": 1.5}}, r"schedule.top_p: 1.5 is greater than the maximum of 1"),
    ],
)
def test_bad_values_name_the_key(over, message):
    with pytest.raises(RunConfigError, match=message):
        validate_run_config(minimal(**over))


def test_vllm_runs_on_cpu_with_its_engine_options():
    # vLLM's CPU build runs the engine on CPU (tests/test_vllm_cpu.py); the options reach the
    # engine through CPPOConfig.vllm_engine
    cfg = validate_run_config(minimal(backend="vllm", vllm={"dtype": "float32"}))
    assert cfg["use_cpu"] and cfg["vllm"]["enable_chunked_prefill"] is None
    args, _ = grpo_config_from_run(cfg)
    assert args.use_vllm and args.vllm_engine == {
        "dtype": "float32",
        "enforce_eager": False,
        "enable_chunked_prefill": None,
        "max_num_batched_tokens": 4096,
        "cpu_kvcache_space_gib": None,
    }


def test_method_needs_a_rule():
    cfg = minimal()
    cfg["method"] = {"delta": 0.1}
    with pytest.raises(RunConfigError, match=r"method.rule: missing required key"):
        validate_run_config(cfg)


def test_missing_required_key():
    cfg = minimal()
    del cfg["schedule"]["max_completion_length"]
    with pytest.raises(
        RunConfigError, match=r"schedule.max_completion_length: missing required key"
    ):
        validate_run_config(cfg)
    cfg = minimal()
    del cfg["train_data"]
    with pytest.raises(RunConfigError, match="train_data: missing required key"):
        validate_run_config(cfg)


def test_load_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal(schedule={"learning_rate": 1})))
    cfg = load_run_config(path)
    assert cfg["schedule"]["learning_rate"] == 1.0 and isinstance(
        cfg["schedule"]["learning_rate"], float
    )


def test_trl_knobs_are_pinned(tmp_path):
    cfg = validate_run_config(minimal(output_dir=str(tmp_path)))
    args, plan = grpo_config_from_run(cfg)
    assert isinstance(args, CPPOConfig)
    # knobs whose TRL defaults would silently change the method
    assert args.beta == 0.0
    assert args.vllm_importance_sampling_correction is False
    assert args.bf16 is False and args.fp16 is False and args.use_cpu is True
    assert args.scale_rewards == "group"
    assert args.mask_truncated_completions is False
    assert args.temperature == 1.0 and args.top_p == 1.0 and args.top_k == 0
    assert args.min_p is None and args.repetition_penalty == 1.0
    assert args.entropy_coef == 0.0 and args.use_adaptive_entropy is False
    assert args.top_entropy_quantile == 1.0 and args.off_policy_mask_threshold is None
    assert args.num_iterations == 1
    assert args.gradient_checkpointing is False
    assert args.model_init_kwargs["dtype"] == "float32"
    assert args.logging_steps == 1 and args.save_steps == cfg["save_every"]
    assert args.report_to == [] or args.report_to == "none" or args.report_to is None
    assert args.weight_decay == 0.01 and args.max_grad_norm == 1.0
    assert args.lr_scheduler_type == "constant_with_warmup"
    # the schedule mapping is applied
    assert (
        args.generation_batch_size == 32 and args.steps_per_generation == plan.steps_per_generation
    )
    assert args.max_steps == 6


def test_config_rejects_method_changing_knobs(tmp_path):
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        method={"rule": "grpo"},
    )
    with pytest.raises(ValueError, match="beta"):
        CPPOConfig(beta=0.04, **base)
    with pytest.raises(ValueError, match="IS correction"):
        CPPOConfig(vllm_importance_sampling_correction=True, **base)
    with pytest.raises(ValueError, match="entropy"):
        CPPOConfig(entropy_coef=0.01, **base)


def test_divergence_plan():
    cppo = get_rule("cppo").bind()
    plan = divergence_plan(cppo, all_methods=False)
    assert (plan.kind, plan.topk, plan.for_rule, plan.compute) == ("topk_tv", 20, True, True)
    assert plan.needs_topk
    # the method config is authoritative
    cppo_kl = get_rule("cppo").bind({"divergence": "binary_kl"})
    assert divergence_plan(cppo_kl).kind == "binary_kl" and not divergence_plan(cppo_kl).needs_topk
    # the run-level divergence is the diagnostic one of rules that read none: giving it for a
    # rule that reads its own is an error (even when it agrees), never an override
    for kind in ("topk_tv", "binary_kl"):
        with pytest.raises(
            RunConfigError, match=r"method 'cppo' reads its own \(binary_kl, K=20\)"
        ):
            divergence_plan(cppo_kl, {"kind": kind})
    with pytest.raises(RunConfigError, match="reads its own"):
        divergence_plan(cppo_kl, {"kind": None, "topk": 20})
    assert divergence_plan(get_rule("trm_max").bind()).kind == "topk_kl"
    grpo = get_rule("grpo").bind()
    plan = divergence_plan(grpo, {"kind": "binary_tv", "topk": None, "sampled_token": None})
    assert plan == DivergencePlan("binary_tv", 20, "extra", for_rule=False, compute=True)
    assert not plan.needs_topk
    assert divergence_plan(grpo, {}, all_methods=False).compute is False
    assert not divergence_plan(grpo, {}, all_methods=False).needs_topk
    # the refusal reaches run.yaml's loader
    with pytest.raises(RunConfigError, match="reads its own"):
        validate_run_config(minimal(divergence={"kind": "topk_tv"}))


def test_schema_table_lists_every_key():
    rows = dict(schema_table())
    assert "schedule.prompts_per_iter" in rows and rows["schedule.prompts_per_iter"] == "REQUIRED"
    assert rows["validation.k"] == "16" and rows["keep_checkpoints"] == "1"

    # one row per leaf key of the schema (method is free-form: one row)
    def leaves(node):
        n = 0
        for key, sub in node["properties"].items():
            if "properties" in sub and key != "method":
                n += leaves(sub)
            else:
                n += 1
        return n

    assert len(rows) == leaves(SCHEMA)


@pytest.mark.parametrize("name", ["qwen3-1.7b-cppo.paper.yaml", "toy-cppo.cpu.yaml"])
def test_example_run_configs_are_valid(name):
    from pathlib import Path

    from cppo.training.schedule import plan_batches

    path = Path(__file__).resolve().parents[1] / "cppo" / "training" / "examples" / name
    cfg = load_run_config(path)
    get_rule(cfg["method"]["rule"]).resolve(cfg["method"])
    sched = cfg["schedule"]
    world = 8 if cfg["backend"] == "vllm" else 1
    plan = plan_batches(
        prompts_per_iter=sched["prompts_per_iter"],
        n=sched["n"],
        minibatch=sched["minibatch"],
        updates_per_iter=sched["updates_per_iter"],
        iterations=sched["iterations"],
        world_size=world,
        micro_batch=sched["micro_batch"],
    )
    assert plan.max_steps == sched["iterations"] * sched["updates_per_iter"]

"""Workflow config: schema errors name the key, defaults, and run-config resolution."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml

from cppo.pipeline.commands import format_cli_args
from cppo.pipeline.config import (
    ConfigError,
    load_config,
    schema_errors,
    validate,
    with_method_catalogue,
)
from cppo.pipeline.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["toy", "toy-full", "toy-extended", "paper", "ablations", "conventions", "ci"]


def toy() -> dict:
    """config/toy.yaml with its catalogue's methods written out (tests edit them)."""
    return with_method_catalogue(load_config(ROOT / "config" / "toy.yaml"))


def errors_of(cfg: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Plan(cfg)
    return info.value.errors


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_are_valid(name):
    plan = Plan(load_config(ROOT / "config" / f"{name}.yaml"))
    assert plan.matrix.profile == name
    assert plan.matrix.runs


def test_the_six_seed_overlay_adds_seeds_to_the_8_update_column_only():
    plan = Plan(load_config(ROOT / "config" / "toy.yaml", ROOT / "config" / "toy-6seeds.yaml"))
    default = Plan(load_config(ROOT / "config" / "toy.yaml"))
    assert plan.matrix.profile == default.matrix.profile  # the default's runs are reused
    assert plan.matrix.seeds_of("toy-s-2up") == [0, 1, 2]
    assert plan.matrix.seeds_of("toy-s-8up") == [0, 1, 2, 3, 4, 5]
    assert len(plan.matrix.runs) == 8 * 3 + 8 * 6
    assert set(default.matrix.runs) < set(plan.matrix.runs)


def test_matrix_sizes():
    sizes = {n: len(Plan(load_config(ROOT / "config" / f"{n}.yaml")).matrix.runs) for n in CONFIGS}
    assert sizes == {
        "toy": 48,
        "toy-full": 96,
        "toy-extended": 96,
        "paper": 28,
        "ablations": 30,
        "conventions": 12,
        "ci": 8,
    }


def _set(cfg: dict, path: str, value) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[last] = value
    return cfg


def _del(cfg: dict, path: str) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    del node[last]
    return cfg


# (mutation, a substring every message about it must contain: the key path)
BROKEN = [
    (lambda c: _set(c, "validation.evry", 3), "validation: unknown key 'evry'"),
    (lambda c: _set(c, "models.toy-s-2up.schedule.prompt_per_iter", 16),
     "models.toy-s-2up.schedule: unknown key 'prompt_per_iter' (did you mean 'prompts_per_iter'?)"),
    (lambda c: _set(c, "validation.k", "sixteen"), "validation.k: expected integer"),
    (lambda c: _set(c, "validation.top_p", 1.5), "validation.top_p"),
    (lambda c: _set(c, "seeds", []), "seeds"),
    (lambda c: _del(c, "models.toy-s-2up.t_stop"), "models.toy-s-2up.t_stop: missing required key"),
    (lambda c: _set(c, "models.toy-s-2up.toy.flavour", "chat"), "models.toy-s-2up.toy.flavour"),
    (lambda c: _set(c, "methods.cppo.divergence", {"kind": "tv"}), "methods.cppo.divergence.kind"),
    (lambda c: _set(c, "methods.cppo.color", "red"), "methods.cppo.color"),
    (lambda c: _set(c, "methods.cppo.from_model", ["delta", "eps"]), "methods.cppo.from_model[1]"),
    (lambda c: _set(c, "profile", "toy/../x"), "profile"),
    (lambda c: _set(c, "models.bad name", c["models"]["toy-s-2up"]), "models: invalid name 'bad name'"),
    (lambda c: _set(c, "run.methods", ["grpo", "cpo"]),
     "run.methods[1]: unknown method 'cpo' (did you mean 'cppo'?)"),
    (lambda c: _set(c, "run.models", ["toy-s"]), "run.models[0]: unknown model 'toy-s'"),
    (lambda c: _set(c, "validation.benchmarks", ["vall"]), "validation.benchmarks[0]: unknown benchmark 'vall'"),
    (lambda c: _set(c, "evaluation.benchmarks", ["aime24"]), "evaluation.benchmarks[0]: unknown benchmark 'aime24'"),
    (lambda c: _set(c, "models.toy-s-2up.schedule.minibatch", 5),
     "models.toy-s-2up.schedule: prompts_per_iter (16) must equal minibatch x updates_per_iter"),
    (lambda c: _set(c, "models.toy-s-2up.t_stop", 99), "models.toy-s-2up.t_stop: 99 exceeds"),
    (lambda c: _set(c, "validation.every", 50), "validation.every"),
    (lambda c: _del(c, "models.toy-s-2up.trust_region.w_min"), "models.toy-s-2up.trust_region.w_min: missing"),
    (lambda c: _set(c, "methods.cppo.params", {"delta": 0.1}), "methods.cppo.params.delta: also listed in from_model"),
    (lambda c: _set(c, "benchmarks.holdout", {"source": "file", "path": "data/other.jsonl"}),
     "benchmarks.holdout.path: file stem 'other'"),
    (lambda c: _set(c, "models.toy-s-2up.training", {"save_every": 3}),
     "models.toy-s-2up.training.save_every: 3 does not divide validation.every"),
    (lambda c: _set(c, "models.toy-s-2up.hub", {"id": "Qwen/Qwen3-1.7B", "revision": "main"}),
     "models.toy-s-2up.hub.revision: 'main' does not match"),
    (lambda c: _set(c, "data.train", {"source": "file"}), "data.train.path: missing required key"),
    (lambda c: _set(c, "figures", {"ablations": [{"name": "f", "methods": ["cppo_kl"]}]}),
     "figures.ablations[0].methods[0]: method 'cppo_kl' is not in run.methods"),
    (lambda c: _set(c, "training.extra", {"snapshots": "none"}),
     "training.extra.snapshots: 'none' keeps no model of a validated step"),
    (lambda c: _set(c, "models.toy-s-2up.training", {"extra": {"snapshots": "none"}}),
     "models.toy-s-2up.training.extra.snapshots: 'none'"),
]  # fmt: skip


@pytest.mark.parametrize("mutate,expected", BROKEN, ids=[e for _, e in BROKEN])
def test_broken_configs_are_rejected_naming_the_key(mutate, expected):
    errors = errors_of(mutate(toy()))
    assert any(expected in e for e in errors), errors


def test_snapshots_none_is_fine_without_the_post_hoc_evaluation():
    cfg = _set(toy(), "training.extra", {"snapshots": "none"})
    with pytest.raises(ConfigError):
        Plan(cfg)
    cfg["evaluation"] = {"enabled": False}
    assert Plan(cfg).matrix.runs
    assert Plan(_set(toy(), "training.extra", {"snapshots": "best"})).matrix.runs


def test_rule_params_are_checked_by_the_rule_registry():
    cfg = _set(toy(), "methods.grpo.params", {"eps_lo": 0.2})
    errors = errors_of(cfg)
    assert any(
        e.startswith("methods.grpo.params (model toy-s-2up)") and "eps_lo" in e for e in errors
    ), errors
    cfg = _set(toy(), "methods.grpo.rule", "grp")
    assert any(e.startswith("methods.grpo.rule") and "grpo" in e for e in errors_of(cfg))
    cfg = _set(toy(), "models.toy-s-2up.method_overrides", {"cppo": {"w_min": 2.0}})
    errors = errors_of(cfg)
    assert any("models.toy-s-2up.method_overrides.cppo" in e and "w_min" in e for e in errors)


def test_every_error_is_reported_at_once():
    cfg = _set(_set(toy(), "validation.evry", 3), "figures.smoth", 1)
    errors = schema_errors(cfg)
    assert len(errors) == 2 and any("figures: unknown key 'smoth'" in e for e in errors)


def test_defaults_are_filled():
    cfg = validate(
        {
            "profile": "p",
            "seeds": [0],
            "run": {"models": ["m"], "methods": ["g"]},
            "data": {"train": {"source": "toy"}},
            "benchmarks": {"val": {"source": "toy"}},
            "validation": {"benchmarks": ["val"], "every": 2},
            "models": {
                "m": {
                    "source": "toy",
                    "toy": {"preset": "toy-s", "flavour": "base"},
                    "schedule": {
                        "prompts_per_iter": 4,
                        "n": 2,
                        "minibatch": 2,
                        "updates_per_iter": 2,
                        "iterations": 4,
                        "max_prompt_length": 64,
                        "max_completion_length": 32,
                    },
                    "t_stop": 4,
                }
            },
            "methods": {"g": {"rule": "grpo"}},
        }
    )
    assert cfg["validation"]["k"] == 16 and cfg["validation"]["temperature"] == 0.7
    assert cfg["validation"]["top_p"] == 0.95
    assert cfg["evaluation"]["benchmarks"] == ["val"]
    assert cfg["evaluation"]["checkpoints"] == ["best", "final"]
    assert cfg["schedule"]["learning_rate"] == 1e-6
    assert cfg["publish"]["wandb"]["enabled"] is False
    assert cfg["commands"]["train"] == {"launcher": "python -m", "module": "cppo.train"}


def test_run_config_resolution():
    plan = Plan(toy())
    cfg = plan.resolver.run_config("toy-s-2up", "cppo", 0)
    assert cfg["run_name"] == "toy-s-2up__cppo__s0"
    assert cfg["output_dir"] == "results/toy/runs/toy-s-2up/cppo/seed0"
    # both columns start from one shared warm start
    assert cfg["model"] == "results/toy/models/warm/toy-s-base-s0" and "model_revision" not in cfg
    assert plan.resolver.run_config("toy-s-8up", "cppo", 0)["model"] == cfg["model"]
    assert cfg["train_data"] == "results/toy/data/toy/train.jsonl"
    assert cfg["method"] == {
        "rule": "cppo",
        "loss_agg_mode": "seq-mean-token-sum-norm",
        "horizon": 128,
        "position_horizon": "response",
        "delta_b_max_factor": 2.0,
        "ratio_cap": None,
        "delta": 0.15,
        "delta_b": 0.02,
        "adaptive_delta_b": True,
        "w_min": 0.8,
    }
    assert cfg["rl"] == {"scale_rewards": "none"}
    # the rule owns its divergence: its default (Top-K TV, K = 20), stated nowhere else, and
    # no run-level copy to keep in step
    bound = plan.resolver.bound_rule("toy-s-2up", "cppo")
    assert bound.divergence == {"kind": "topk_tv", "topk": 20, "sampled_token": "extra"}
    assert "divergence" not in cfg
    # iterations -> optimizer steps: validation every 5 iterations x 2 (or 8) updates
    assert cfg["validation"]["every"] == 10 and cfg["save_every"] == 10
    assert plan.resolver.run_config("toy-s-8up", "cppo", 0)["validation"]["every"] == 40
    assert plan.resolver.run_config("toy-s-8up", "cppo", 0)["method"]["delta"] == 0.20
    assert cfg["validation"]["benchmarks"] == ["results/toy/data/toy/val.jsonl"]
    assert cfg["validation"]["max_new_tokens"] == cfg["schedule"]["max_completion_length"] == 128
    raw = yaml.safe_load((ROOT / "config" / "toy.yaml").read_text())
    assert cfg["schedule"]["iterations"] == raw["models"]["toy-s-2up"]["schedule"]["iterations"]
    assert cfg["threads"] == 1
    trm = plan.resolver.run_config("toy-s-2up", "trm_max", 0)
    assert "divergence" not in trm and "divergence" not in trm["method"]
    assert plan.resolver.bound_rule("toy-s-2up", "trm_max").divergence["kind"] == "topk_kl"
    # grpo and none read none: run-level divergence is the diagnostic one the trainer logs
    for method in ("grpo", "none"):
        run = plan.resolver.run_config("toy-s-2up", method, 0)
        assert run["divergence"] == {"kind": "topk_tv", "topk": 20}
        assert "divergence" not in run["method"]


def test_run_yaml_is_the_dict_dumped_in_key_order(tmp_path):
    from cppo.pipeline.jobs import write_yaml

    run = Plan(toy()).resolver.run_config("toy-s-2up", "cppo", 0)
    write_yaml(run, tmp_path / "run.yaml")
    text = (tmp_path / "run.yaml").read_text()
    assert text == yaml.safe_dump(json.loads(json.dumps(run)), sort_keys=False)
    # a value two keys share (a YAML alias in a config) is written out twice, not as an anchor
    shared = {"kind": "topk_tv"}
    write_yaml({"a": shared, "b": shared}, tmp_path / "shared.yaml")
    assert (tmp_path / "shared.yaml").read_text() == "a:\n  kind: topk_tv\nb:\n  kind: topk_tv\n"


def test_run_config_is_accepted_by_the_trainer():
    runconfig = pytest.importorskip("cppo.run.config")
    for name in CONFIGS:
        plan = Plan(load_config(ROOT / "config" / f"{name}.yaml"))
        for run in plan.matrix.runs:
            runconfig.validate_run_config(copy.deepcopy(plan.resolver.run_config(*run)))


def test_paper_config_matches_table3():
    plan = Plan(load_config(ROOT / "config" / "paper.yaml"))
    table3 = {  # prompts, n, minibatch, updates, T_max, delta, delta_b, adaptive, w_min, T_stop
        "Qwen3-1.7B": (64, 8, 32, 2, 8192, 0.15, 0.015, False, 0.8, 1120),
        "Qwen3-1.7B-Base": (64, 8, 32, 2, 8192, 0.15, 0.020, True, 0.8, 680),
        "Qwen3-8B-Base": (128, 8, 32, 4, 8192, 0.15, 0.020, True, 0.8, 490),
        "Qwen3-30B-A3B-Base": (256, 16, 32, 8, 16384, 0.20, 0.020, True, 0.8, 560),
    }
    for model, row in table3.items():
        cfg = plan.resolver.run_config(model, "cppo", 0)
        s, m = cfg["schedule"], cfg["method"]
        got = (
            s["prompts_per_iter"],
            s["n"],
            s["minibatch"],
            s["updates_per_iter"],
            s["max_completion_length"],
            m["delta"],
            m["delta_b"],
            m["adaptive_delta_b"],
            m["w_min"],
            plan.cfg["models"][model]["t_stop"],
        )
        assert got == row, model
        assert plan.resolver.t_stop_steps(model) == row[-1] * row[3]
        assert cfg["model_revision"] and len(cfg["model_revision"]) == 40
        assert cfg["schedule"]["learning_rate"] == 1e-6 and cfg["schedule"]["temperature"] == 1.0
        assert cfg["validation"]["k"] == 16 and cfg["validation"]["temperature"] == 0.7
        assert cfg["validation"]["top_p"] == 0.95
        assert cfg["backend"] == ("verl" if model == "Qwen3-30B-A3B-Base" else "vllm")
        assert plan.resolver.run_config(model, "dppo", 0)["method"]["delta"] == row[5]
    assert plan.cfg["validation"]["benchmarks"] == ["aime24", "aime25", "aime26"]
    assert (
        plan.cfg["data"]["dapo_math_17k"]["revision"] == "65877096c24ffa7abc4e4fa5edb95cf3413a5674"
    )


def test_ablation_variants_change_one_thing():
    from cppo.rules import resolve_config

    plan = Plan(load_config(ROOT / "config" / "ablations.yaml"))

    def effective(method):
        # the rule's resolved config: keys left at the rule's default count as that default
        m = dict(plan.resolver.run_config("toy-s-8up", method, 0)["method"])
        return resolve_config(m.pop("rule"), m)

    base = effective("cppo")

    def diff(method):
        m = effective(method)
        return {k: m.get(k) for k in set(m) | set(base) if m.get(k) != base.get(k)}

    assert diff("cppo_no_position_weight") == {"position_weight": False}
    assert diff("cppo_no_prefix_budget") == {"prefix_budget": False}
    assert diff("cppo_shuffled_weights") == {"shuffle_weights": True}
    assert diff("cppo_soft_gate") == {"gate": "soft"}
    assert diff("cppo_db003_fixed") == {"delta_b": 0.03, "adaptive_delta_b": False}
    assert diff("cppo_wmin06") == {"w_min": 0.6}
    assert diff("cppo_kl") == {"delta": 0.1, "delta_b": 0.002, "divergence": "topk_kl"}
    assert diff("cppo_binary_tv") == {"divergence": "binary_tv"}


def test_method_overrides_and_extra_keys():
    cfg = toy()
    cfg["models"]["toy-s-2up"]["method_overrides"] = {"grpo": {"eps_high": 0.3}}
    cfg["training"]["extra"] = {"gradient_checkpointing": True}
    plan = Plan(cfg)
    run = plan.resolver.run_config("toy-s-2up", "grpo", 0)
    assert run["method"]["eps_high"] == 0.3 and run["method"]["eps_low"] == 0.2
    assert run["gradient_checkpointing"] is True


def test_format_cli_args():
    assert format_cli_args({"n-train": 100, "fast": True, "slow": False, "x": None}) == (
        "--n-train 100 --fast"
    )
    assert format_cli_args({"path": "a b"}) == "--path 'a b'"


def test_a_plugin_module_reaches_run_yaml_imports(tmp_path, monkeypatch):
    from cppo.rules import registry

    # the plugin registers into a copy of the registry, dropped after the test
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.delitem(sys.modules, "plugin_rule_cfg", raising=False)
    (tmp_path / "plugin_rule_cfg.py").write_text(
        "from cppo.rules import register_rule, get_rule, available_rules\n"
        "if 'plugin_cfg_rule' not in available_rules():\n"
        "    register_rule('plugin_cfg_rule', params=dict(get_rule('grpo').params))(\n"
        "        get_rule('grpo').fn)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = toy()
    cfg["methods"]["plug"] = {"rule": "plugin_cfg_rule", "module": "plugin_rule_cfg"}
    cfg["run"]["methods"] = ["grpo", "plug"]
    plan = Plan(cfg)
    assert plan.resolver.run_config("toy-s-2up", "plug", 0)["method"] == {
        "rule": "plugin_cfg_rule",
        "loss_agg_mode": "seq-mean-token-sum-norm",
        "horizon": 128,
    }
    # the train command imports the module itself, from run.yaml's `imports`
    assert plan.resolver.run_config("toy-s-2up", "plug", 0)["imports"] == ["plugin_rule_cfg"]
    assert "imports" not in plan.resolver.run_config("toy-s-2up", "grpo", 0)
    assert plan.commands.train_command("toy-s-2up") == "python -m cppo.train"
    cfg["methods"]["plug"]["module"] = "no_such_module_here"
    assert any("methods.plug.module" in e for e in errors_of(cfg))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("out.keep = None", "RuleOutput.keep must be a tensor of shape (2, 3), got NoneType"),
        ("out.per_token_loss = out.per_token_loss.detach()", "carries no gradient"),
        ("out.weight = out.weight[:, :2]", "RuleOutput.weight must have the batch's shape"),
        ("out.per_token_loss = out.per_token_loss * float('nan')", "is not finite"),
        ("out.metrics['x'] = [1.0]", "RuleOutput.metrics['x'] must be a 0-dim tensor"),
        ("raise KeyError('cap')", "fails on a probe batch (2 responses x 3 tokens): KeyError"),
    ],
)
def test_a_rule_breaking_the_contract_stops_the_dry_run(tmp_path, monkeypatch, body, message):
    # before, such a rule passed validate and the dry run and crashed hours into training,
    # once groups had reward variance, naming no rule
    from cppo.rules import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.delitem(sys.modules, "broken_rule_cfg", raising=False)
    (tmp_path / "broken_rule_cfg.py").write_text(
        "from cppo.rules import register_rule, get_rule\n"
        "_grpo = get_rule('grpo')\n"
        "@register_rule('broken', params=dict(_grpo.params))\n"
        "def broken(batch, cfg):\n"
        "    out = _grpo.fn(batch, cfg)\n"
        f"    {body}\n"
        "    return out\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = toy()
    cfg["methods"]["bad"] = {"rule": "broken", "module": "broken_rule_cfg"}
    cfg["run"]["methods"] = ["grpo", "bad"]
    errors = errors_of(cfg)
    assert any(e.startswith("methods.bad.rule: ") and message in e for e in errors), errors


def test_configs_take_their_methods_from_the_catalogue_and_override_by_key(tmp_path):
    catalogue = yaml.safe_load((ROOT / "config" / "methods.yaml").read_text())["methods"]
    cfg = validate(toy())
    assert list(cfg["methods"]) == list(catalogue)
    assert cfg["methods"]["cppo"]["params"] == catalogue["cppo"]["params"]
    raw = toy()
    raw["methods"] = {"cppo": {"params": {"delta_b_max_factor": 5.0}}}
    cppo = validate(raw)["methods"]["cppo"]
    assert cppo["params"] == {**catalogue["cppo"]["params"], "delta_b_max_factor": 5.0}
    assert cppo["from_model"] == catalogue["cppo"]["from_model"] and cppo["label"] == "CPPO"
    raw["method_catalogue"] = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="method_catalogue: no such file"):
        validate(raw)


def test_schema_defaults_fill_what_a_config_leaves_out():
    raw = toy()
    for key in ("collapse", "figures", "publish", "commands"):
        raw.pop(key, None)
    cfg = validate(raw)
    assert cfg["collapse"] == {
        "nonfinite_keys": ["reward/mean", "grad_norm"],
        "val_fraction": None,
        "consecutive": 2,
    }
    assert cfg["figures"] == {"smoothing": 0.8, "dpi": 150, "ablations": []}
    assert cfg["publish"]["wandb"]["enabled"] is False
    assert cfg["commands"]["train"] == {"launcher": "python -m", "module": "cppo.train"}
    # a default given for a mapping is merged under what the config gives
    assert cfg["resources"]["train"]["nodes"] == 1
    # defaults that depend on other keys
    assert cfg["evaluation"]["k"] == raw["evaluation"].get("k", raw["validation"]["k"])
    assert cfg["methods"]["none"]["label"] == "no trust region"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("delta_b", 0.0),
        ("delta_b", -0.01),
        ("delta", 0.0),
        ("delta", 0.1),
        ("w_min", 0.0),
        ("w_min", 1.0),
        ("w_min", 1.5),
    ],
)
def test_trust_region_ranges_agree_with_the_rule(key, value):
    from cppo.rules import RuleConfigError, get_rule

    try:
        get_rule("cppo").resolve({key: value})
        rule_ok = True
    except RuleConfigError:
        rule_ok = False
    raw = toy()
    for model in raw["models"].values():
        model.setdefault("trust_region", {})[key] = value
    try:
        validate(raw)
        pipeline_ok = True
    except ConfigError as err:
        assert f"trust_region.{key}" in str(err)
        pipeline_ok = False
    assert pipeline_ok == rule_ok, (key, value)


def test_extends_merges_a_config_over_its_base(tmp_path):
    base = load_config(ROOT / "config" / "toy.yaml")
    ext = Plan(load_config(ROOT / "config" / "toy-extended.yaml"))
    toy_plan = Plan(base)
    assert ext.matrix.root == "results/toy-extended"
    # lists replace the base's; everything the config leaves out is the base's
    assert ext.matrix.methods[: len(toy_plan.matrix.methods)] == toy_plan.matrix.methods
    assert len(ext.matrix.runs) == 96 and len(toy_plan.matrix.runs) == 48
    assert ext.cfg["models"] == toy_plan.cfg["models"]
    assert ext.cfg["validation"] == toy_plan.cfg["validation"]
    # the shared runs resolve to the same run.yaml up to their directory
    for model, method, seed in toy_plan.matrix.runs:
        a = toy_plan.resolver.run_config(model, method, seed)
        b = ext.resolver.run_config(model, method, seed)
        assert json.dumps(a).replace("results/toy/", "results/toy-extended/") == json.dumps(b)
    one = tmp_path / "one.yaml"
    two = tmp_path / "two.yaml"
    one.write_text(yaml.safe_dump({"extends": str(two), "profile": "one"}))
    two.write_text(yaml.safe_dump({"extends": str(one)}))
    with pytest.raises(ConfigError, match="extends: .* is a cycle"):
        validate(load_config(one))
    with pytest.raises(ConfigError, match="extends: no such file"):
        validate({"extends": str(tmp_path / "missing.yaml")})


def test_a_method_preset_fixes_its_advantage_scaling(tmp_path):
    plan = Plan(load_config(ROOT / "config" / "toy-extended.yaml"))
    dr = plan.resolver.run_config("toy-s-2up", "dr_grpo", 0)
    assert dr["method"] == {
        "rule": "grpo",
        "loss_agg_mode": "seq-mean-token-sum-norm",
        "horizon": 128,
        "eps_low": 0.2,
        "eps_high": 0.2,
        "dual_clip": None,
    }
    assert dr["rl"] == {"scale_rewards": "none"}
    raw = load_config(ROOT / "config" / "toy-extended.yaml")
    raw["training"] = {"scale_rewards": "group"}
    plan = Plan(raw)
    assert plan.resolver.run_config("toy-s-2up", "dr_grpo", 0)["rl"]["scale_rewards"] == "none"
    assert plan.resolver.run_config("toy-s-2up", "grpo", 0)["rl"]["scale_rewards"] == "group"


def test_paper_config_takes_a_rule_beyond_the_paper_by_name():
    raw = load_config(ROOT / "config" / "paper.yaml")
    base = Plan(raw)
    raw["run"]["methods"] = [*raw["run"]["methods"], "gspo", "m2po", "dr_grpo"]
    plan = Plan(raw)
    assert len(plan.matrix.runs) == len(base.matrix.runs) + 3 * 4
    assert plan.resolver.rule_errors() == []
    run = plan.resolver.run_config("Qwen3-8B-Base", "gspo", 0)
    assert run["method"]["rule"] == "gspo" and run["method"]["eps_high"] == 4e-4
    assert run["method"]["loss_agg_mode"] == "seq-mean-token-mean"

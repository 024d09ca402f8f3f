"""What each run of the matrix is: its rule params, schedule, T_stop and its run.yaml.

Units: the workflow config counts iterations (one rollout batch, the paper's "training step");
the trainer counts optimizer steps. One iteration = schedule.updates_per_iter optimizer steps.
"""

from __future__ import annotations

import importlib
from typing import Any

from cppo.pipeline.commands import Commands
from cppo.pipeline.config import (
    OPTIONAL_SCHEDULE_KEYS,
    deep_merge,
    model_schedule,
    model_training,
)
from cppo.pipeline.matrix import RunMatrix
from cppo.rules import BoundRule, RuleContractError, get_rule
from cppo.rules.source import source_digest


class RunResolver:
    """The resolved settings of every {model, method, seed} of one config."""

    def __init__(self, matrix: RunMatrix, commands: Commands):
        self.matrix = matrix
        self.commands = commands
        self.cfg = matrix.cfg
        self._rule_code: dict[str, str] = {}

    # --- steps and units ----------------------------------------------------------------------
    def schedule(self, model: str) -> dict[str, Any]:
        return model_schedule(self.cfg, model)

    def updates_per_iter(self, model: str) -> int:
        return int(self.schedule(model)["updates_per_iter"])

    def steps(self, model: str, iterations: int) -> int:
        """Iterations -> optimizer steps for this model."""
        return int(iterations) * self.updates_per_iter(model)

    def t_stop_steps(self, model: str) -> int:
        return self.steps(model, self.cfg["models"][model]["t_stop"])

    # --- methods ------------------------------------------------------------------------------
    def method_params(self, model: str, method: str) -> dict[str, Any]:
        """Rule params for this model: the training block's loss aggregation and the horizon
        (max_completion_length), the method params, then from_model keys, then the model's
        overrides; a method-level `divergence` becomes the rule's divergence/topk params."""
        entry = self.cfg["methods"][method]
        params = {
            "loss_agg_mode": model_training(self.cfg, model)["loss_agg_mode"],
            "horizon": self.schedule(model)["max_completion_length"],
            **entry["params"],
        }
        trust = self.cfg["models"][model]["trust_region"]
        for key in entry["from_model"]:
            params[key] = trust[key]
        if entry["divergence"]:
            params["divergence"] = entry["divergence"]["kind"]
            if "topk" in entry["divergence"]:
                params["topk"] = entry["divergence"]["topk"]
        overrides = self.cfg["models"][model]["method_overrides"].get(method, {})
        return deep_merge(params, overrides)

    def bound_rule(self, model: str, method: str) -> BoundRule:
        """The method's rule bound to its params for this model (plugin module imported)."""
        entry = self.cfg["methods"][method]
        if entry["module"]:
            importlib.import_module(entry["module"])
        return get_rule(entry["rule"]).bind(self.method_params(model, method))

    def rule_code(self, method: str) -> str:
        """The digest of the method's rule's source and the project modules it imports
        (cppo.rules.source; computed once per plan)."""
        rule = self.cfg["methods"][method]["rule"]
        if rule not in self._rule_code:
            module = self.cfg["methods"][method]["module"]
            if module:
                importlib.import_module(module)
            self._rule_code[rule] = source_digest(get_rule(rule).fn.__module__)
        return self._rule_code[rule]

    def diagnostic_divergence(self, model: str, method: str) -> dict[str, Any] | None:
        """run.yaml `divergence`: for a rule that reads no divergence, the one the trainer
        computes and logs anyway (the config's training divergence); None for a rule that
        reads one, which takes it from its own params (method_params)."""
        if self.bound_rule(model, method).divergence is not None:
            return None
        div = model_training(self.cfg, model)["divergence"]
        return {"kind": div["kind"], "topk": int(div.get("topk", 20))}

    def rule_errors(self) -> list[str]:
        """Every run's method checked by its rule: its module imports, the rule exists, the
        rule accepts its params (unknown keys, bad values), and its output on a probe batch
        keeps the RuleOutput contract (cppo.rules.registry.check_output)."""
        errors: list[str] = []
        methods = self.matrix.methods
        for name in methods:
            module = self.cfg["methods"][name]["module"]
            if module:
                try:
                    importlib.import_module(module)
                except ImportError as err:
                    errors.append(f"methods.{name}.module: cannot import {module!r}: {err}")
        for name in methods:
            rule_name = self.cfg["methods"][name]["rule"]
            try:
                rule = get_rule(rule_name)
            except ValueError as err:
                errors.append(f"methods.{name}.rule: {err}")
                continue
            for model in self.matrix.models:
                try:
                    bound = rule.bind(self.method_params(model, name))
                except ValueError as err:
                    where = f"methods.{name}.params (model {model})"
                    if (
                        model in self.cfg["models"]
                        and name in self.cfg["models"][model]["method_overrides"]
                    ):
                        where += f" or models.{model}.method_overrides.{name}"
                    errors.append(f"{where}: {err}")
                    continue
                try:
                    bound.check_contract()
                except RuleContractError as err:
                    errors.append(f"methods.{name}.rule: {err}")
                except Exception as err:  # noqa: BLE001 (any failure of a rule's own code)
                    errors.append(
                        f"methods.{name}.rule: rule {rule_name!r} fails on a probe batch "
                        f"(2 responses x 3 tokens): {type(err).__name__}: {err}"
                    )
        return list(dict.fromkeys(errors))

    # --- run config ---------------------------------------------------------------------------
    def run_config(self, model: str, method: str, seed: int | str) -> dict[str, Any]:
        """The trainer's run.yaml for one {model, method, seed} (keys as in CONTRACTS.md)."""
        seed = int(seed)
        matrix = self.matrix
        entry = self.cfg["models"][model]
        sched = self.schedule(model)
        training = model_training(self.cfg, model)
        val = self.cfg["validation"]
        upi = self.updates_per_iter(model)
        save_iters = training["save_every"] or val["every"]

        cfg: dict[str, Any] = {
            "run_name": f"{model}__{method}__s{seed}",
            "method_name": method,
            "output_dir": matrix.run_dir(model, method, seed),
            "seed": seed,
        }
        if entry["source"] == "toy":
            cfg["model"] = matrix.model_dir(model)
        else:
            cfg["model"] = entry["hub"]["id"]
            cfg["model_revision"] = entry["hub"]["revision"]
        cfg["train_data"] = matrix.train_data
        module = self.cfg["methods"][method]["module"]
        if module:
            # imported by the train command (and verl's loss) before the rule is looked up
            cfg["imports"] = [module]
        cfg["method"] = {"rule": self.cfg["methods"][method]["rule"]}
        cfg["method"].update(self.method_params(model, method))
        # the rule's source as an input of the run: an edit reruns the runs of this rule only
        cfg["rule_code"] = self.rule_code(method)
        diagnostic = self.diagnostic_divergence(model, method)
        if diagnostic is not None:
            cfg["divergence"] = diagnostic
        cfg["anchor"] = training["anchor"]
        cfg["schedule"] = {
            "prompts_per_iter": sched["prompts_per_iter"],
            "n": sched["n"],
            "minibatch": sched["minibatch"],
            "updates_per_iter": upi,
            "iterations": sched["iterations"],
            "learning_rate": sched["learning_rate"],
            "warmup_steps": sched["warmup_steps"],
            "max_prompt_length": sched["max_prompt_length"],
            "max_completion_length": sched["max_completion_length"],
            "temperature": sched["temperature"],
        }
        for key in OPTIONAL_SCHEDULE_KEYS:
            if sched.get(key) is not None:
                cfg["schedule"][key] = sched[key]
        cfg["validation"] = {
            "every": val["every"] * upi,
            "benchmarks": [matrix.benchmark_path(b) for b in val["benchmarks"]],
            "k": val["k"],
            "temperature": val["temperature"],
            "top_p": val["top_p"],
            "max_new_tokens": val["max_new_tokens"] or sched["max_completion_length"],
            "batch_size": val["batch_size"],
        }
        method_scale = self.cfg["methods"][method]["scale_rewards"]
        cfg["rl"] = {"scale_rewards": method_scale or training["scale_rewards"]}
        if training["backend"] == "verl":
            # verl keeps zero-variance groups in its loss normalisers (their advantage is 0)
            cfg["rl"]["mask_std_0"] = False
        cfg["cast_lm_head_to_fp32"] = training["cast_lm_head_to_fp32"]
        cfg["backend"] = training["backend"]
        if training["backend"] == "verl":
            res = self.commands.resources("train", model)
            cfg["verl"] = {
                **training["verl"],
                "nnodes": self.commands.nodes(model),
                "gpus_per_node": int(res.get("gpus", 0)) or 1,
            }
        cfg["bf16"] = training["bf16"]
        cfg["use_cpu"] = training["use_cpu"]
        cfg["report_to"] = training["report_to"]
        cfg["save_every"] = save_iters * upi
        if self.t_stop_steps(model) < sched["iterations"] * upi:
            # snapshots: best keeps the best validation the selection can pick (within T_stop)
            cfg["snapshot_best_within"] = self.t_stop_steps(model)
        # per process: each of a node's trainer processes would otherwise claim every core
        cfg["threads"] = self.commands.threads_per_process(model)
        for key, value in training["extra"].items():
            # `divergence` is the pipeline's even where it leaves it out (a rule reading its own)
            if key in cfg or key == "divergence":
                raise ValueError(f"training.extra.{key}: would overwrite a resolved run.yaml key")
            cfg[key] = value
        return cfg

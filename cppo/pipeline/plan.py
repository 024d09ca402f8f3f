"""From a validated workflow config to the job matrix: paths, run configs, commands, resources.

Everything the Snakemake rules need is computed here, in plain Python, so that it is testable
without Snakemake and the rule files stay declarative. All paths are relative to the workflow's
working directory (the repository root by default) and live under results/<profile>/.

Units: the workflow config counts iterations (one rollout batch, the paper's "training step");
the trainer counts optimizer steps. One iteration = schedule.updates_per_iter optimizer steps.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from functools import cached_property
from typing import Any

from cppo.pipeline import layout
from cppo.pipeline.config import (
    OPTIONAL_SCHEDULE_KEYS,
    TRUST_REGION_KEYS,
    ConfigError,
    deep_merge,
    is_accelerate_launcher,
    model_resources,
    model_schedule,
    model_training,
    train_processes_per_node,
    train_world_size,
    validate,
)

# Rendezvous port of a multi-node job: offset by the SLURM job id so that two jobs sharing a
# node never collide.
MAIN_PROCESS_PORT_BASE = 29500

# Colour-blind-friendly palette (Okabe-Ito first, then tab10 extras), assigned in catalog order
# to methods without an explicit colour so a method keeps its colour across figures.
PALETTE = [
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#CC79A7",
    "#56B4E9",
    "#D55E00",
    "#F0E442",
    "#000000",
    "#8C564B",
    "#7F7F7F",
    "#BCBD22",
    "#17BECF",
]


def format_cli_args(args: Mapping[str, Any]) -> str:
    """{'n-train': 100, 'fast': True, 'x': None} -> "--n-train 100 --fast" (shell-quoted)."""
    parts: list[str] = []
    for key, value in args.items():
        if value is None or value is False:
            continue
        flag = key if key.startswith("-") else f"--{key}"
        parts.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


class Plan:
    """The job matrix of one workflow config."""

    def __init__(
        self, config: Mapping[str, Any], *, normalized: bool = False, check_rules: bool = True
    ):
        self.cfg: dict[str, Any] = dict(config) if normalized else validate(config)
        self.profile: str = self.cfg["profile"]
        self.root = f"results/{self.profile}"
        if check_rules:
            errors = self.rule_errors()
            if errors:
                raise ConfigError(errors)

    # --- matrix -------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self.cfg["run"]["models"])

    @property
    def methods(self) -> list[str]:
        return list(self.cfg["run"]["methods"])

    @property
    def seeds(self) -> list[int]:
        return list(self.cfg["seeds"])

    @property
    def runs(self) -> list[tuple[str, str, int]]:
        return [(mo, me, s) for mo in self.models for me in self.methods for s in self.seeds]

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    # --- data ---------------------------------------------------------------------------------
    @property
    def toy_data_dir(self) -> str:
        return self.path("data", "toy")

    @property
    def train_data(self) -> str:
        src = self.cfg["data"]["train"]
        if src["source"] == "toy":
            return f"{self.toy_data_dir}/train.jsonl"
        if src["source"] == "dapo_math_17k":
            return self.path("data", "dapo_math_17k", "train.jsonl")
        return src["path"]

    @property
    def used_benchmarks(self) -> list[str]:
        names = list(self.cfg["validation"]["benchmarks"])
        if self.cfg["evaluation"]["enabled"]:
            names += [b for b in self.cfg["evaluation"]["benchmarks"] if b not in names]
        return names

    @property
    def registry_benchmarks(self) -> list[str]:
        return [
            b for b in self.used_benchmarks if self.cfg["benchmarks"][b]["source"] == "registry"
        ]

    def benchmark_path(self, name: str) -> str:
        bench = self.cfg["benchmarks"][name]
        if bench["source"] == "toy":
            return f"{self.toy_data_dir}/{name}.jsonl"
        if bench["source"] == "registry":
            return self.path("data", "benchmarks", f"{name}.jsonl")
        return bench["path"]

    # --- models -------------------------------------------------------------------------------
    @property
    def tokenizer_dir(self) -> str:
        return self.path("models", "tokenizer")

    @property
    def toy_models(self) -> list[str]:
        return [m for m in self.models if self.cfg["models"][m]["source"] == "toy"]

    @property
    def hub_models(self) -> list[str]:
        return [m for m in self.models if self.cfg["models"][m]["source"] == "hub"]

    def init_model_name(self, model: str) -> str:
        toy = self.cfg["models"][model]["toy"]
        return f"{toy['preset']}-s{toy['seed']}"

    @property
    def init_models(self) -> dict[str, dict[str, Any]]:
        """init name -> {preset, seed}, one per distinct (preset, seed) among the toy models."""
        out: dict[str, dict[str, Any]] = {}
        for model in self.toy_models:
            toy = self.cfg["models"][model]["toy"]
            out[self.init_model_name(model)] = {"preset": toy["preset"], "seed": toy["seed"]}
        return out

    def init_model_dir(self, init_name: str) -> str:
        return self.path("models", "init", init_name)

    def warm_start_name(self, model: str) -> str:
        """One SFT warm start per (preset, flavour, seed), shared by every model entry (column)
        that starts from it."""
        toy = self.cfg["models"][model]["toy"]
        return f"{toy['preset']}-{toy['flavour']}-s{toy['seed']}"

    @property
    def warm_starts(self) -> dict[str, dict[str, Any]]:
        """warm-start name -> {model: one toy model entry that uses it, flavour, seed}."""
        out: dict[str, dict[str, Any]] = {}
        for model in self.toy_models:
            toy = self.cfg["models"][model]["toy"]
            out.setdefault(
                self.warm_start_name(model),
                {"model": model, "flavour": toy["flavour"], "seed": toy["seed"]},
            )
        return out

    def model_dir(self, model: str) -> str:
        """The warm-started toy model a run of `model` starts from."""
        return self.path("models", "warm", self.warm_start_name(model))

    def hub_marker(self, model: str) -> str:
        return self.path("models", f"{model}.hub.json")

    def model_inputs(self, model: str) -> list[str]:
        """Files a train job needs for its model (the warm-started dir or the prefetch marker)."""
        entry = self.cfg["models"][model]
        if entry["source"] == "toy":
            return [self.model_dir(model)]
        return [self.hub_marker(model)] if entry["hub"]["prefetch"] else []

    # --- per-run paths ------------------------------------------------------------------------
    def config_path(self, model: str, method: str, seed: int | str) -> str:
        return layout.config_path(self.root, model, method, seed)

    def run_dir(self, model: str, method: str, seed: int | str) -> str:
        return layout.run_dir(self.root, model, method, seed)

    def done_path(self, model: str, method: str, seed: int | str) -> str:
        return f"{self.run_dir(model, method, seed)}/DONE"

    def selection_path(self, model: str, method: str, seed: int | str) -> str:
        return layout.selection_path(self.root, model, method, seed)

    def eval_summaries(self, model: str, method: str, seed: int | str, ckpt: str) -> list[str]:
        return [
            layout.eval_summary(self.root, model, method, seed, ckpt, b)
            for b in self.cfg["evaluation"]["benchmarks"]
        ]

    @property
    def manifest_path(self) -> str:
        return self.path("manifest.json")

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

    def method_divergence(self, model: str, method: str) -> dict[str, Any]:
        """run.yaml `divergence`: the rule's own when it reads one (the trainer requires them to
        agree), else the config's training divergence (what is logged for diagnostics)."""
        from cppo.rules import rule_divergence

        rule = self.cfg["methods"][method]["rule"]
        own = rule_divergence(rule, self.method_params(model, method))
        if own is not None:
            return {"kind": own["kind"], "topk": int(own["topk"])}
        div = model_training(self.cfg, model)["divergence"]
        return {"kind": div["kind"], "topk": int(div.get("topk", 20))}

    def rule_errors(self) -> list[str]:
        """Every run's method config checked by its rule (unknown keys, bad values)."""
        import importlib

        from cppo.rules import get_rule

        errors: list[str] = []
        for name in self.methods:
            module = self.cfg["methods"][name]["module"]
            if module:
                try:
                    importlib.import_module(module)
                except ImportError as err:
                    errors.append(f"methods.{name}.module: cannot import {module!r}: {err}")
        for name in self.methods:
            rule_name = self.cfg["methods"][name]["rule"]
            try:
                rule = get_rule(rule_name)
            except ValueError as err:
                errors.append(f"methods.{name}.rule: {err}")
                continue
            for model in self.models:
                try:
                    rule.resolve(self.method_params(model, name))
                except ValueError as err:
                    where = f"methods.{name}.params (model {model})"
                    if (
                        model in self.cfg["models"]
                        and name in self.cfg["models"][model]["method_overrides"]
                    ):
                        where += f" or models.{model}.method_overrides.{name}"
                    errors.append(f"{where}: {err}")
        return list(dict.fromkeys(errors))

    @cached_property
    def method_colors(self) -> dict[str, str]:
        methods = self.cfg["methods"]
        taken = {m["color"] for m in methods.values() if m["color"]}
        free = iter(c for c in PALETTE if c not in taken)
        out = {}
        for name, entry in methods.items():
            out[name] = entry["color"] or next(free, "#444444")
        return out

    # --- resources and commands ---------------------------------------------------------------
    def resources(self, step: str, model: str | None = None) -> dict[str, Any]:
        return model_resources(self.cfg, step, model)

    def nodes(self, model: str) -> int:
        return int(self.resources("train", model)["nodes"])

    def processes_per_node(self, model: str) -> int:
        """Trainer processes per node (one per GPU under accelerate; 1 on CPU)."""
        return train_processes_per_node(self.cfg, model)

    def world_size(self, model: str) -> int:
        """Trainer processes of one run: nodes x processes per node."""
        return train_world_size(self.cfg, model)

    def threads_per_process(self, model: str) -> int:
        """CPU threads of one trainer process: the job's (per-node) threads over its processes."""
        return max(1, self.threads("train", model) // self.processes_per_node(model))

    def snakemake_resources(self, step: str, model: str | None = None) -> dict[str, Any]:
        """The `resources:` of a job, in the names the local and SLURM executors read.

        A training job on more than one node also gets nodes, tasks_per_node (one task per GPU,
        each with threads / gpus cores, so the allocation holds every core of every node) and
        `mpi`, which makes the SLURM job step run the job's command as is: the command starts
        its own `srun` over the nodes. gpu is then the job's total (sbatch --gpus). Keys that
        are None are left out by Snakemake.
        """
        res = self.resources(step, model)
        out: dict[str, Any] = {
            "mem_mb": res["mem_mb"],
            "runtime": res["runtime"],
            "gpu": res.get("gpus", 0),
            "nodes": None,
            "tasks_per_node": None,
            "cpus_per_task": None,
            "mpi": None,
        }
        if step == "train" and model is not None and self.nodes(model) > 1:
            per_node = self.processes_per_node(model)
            out.update(
                gpu=self.nodes(model) * per_node,
                nodes=self.nodes(model),
                tasks_per_node=per_node,
                cpus_per_task=self.threads_per_process(model),
                mpi="srun",
            )
        return out

    def threads(self, step: str, model: str | None = None) -> int:
        return int(self.resources(step, model)["threads"])

    def command(self, name: str) -> str:
        cmd = self.cfg["commands"][name]
        return f"{cmd['launcher']} {cmd['module']}"

    def train_command(self, method: str, model: str | None = None) -> str:
        """The trainer invocation (without --config); imports a rule's module first if needed.

        With a model and an `accelerate launch` launcher, the launch gets --num_processes (all
        nodes' GPUs). On more than one node the command is one srun task per node, each running
        `accelerate launch` with its node's rank and the first node as the rendezvous host;
        the trainer's own arguments (--config, appended by train-job) reach it through "$@".
        """
        cmd = self.cfg["commands"]["train"]
        launcher = cmd["launcher"]
        module = self.cfg["methods"][method]["module"]
        target = cmd["module"]
        if module:
            target = f"cppo.pipeline.launch --import {shlex.quote(module)} -- {cmd['module']}"
        if model is None or not is_accelerate_launcher(launcher):
            return f"{launcher} {target}"
        # "accelerate launch --config_file F -m" -> "--config_file F -m"
        rest = [shlex.join(shlex.split(launcher)[2:])]
        nodes = self.nodes(model)
        flags = ["--num_processes", str(self.world_size(model))]
        if nodes == 1:
            return " ".join(["accelerate", "launch", *flags, *rest, target])
        # expanded by each srun task on its own node (inside bash -c), not by the job's shell
        flags += [
            f"--num_machines {nodes}",
            '--machine_rank "$SLURM_NODEID"',
            '--main_process_ip "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
            f'--main_process_port "$(({MAIN_PROCESS_PORT_BASE} + SLURM_JOB_ID % 10000))"',
        ]
        per_node = " ".join(["exec accelerate launch", *flags, *rest, target, '"$@"'])
        srun = (
            f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1"
            f" --cpus-per-task={self.threads('train', model)}"
            f" --gpus-per-node={self.processes_per_node(model)} --kill-on-bad-exit=1"
        )
        return f"{srun} bash -c {shlex.quote(per_node)} cppo-train"

    def toy_args(self, step: str) -> str:
        return format_cli_args(self.cfg["toy"][step]["args"])

    def env_file(self, model: str | None = None) -> str:
        """Conda env of a job, relative to workflows/ (Snakemake resolves it from the rule file)."""
        env = self.cfg["models"][model]["env"] if model else "cpu"
        return f"../envs/{env}.yaml"

    # --- evaluation -----------------------------------------------------------------------------
    def eval_args(self, model: str) -> str:
        """Options of `python -m evaluation` after --model, shared by every checkpoint."""
        ev = self.cfg["evaluation"]
        files = " ".join(
            f"--benchmark-file {shlex.quote(self.benchmark_path(b))}" for b in ev["benchmarks"]
        )
        backend = ev["backend"]
        if self.cfg["models"][model]["source"] == "toy":
            backend = "transformers"
        opts: dict[str, Any] = {
            "k": ev["k"],
            "temperature": ev["temperature"],
            "top-p": ev["top_p"],
            "max-new-tokens": ev["max_new_tokens"] or self.schedule(model)["max_completion_length"],
            "backend": backend,
            "seed": ev["seed"],
            "grading-mode": ev["grading_mode"],
        }
        if backend == "vllm":
            opts["tensor-parallel-size"] = max(1, self.resources("evaluate", model).get("gpus", 1))
        else:
            opts["batch-size"] = ev["batch_size"]
        extra = format_cli_args({**opts, **ev["args"]})
        return f"{files} {extra}"

    def initial_model(self, model: str) -> tuple[str, str | None]:
        """(path or hub id, revision) of the model a run starts from (its step-0 checkpoint)."""
        entry = self.cfg["models"][model]
        if entry["source"] == "toy":
            return self.model_dir(model), None
        return entry["hub"]["id"], entry["hub"]["revision"]

    @property
    def eval_checkpoints(self) -> list[str]:
        ev = self.cfg["evaluation"]
        return list(ev["checkpoints"]) if ev["enabled"] else []

    # --- run config ---------------------------------------------------------------------------
    def run_config(self, model: str, method: str, seed: int | str) -> dict[str, Any]:
        """The trainer's run.yaml for one {model, method, seed} (keys as in CONTRACTS.md)."""
        seed = int(seed)
        entry = self.cfg["models"][model]
        sched = self.schedule(model)
        training = model_training(self.cfg, model)
        val = self.cfg["validation"]
        upi = self.updates_per_iter(model)
        save_iters = training["save_every"] or val["every"]

        cfg: dict[str, Any] = {
            "run_name": f"{model}__{method}__s{seed}",
            "method_name": method,
            "output_dir": self.run_dir(model, method, seed),
            "seed": seed,
        }
        if entry["source"] == "toy":
            cfg["model"] = self.model_dir(model)
        else:
            cfg["model"] = entry["hub"]["id"]
            cfg["model_revision"] = entry["hub"]["revision"]
        cfg["train_data"] = self.train_data
        cfg["method"] = {"rule": self.cfg["methods"][method]["rule"]}
        cfg["method"].update(self.method_params(model, method))
        cfg["divergence"] = self.method_divergence(model, method)
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
            "benchmarks": [self.benchmark_path(b) for b in val["benchmarks"]],
            "k": val["k"],
            "temperature": val["temperature"],
            "top_p": val["top_p"],
            "max_new_tokens": val["max_new_tokens"] or sched["max_completion_length"],
            "batch_size": val["batch_size"],
        }
        cfg["rl"] = {"scale_rewards": training["scale_rewards"]}
        cfg["cast_lm_head_to_fp32"] = training["cast_lm_head_to_fp32"]
        cfg["backend"] = training["backend"]
        cfg["bf16"] = training["bf16"]
        cfg["use_cpu"] = training["use_cpu"]
        cfg["report_to"] = training["report_to"]
        cfg["save_every"] = save_iters * upi
        if self.t_stop_steps(model) < sched["iterations"] * upi:
            # snapshots: best keeps the best validation the selection can pick (within T_stop)
            cfg["snapshot_best_within"] = self.t_stop_steps(model)
        # per process: each of a node's trainer processes would otherwise claim every core
        cfg["threads"] = self.threads_per_process(model)
        for key, value in training["extra"].items():
            if key in cfg:
                raise ValueError(f"training.extra.{key}: would overwrite a resolved run.yaml key")
            cfg[key] = value
        return cfg

    # --- what the aggregate / plot / report steps read ---------------------------------------------
    def figure_names(self) -> list[str]:
        names = ["fig4_validation", "binding", "fig2_position_deviation", "fig7_prefix_budget"]
        names += [f"diagnostics_{m}" for m in self.models]
        names += [fig["name"] for fig in self.cfg["figures"]["ablations"]]
        return names

    def table_names(self) -> list[str]:
        """The rendered tables (each from its own CSV of the aggregate step)."""
        names = ["table1", "table4", "stability", "binding"]
        if self.eval_checkpoints:
            names.append("posthoc")
        if self.cfg["paper_comparison"]:
            names.append("paper_diff")
        return names

    def aggregate_csvs(self) -> list[str]:
        """The CSVs the aggregate step writes: the tables' and the long validation/status."""
        return ["validation_long", "run_status", *self.table_names()]

    def manifest(self) -> dict[str, Any]:
        cfg = self.cfg
        models = {}
        for m in self.models:
            entry = cfg["models"][m]
            models[m] = {
                "label": entry["label"],
                "stands_for": entry["stands_for"],
                "source": entry["source"],
                "updates_per_iter": self.updates_per_iter(m),
                "iterations": self.schedule(m)["iterations"],
                "t_stop": entry["t_stop"],
                "t_stop_steps": self.t_stop_steps(m),
                "trust_region": {
                    k: entry["trust_region"][k]
                    for k in TRUST_REGION_KEYS
                    if k in entry["trust_region"]
                },
            }
        methods = {
            name: {
                "label": cfg["methods"][name]["label"],
                "color": self.method_colors[name],
                "rule": cfg["methods"][name]["rule"],
            }
            for name in self.methods
        }
        runs = [{"model": mo, "method": me, "seed": s} for mo, me, s in self.runs]
        method_params = {
            mo: {me: self.method_params(mo, me) for me in self.methods} for mo in self.models
        }
        return {
            "profile": self.profile,
            "title": cfg["report"]["title"],
            "description": cfg["description"],
            "results_dir": self.root,
            "seeds": self.seeds,
            "models": models,
            "methods": methods,
            "runs": runs,
            "method_params": method_params,
            "benchmarks": {
                b: {"label": cfg["benchmarks"][b]["label"], "path": self.benchmark_path(b)}
                for b in self.used_benchmarks
            },
            "validation": {
                "benchmarks": cfg["validation"]["benchmarks"],
                "k": cfg["validation"]["k"],
                "every": cfg["validation"]["every"],
            },
            "evaluation": {
                "checkpoints": self.eval_checkpoints,
                "benchmarks": cfg["evaluation"]["benchmarks"] if self.eval_checkpoints else [],
                "k": cfg["evaluation"]["k"],
            },
            "figures": cfg["figures"],
            "collapse": cfg["collapse"],
            "paper_comparison": cfg["paper_comparison"],
        }

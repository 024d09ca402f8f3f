"""run.yaml: the one file that describes a training run; loading, defaults and validation.

Every key a train command understands is in schema.yaml with its type, range and default (no
default means required), checked with the project's one schema validator and error formatter
(cppo.config_schema): unknown keys, wrong types and bad values raise `RunConfigError` naming the
dotted key and, for typos, the closest valid key. `method` is free-form in the schema: its rule
(`method.rule`, registered by cppo.rules or by a module of `imports`) checks its parameters when
the file is loaded, so both train commands (cppo.train, cppo.backends.verl.train) start only
with a method their rule accepts.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cppo import config_schema
from cppo.divergence import DIVERGENCE_KINDS, SAMPLED_TOKEN_MODES, is_topk
from cppo.rules import BoundRule, get_rule

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")


class RunConfigError(ValueError):
    """A run.yaml problem; the message names the offending key."""


def load_schema() -> dict[str, Any]:
    """run_schema.yaml, its name lists taken from their owner (cppo.divergence)."""
    schema = copy.deepcopy(config_schema.load_schema(SCHEMA_PATH))
    div = schema["properties"]["divergence"]["properties"]
    div["kind"]["enum"] = [*DIVERGENCE_KINDS, None]
    div["sampled_token"]["enum"] = [*SAMPLED_TOKEN_MODES, None]
    return schema


SCHEMA = load_schema()


def _floats(instance: Any, schema: dict[str, Any]) -> None:
    """Integers given for `number` keys become floats (1 -> 1.0), as YAML readers expect."""
    node = config_schema.resolve_ref(schema, SCHEMA)
    for key, sub in node.get("properties", {}).items():
        if not isinstance(instance, dict) or key not in instance:
            continue
        sub = config_schema.resolve_ref(sub, SCHEMA)
        value = instance[key]
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        if "number" in types and isinstance(value, int) and not isinstance(value, bool):
            instance[key] = float(value)
        elif isinstance(value, dict):
            _floats(value, sub)


# Keys that were renamed: a clear message instead of "unknown key".
RENAMED = {"save_total_limit": "keep_checkpoints"}


def validate_run_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Check a run config against SCHEMA and return it with every default filled in."""
    if isinstance(raw, dict):
        for old, new in RENAMED.items():
            if old in raw:
                raise RunConfigError(f"run.yaml: '{old}' is now '{new}'")
    if isinstance(raw, dict):
        raw = config_schema.yaml12_numbers(copy.deepcopy(raw), SCHEMA)
    errors = config_schema.schema_errors(raw, SCHEMA)
    if errors:
        raise RunConfigError("run.yaml: " + "; ".join(errors))
    cfg = config_schema.fill_defaults(copy.deepcopy(raw), SCHEMA)
    _floats(cfg, SCHEMA)
    method = cfg["method"]
    sched = cfg["schedule"]
    if sched["minibatch"] * sched["updates_per_iter"] != sched["prompts_per_iter"]:
        raise RunConfigError(
            "run.yaml: 'schedule.prompts_per_iter' must equal schedule.minibatch x "
            f"schedule.updates_per_iter ({sched['prompts_per_iter']} != {sched['minibatch']} x "
            f"{sched['updates_per_iter']})"
        )
    updates = sched["updates_per_iter"]
    if cfg["save_every"] is None:
        # Checkpoints only at iteration boundaries: a resume never has to regenerate a half-used batch.
        cfg["save_every"] = updates * max(1, min(10, sched["iterations"]))
    if cfg["save_every"] < 1 or cfg["save_every"] % updates:
        raise RunConfigError(
            f"run.yaml: 'save_every' ({cfg['save_every']}) must be a positive multiple of "
            f"schedule.updates_per_iter ({updates}) so checkpoints fall on iteration boundaries"
        )
    if cfg["snapshot_dtype"] == "auto":
        # the precision the model runs in: bf16 training keeps bf16 snapshots, an fp32 run
        # (CPU) keeps the exact weights
        cfg["snapshot_dtype"] = "bfloat16" if cfg["bf16"] else "float32"
    val = cfg["validation"]
    if val["every"] and not val["benchmarks"]:
        raise RunConfigError("run.yaml: 'validation.benchmarks' is empty but validation.every > 0")
    if val["max_new_tokens"] is None:
        val["max_new_tokens"] = sched["max_completion_length"]
    if cfg["bf16"] and cfg["use_cpu"]:
        raise RunConfigError(
            "run.yaml: 'bf16' must be false on CPU (use_cpu: true) for deterministic runs"
        )
    if cfg["method_name"] is None:
        cfg["method_name"] = method["rule"]
    if cfg["run_name"] is None:
        cfg["run_name"] = default_run_name(cfg["model"], cfg["method_name"], cfg["seed"])
    divergence_plan(method_rule(cfg), cfg["divergence"])  # the rule accepts its method block
    return cfg


def import_plugins(modules: list[str]) -> None:
    """Import the modules of run.yaml's `imports` (rules registered outside this package, one
    `@register_rule` each), in the process that trains: both train commands call this through
    `method_rule`, and the verl loss in every worker (cppo.backends.verl.loss)."""
    for i, name in enumerate(modules):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise RunConfigError(f"run.yaml: imports[{i}]: cannot import {name!r}: {err}") from err


def method_rule(cfg: Mapping[str, Any]) -> BoundRule:
    """run.yaml's method block bound to its rule (config resolved once), after the plugin
    imports; a rule that refuses the block raises RunConfigError naming it."""
    import_plugins(list(cfg.get("imports") or []))
    method = dict(cfg["method"])
    try:
        return get_rule(method.pop("rule")).bind(method)
    except ValueError as err:
        raise RunConfigError(f"run.yaml: method: {err}") from err


@dataclass(frozen=True)
class DivergencePlan:
    """The per-token divergence D a run computes: the rule's own (fed to it), else run.yaml's
    diagnostic `divergence` (logged only, for rules that read none)."""

    kind: str
    topk: int
    sampled_token: str
    for_rule: bool  # D goes into RuleBatch.divergence
    compute: bool  # D is computed at all

    @property
    def needs_topk(self) -> bool:
        """mu's top-K must be recorded at rollout time and pi's gathered in the loss."""
        return self.compute and is_topk(self.kind)


def divergence_plan(
    rule: BoundRule, diagnostic: Mapping[str, Any] | None = None, all_methods: bool = True
) -> DivergencePlan:
    """Which D to compute: the rule's, or the diagnostic one (`kind`/`topk`/`sampled_token`,
    null = topk_tv / 20 / extra). A diagnostic divergence given for a rule that reads its own
    is refused, even when the two agree: the rule's method block is the one place to set it."""
    given = {k: v for k, v in (diagnostic or {}).items() if v is not None}
    own = rule.divergence
    if own is not None:
        if given:
            raise RunConfigError(
                "run.yaml: 'divergence' is the diagnostic divergence of rules that read none; "
                f"method '{rule.name}' reads its own ({own['kind']}, K={own['topk']}): set it "
                "in the method block"
            )
        return DivergencePlan(**own, for_rule=True, compute=True)
    return DivergencePlan(
        kind=given.get("kind", "topk_tv"),
        topk=given.get("topk", 20),
        sampled_token=given.get("sampled_token", "extra"),
        for_rule=False,
        compute=bool(all_methods),
    )


def with_run_defaults(keys: Mapping[str, Any]) -> dict[str, Any]:
    """Some top-level run.yaml keys with the schema's default filled in for every optional key
    they leave out: what a train command will use (the pipeline's resource check reads it)."""
    return config_schema.fill_defaults(copy.deepcopy(dict(keys)), SCHEMA)


def default_run_name(model: str, method: str, seed: int) -> str:
    """Deterministic run name {model}__{method}__s{seed} (model = last path component)."""
    model_short = Path(model.rstrip("/")).name or model
    return f"{model_short}__{method}__s{seed}"


def load_run_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a run.yaml file."""
    try:
        raw = config_schema.load_yaml(path)
    except config_schema.YamlFileError as err:
        raise RunConfigError(f"run.yaml: {err}") from None
    if raw is None:
        raise RunConfigError(f"run.yaml: {path} is empty")
    return validate_run_config(raw)


def dump_run_config(cfg: dict[str, Any], path: str | Path) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)


def schema_table(schema: dict[str, Any] | None = None, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, default) pairs for documentation; REQUIRED where there is no default."""
    rows: list[tuple[str, str]] = []
    node = config_schema.resolve_ref(schema or SCHEMA, SCHEMA)
    for key, sub in node.get("properties", {}).items():
        sub = config_schema.resolve_ref(sub, SCHEMA)
        if sub.get("type") == "object" and "properties" in sub and key != "method":
            rows.extend(schema_table(sub, f"{prefix}{key}."))
        else:
            rows.append(
                (f"{prefix}{key}", repr(sub["default"]) if "default" in sub else "REQUIRED")
            )
    return rows

"""run.yaml: the one file that describes a training run; loading, defaults and validation.

Every key the trainer understands is listed in `SCHEMA` with its type and default (REQUIRED means
no default). Unknown keys, wrong types and bad values raise `RunConfigError` naming the key
(dotted path) and, for typos, the closest valid key. `method` is free-form (the rule's own
parameters) except that it must name a registered rule in `method.rule`.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cppo.divergence import DIVERGENCE_KINDS, SAMPLED_TOKEN_MODES


class RunConfigError(ValueError):
    """A run.yaml problem; the message names the offending key."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Key:
    types: tuple[type, ...]
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None  # returns an error message or None
    doc: str = ""


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _choice(*options: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {list(options)}"

    return check


def _keep(v: Any) -> str | None:
    ok = v == "all" or (isinstance(v, int) and v > 0)
    return None if ok else "must be a positive number of checkpoints or 'all'"


def _unit_interval(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


INT = (int,)
FLOAT = (float, int)
STR = (str,)
BOOL = (bool,)
OPT_INT = (int, type(None))
OPT_STR = (str, type(None))
OPT_FLOAT = (float, int, type(None))

SCHEMA: dict[str, Any] = {
    "run_name": Key(OPT_STR, None, doc="default {model}__{method}__s{seed}"),
    "method_name": Key(OPT_STR, None, doc="method label for run names; default method.rule"),
    "output_dir": Key(STR, doc="run directory (metrics.jsonl, checkpoints, final/, DONE)"),
    "seed": Key(INT, 0, _non_negative),
    "model": Key(STR, doc="HF model directory or hub id"),
    "model_revision": Key(OPT_STR, None),
    "train_data": Key(STR, doc="JSONL in the DAPO-Math-17k schema"),
    "method": Key((dict,), doc="{rule: <registry name>, ...rule parameters}"),
    # The rule's own divergence comes from the method config (rule defaults otherwise). These keys
    # set the D logged for rules that read none; when given for a rule that reads one, they must
    # agree with it (a mismatch is an error, never a silent override).
    "divergence": {
        "kind": Key(OPT_STR, None, _choice(*DIVERGENCE_KINDS)),
        "topk": Key(OPT_INT, None, _positive),
        "sampled_token": Key(OPT_STR, None, _choice(*SAMPLED_TOKEN_MODES)),
    },
    "anchor": Key(STR, "rollout", _choice("rollout", "recomputed")),
    "schedule": {
        "prompts_per_iter": Key(INT, check=_positive),
        "n": Key(INT, check=_positive),
        "minibatch": Key(INT, check=_positive, doc="prompts per optimizer step"),
        "updates_per_iter": Key(INT, check=_positive),
        "iterations": Key(INT, check=_positive),
        "learning_rate": Key(FLOAT, 1e-6, _positive),
        "warmup_steps": Key(INT, 0, _non_negative, doc="optimizer steps"),
        "max_prompt_length": Key(INT, 1024, _positive, doc="longer prompts are dropped"),
        "max_completion_length": Key(INT, check=_positive),
        "temperature": Key(FLOAT, 1.0, _positive),
        "top_p": Key(FLOAT, 1.0, _unit_interval),
        "top_k": Key(INT, 0, _non_negative, doc="0 = off"),
        "micro_batch": Key(OPT_INT, None, doc="completions per process per forward pass"),
    },
    "validation": {
        "every": Key(INT, 0, _non_negative, doc="optimizer steps; 0 = no in-loop validation"),
        "benchmarks": Key((list,), []),
        "k": Key(INT, 16, _positive),
        "temperature": Key(FLOAT, 0.7, _positive),
        "top_p": Key(FLOAT, 0.95, _unit_interval),
        "max_new_tokens": Key(OPT_INT, None, doc="default schedule.max_completion_length"),
        "batch_size": Key(INT, 64, _positive),
        "seed": Key(INT, 0, _non_negative),
        "at_start": Key(BOOL, True, doc="also validate the initial model (step 0)"),
    },
    "backend": Key(STR, "transformers", _choice("transformers", "vllm")),
    "bf16": Key(BOOL, False),
    "use_cpu": Key(BOOL, True),
    "report_to": Key(STR, "none", _choice("none", "wandb")),
    "save_every": Key(OPT_INT, None, doc="optimizer steps, a multiple of updates_per_iter"),
    # What stays on disk (cppo.training.checkpoints): the newest full checkpoints for a resume,
    # and model-only snapshots at validated steps for the post-hoc evaluation.
    "keep_checkpoints": Key((int, str), 1, _keep, doc="full checkpoints kept, or 'all'"),
    "snapshots": Key(STR, "best", _choice("all", "best", "none"), doc="validated steps kept"),
    "snapshot_dtype": Key(
        STR, "auto", _choice("auto", "float32", "bfloat16"), doc="auto: bfloat16 if bf16"
    ),
    "snapshot_best_within": Key(
        OPT_INT, None, _positive, doc="snapshots: best looks at steps <= this; null = all"
    ),
    "threads": Key(OPT_INT, None),
    "gradient_checkpointing": Key(BOOL, False),
    "cast_lm_head_to_fp32": Key(BOOL, False),
    "router_aux_loss_coef": Key(OPT_FLOAT, None, doc="MoE only; default the model config's"),
    "chat_template_kwargs": Key((dict,), {}),
    "rl": {
        "scale_rewards": Key(STR, "group", _choice("group", "batch", "none")),
        "mask_std_0": Key(BOOL, True, doc="drop zero-variance groups from loss and normaliser"),
        "mask_truncated_completions": Key(BOOL, False),
    },
    "optim": {
        "weight_decay": Key(FLOAT, 0.01, _non_negative),
        "adam_beta1": Key(FLOAT, 0.9),
        "adam_beta2": Key(FLOAT, 0.999),
        "adam_epsilon": Key(FLOAT, 1e-8, _positive),
        "max_grad_norm": Key(FLOAT, 1.0, _non_negative),
        "lr_scheduler": Key(STR, "constant_with_warmup"),
    },
    "vllm": {
        "mode": Key(STR, "colocate", _choice("colocate", "server")),
        "gpu_memory_utilization": Key(FLOAT, 0.35, _unit_interval),
        "tensor_parallel_size": Key(INT, 1, _positive),
        "enable_sleep_mode": Key(BOOL, True),
        "max_model_length": Key(OPT_INT, None),
        "server_base_url": Key(OPT_STR, None),
    },
    "diagnostics": {
        "divergence_all_methods": Key(BOOL, True, doc="record mu's top-K and D for every rule"),
        "deviation_bins": Key(INT, 10, _non_negative, doc="relative-position bins; 0 = off"),
        "mu_chunk_tokens": Key(OPT_INT, None, doc="tokens per top-K logits chunk; default auto"),
    },
    "wandb": {
        "project": Key(STR, "cppo"),
        "mode": Key(STR, "offline", _choice("offline", "online", "disabled")),
        "group": Key(OPT_STR, None),
    },
}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_section(given: Any, schema: dict[str, Any], prefix: str) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise RunConfigError(f"run.yaml: '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    for key in given:
        if key not in schema:
            raise RunConfigError(
                f"run.yaml: unknown key '{prefix}{key}'{_suggest(str(key), list(schema))}; "
                f"valid keys here: {sorted(schema)}"
            )
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict):
            out[key] = _check_section(given.get(key) or {}, spec, path + ".")
            continue
        if key not in given or (given[key] is None and spec.default is not REQUIRED):
            if spec.default is REQUIRED:
                raise RunConfigError(f"run.yaml: missing required key '{path}'")
            out[key] = copy.deepcopy(spec.default)
            continue
        value = given[key]
        if isinstance(value, bool) and bool not in spec.types:
            raise RunConfigError(
                f"run.yaml: '{path}' must be {_type_names(spec.types)}, got {value!r}"
            )
        if not isinstance(value, spec.types):
            raise RunConfigError(
                f"run.yaml: '{path}' must be {_type_names(spec.types)}, got {type(value).__name__} {value!r}"
            )
        if spec.check is not None and value is not None:
            problem = spec.check(value)
            if problem:
                raise RunConfigError(f"run.yaml: '{path}' {problem}, got {value!r}")
        if float in spec.types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def _type_names(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    names.update({dict: "a mapping", list: "a list", type(None): "null"})
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


# Keys that were renamed: a clear message instead of "unknown key".
RENAMED = {"save_total_limit": "keep_checkpoints"}


def validate_run_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Check a run config against SCHEMA and return it with every default filled in."""
    if isinstance(raw, dict):
        for old, new in RENAMED.items():
            if old in raw:
                raise RunConfigError(f"run.yaml: '{old}' is now '{new}'")
    cfg = _check_section(raw, SCHEMA, "")
    method = cfg["method"]
    if not isinstance(method.get("rule"), str) or not method["rule"]:
        raise RunConfigError("run.yaml: 'method.rule' must name a registered rule")
    sched = cfg["schedule"]
    if sched["minibatch"] * sched["updates_per_iter"] != sched["prompts_per_iter"]:
        raise RunConfigError(
            "run.yaml: 'schedule.prompts_per_iter' must equal schedule.minibatch x "
            f"schedule.updates_per_iter ({sched['prompts_per_iter']} != {sched['minibatch']} x "
            f"{sched['updates_per_iter']})"
        )
    if sched["n"] < 2:
        raise RunConfigError("run.yaml: 'schedule.n' must be >= 2 (group-relative advantages)")
    if sched["micro_batch"] is not None and sched["micro_batch"] < 1:
        raise RunConfigError("run.yaml: 'schedule.micro_batch' must be >= 1")
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
    if not all(isinstance(b, str) and b for b in val["benchmarks"]):
        raise RunConfigError("run.yaml: 'validation.benchmarks' must be a list of names or paths")
    if val["max_new_tokens"] is None:
        val["max_new_tokens"] = sched["max_completion_length"]
    if cfg["backend"] == "vllm" and cfg["use_cpu"]:
        raise RunConfigError("run.yaml: 'backend: vllm' needs a GPU; set use_cpu: false")
    if cfg["bf16"] and cfg["use_cpu"]:
        raise RunConfigError(
            "run.yaml: 'bf16' must be false on CPU (use_cpu: true) for deterministic runs"
        )
    if cfg["threads"] is not None and cfg["threads"] < 1:
        raise RunConfigError("run.yaml: 'threads' must be >= 1")
    if cfg["method_name"] is None:
        cfg["method_name"] = method["rule"]
    if cfg["run_name"] is None:
        cfg["run_name"] = default_run_name(cfg["model"], cfg["method_name"], cfg["seed"])
    return cfg


def default_run_name(model: str, method: str, seed: int) -> str:
    """Deterministic run name {model}__{method}__s{seed} (model = last path component)."""
    model_short = Path(model.rstrip("/")).name or model
    return f"{model_short}__{method}__s{seed}"


def load_run_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a run.yaml file."""
    with open(path) as fh:
        raw = yaml.safe_load(fh)
    if raw is None:
        raise RunConfigError(f"run.yaml: {path} is empty")
    return validate_run_config(raw)


def dump_run_config(cfg: dict[str, Any], path: str | Path) -> None:
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)


def schema_table(schema: dict[str, Any] | None = None, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, default) pairs for documentation."""
    rows: list[tuple[str, str]] = []
    for key, spec in (schema or SCHEMA).items():
        if isinstance(spec, dict):
            rows.extend(schema_table(spec, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", repr(spec.default)))
    return rows

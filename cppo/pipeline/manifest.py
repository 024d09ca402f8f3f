"""The manifest (results/<profile>/manifest.json): everything the aggregate, table, figure,
summary and publish steps read about the run matrix, so that they need no workflow config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cppo.pipeline.config import TRUST_REGION_KEYS
from cppo.pipeline.matrix import RunMatrix
from cppo.pipeline.resolve import RunResolver

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


def method_colors(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Each method's colour: its own, else the next palette colour no method claims."""
    taken = {m["color"] for m in methods.values() if m["color"]}
    free = iter(c for c in PALETTE if c not in taken)
    return {name: entry["color"] or next(free, "#444444") for name, entry in methods.items()}


def build_manifest(matrix: RunMatrix, resolver: RunResolver) -> dict[str, Any]:
    cfg = matrix.cfg
    models = {}
    for m in matrix.models:
        entry = cfg["models"][m]
        models[m] = {
            "label": entry["label"],
            "stands_for": entry["stands_for"],
            "seeds": matrix.seeds_of(m),
            "source": entry["source"],
            "updates_per_iter": resolver.updates_per_iter(m),
            "iterations": resolver.schedule(m)["iterations"],
            "t_stop": entry["t_stop"],
            "t_stop_steps": resolver.t_stop_steps(m),
            "trust_region": {
                k: entry["trust_region"][k] for k in TRUST_REGION_KEYS if k in entry["trust_region"]
            },
        }
    colors = method_colors(cfg["methods"])
    methods = {
        name: {
            "label": cfg["methods"][name]["label"],
            "color": colors[name],
            "rule": cfg["methods"][name]["rule"],
            # the diagnostic that says how much the rule binds (the binding table and figure)
            "binding": resolver.bound_rule(matrix.models[0], name).binding,
        }
        for name in matrix.methods
    }
    runs = [{"model": mo, "method": me, "seed": s} for mo, me, s in matrix.runs]
    method_params = {
        mo: {me: resolver.method_params(mo, me) for me in matrix.methods} for mo in matrix.models
    }
    checkpoints = matrix.eval_checkpoints
    return {
        "profile": matrix.profile,
        "title": cfg["report"]["title"],
        "description": cfg["description"],
        "results_dir": matrix.root,
        "seeds": matrix.seeds,
        "models": models,
        "methods": methods,
        "runs": runs,
        "method_params": method_params,
        "benchmarks": {
            b: {"label": cfg["benchmarks"][b]["label"], "path": matrix.benchmark_path(b)}
            for b in matrix.used_benchmarks
        },
        "validation": {
            "benchmarks": cfg["validation"]["benchmarks"],
            "k": cfg["validation"]["k"],
            "every": cfg["validation"]["every"],
        },
        "evaluation": {
            "checkpoints": checkpoints,
            "benchmarks": cfg["evaluation"]["benchmarks"] if checkpoints else [],
            "k": cfg["evaluation"]["k"],
        },
        "figures": cfg["figures"],
        "collapse": cfg["collapse"],
        "paper_comparison": cfg["paper_comparison"],
    }

"""Access to the testbed presets (cppo/toy/presets.yaml): task difficulty, model sizes, SFT."""

from __future__ import annotations

import copy
from functools import cache
from importlib import resources
from typing import Any

import yaml


@cache
def _load() -> dict[str, Any]:
    text = resources.files("cppo.toy").joinpath("presets.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def presets() -> dict[str, Any]:
    """A deep copy of the whole presets file (callers may mutate it)."""
    return copy.deepcopy(_load())


def task_preset(difficulty: str) -> dict[str, Any]:
    tasks = _load()["tasks"]
    if difficulty not in tasks:
        raise KeyError(f"unknown difficulty {difficulty!r}; choose one of {sorted(tasks)}")
    return dict(tasks[difficulty])


def model_preset(name: str) -> dict[str, Any]:
    models = _load()["models"]
    if name not in models:
        raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(models)}")
    return dict(models[name])


def model_preset_names() -> list[str]:
    return sorted(_load()["models"])


def warm_start_phases(
    flavour: str, preset: str | None = None, overrides: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The SFT phases of a flavour: each is defaults + the phase's keys + the per-model
    override (`overrides.<preset>.<flavour>`) + the caller's overrides. An override with a
    "phases" list replaces the flavour's phases."""
    ws = _load()["warm_start"]
    if flavour not in ws["flavours"]:
        raise KeyError(f"unknown flavour {flavour!r}; choose one of {sorted(ws['flavours'])}")
    fl = ws["flavours"][flavour]
    phases = fl.get("phases", [fl])
    extra = dict((ws.get("overrides") or {}).get(preset, {}).get(flavour, {}))
    extra.update(overrides or {})
    phases = extra.pop("phases", phases)
    return [{**ws["defaults"], **p, **extra} for p in phases]


def flavour_names() -> list[str]:
    return sorted(_load()["warm_start"]["flavours"])


def data_defaults() -> dict[str, Any]:
    return dict(_load()["data"])

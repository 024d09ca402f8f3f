"""The run matrix of a validated workflow config and where each of its files lives.

Models x methods x seeds, the data, model and benchmark files they need, and every path under
results/<profile>/, relative to the workflow's working directory (the repository root by
default). Nothing here resolves a run's settings (cppo.pipeline.resolve) or says how a job runs
(cppo.pipeline.commands).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cppo.pipeline import layout


class RunMatrix:
    """The runs of one config and the paths of everything they read and write."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
        self.profile: str = cfg["profile"]
        self.root = f"results/{self.profile}"

    # --- matrix -------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self.cfg["run"]["models"])

    @property
    def methods(self) -> list[str]:
        return list(self.cfg["run"]["methods"])

    def seeds_of(self, model: str) -> list[int]:
        """The model's (column's) seeds: its own `seeds`, else the top-level ones."""
        return list(self.cfg["models"][model].get("seeds") or self.cfg["seeds"])

    @property
    def seeds(self) -> list[int]:
        """Every seed of some column."""
        return sorted({s for mo in self.models for s in self.seeds_of(mo)})

    @property
    def runs(self) -> list[tuple[str, str, int]]:
        return [(mo, me, s) for mo in self.models for me in self.methods for s in self.seeds_of(mo)]

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

    def initial_model(self, model: str) -> tuple[str, str | None]:
        """(path or hub id, revision) of the model a run starts from (its step-0 checkpoint)."""
        entry = self.cfg["models"][model]
        if entry["source"] == "toy":
            return self.model_dir(model), None
        return entry["hub"]["id"], entry["hub"]["revision"]

    # --- per-run paths ------------------------------------------------------------------------
    def config_path(self, model: str, method: str, seed: int | str) -> str:
        return layout.config_path(self.root, model, method, seed)

    def run_dir(self, model: str, method: str, seed: int | str) -> str:
        return layout.run_dir(self.root, model, method, seed)

    def done_path(self, model: str, method: str, seed: int | str) -> str:
        return f"{self.run_dir(model, method, seed)}/DONE"

    def selection_path(self, model: str, method: str, seed: int | str) -> str:
        return layout.selection_path(self.root, model, method, seed)

    @property
    def eval_checkpoints(self) -> list[str]:
        ev = self.cfg["evaluation"]
        return list(ev["checkpoints"]) if ev["enabled"] else []

    def eval_summaries(self, model: str, method: str, seed: int | str, ckpt: str) -> list[str]:
        return [
            layout.eval_summary(self.root, model, method, seed, ckpt, b)
            for b in self.cfg["evaluation"]["benchmarks"]
        ]

    @property
    def manifest_path(self) -> str:
        return self.path("manifest.json")

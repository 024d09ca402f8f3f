"""Where things live under results/<profile>/ (shared by the job matrix and the readers)."""

from __future__ import annotations

from typing import Any


def run_dir(root: str, model: str, method: str, seed: int | str) -> str:
    return f"{root}/runs/{model}/{method}/seed{seed}"


def config_path(root: str, model: str, method: str, seed: int | str) -> str:
    return f"{root}/configs/{model}/{method}/seed{seed}.yaml"


def selection_path(root: str, model: str, method: str, seed: int | str) -> str:
    return f"{root}/selection/{model}/{method}/seed{seed}.json"


def eval_dir(root: str, model: str, method: str, seed: int | str, ckpt: str) -> str:
    return f"{root}/eval/{model}/{method}/seed{seed}/{ckpt}"


def eval_summary(root: str, model: str, method: str, seed: int | str, ckpt: str, bench: str) -> str:
    return f"{eval_dir(root, model, method, seed, ckpt)}/{bench}.summary.json"


def seeds_of(manifest: dict[str, Any], model: str) -> list[int]:
    """A column's seeds (a manifest written before per-column seeds: the top-level list)."""
    return [int(s) for s in manifest["models"][model].get("seeds", manifest["seeds"])]


def expand_runs(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's runs with their paths and resolved method parameters filled in."""
    root = manifest["results_dir"]
    ev = manifest["evaluation"]
    out = []
    for run in manifest["runs"]:
        mo, me, s = run["model"], run["method"], run["seed"]
        out.append(
            {
                "model": mo,
                "method": me,
                "seed": s,
                "run_dir": run_dir(root, mo, me, s),
                "config": config_path(root, mo, me, s),
                "selection": selection_path(root, mo, me, s),
                "method_params": manifest["method_params"][mo][me],
                "eval": {
                    ckpt: {b: eval_summary(root, mo, me, s, ckpt, b) for b in ev["benchmarks"]}
                    for ckpt in ev["checkpoints"]
                },
            }
        )
    return out

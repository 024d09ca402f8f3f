"""Publishing a results directory to Weights & Biases (off by default).

One wandb run per results profile holds the tables (as wandb Tables), the figures (as images)
and the validation curves (one line-series chart per model, one line per method and seed).
Authentication is wandb's own (`wandb login` or WANDB_API_KEY); mode "offline" writes a local
run that `wandb sync` can upload later, and mode "auto" (the default) is online once wandb has
credentials and offline before, saying which.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd


def wandb_credentials() -> bool:
    """Whether wandb can authenticate: WANDB_API_KEY, or the ~/.netrc entry `wandb login`
    writes for the host of WANDB_BASE_URL (default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """online / offline as asked; auto: WANDB_MODE when set, else online with credentials."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline"):
        return os.environ["WANDB_MODE"]
    chosen = "online" if wandb_credentials() else "offline"
    why = "wandb has credentials" if chosen == "online" else "no wandb credentials (wandb login)"
    print(f"publish: mode auto -> {chosen} ({why})", file=sys.stderr)
    return chosen


def publish(
    manifest: dict[str, Any],
    tables: dict[str, Path],
    figures: dict[str, Path],
    *,
    project: str,
    entity: str | None,
    mode: str,
    tags: list[str],
    out: str | Path,
    wandb_dir: str | Path | None = None,
) -> dict[str, Any]:
    import wandb

    mode = resolve_mode(mode)
    run = wandb.init(
        project=project,
        entity=entity,
        mode=mode,
        name=f"{manifest['profile']}-summary",
        job_type="pipeline-summary",
        tags=list(tags),
        dir=str(wandb_dir) if wandb_dir else None,
        config={
            "profile": manifest["profile"],
            "seeds": manifest["seeds"],
            "models": {
                k: {kk: v[kk] for kk in ("label", "t_stop", "updates_per_iter")}
                for k, v in manifest["models"].items()
            },
            "methods": manifest["methods"],
        },
    )
    try:
        for name, path in tables.items():
            df = pd.read_csv(path)
            run.log({f"tables/{name}": wandb.Table(dataframe=df)})
        for name, path in figures.items():
            run.log({f"figures/{name}": wandb.Image(str(path))})
        long_path = tables.get("validation_long")
        if long_path is not None:
            df = pd.read_csv(long_path)
            df = df[df["benchmark"] == "mean"]
            for model, group in df.groupby("model", sort=False):
                upi = manifest["models"][model]["updates_per_iter"]
                xs, ys, keys = [], [], []
                for (method, seed), g in group.groupby(["method", "seed"], sort=False):
                    g = g.sort_values("step")
                    xs.append((g["step"] / upi).tolist())
                    ys.append(g["value"].tolist())
                    keys.append(f"{manifest['methods'][method]['label']} s{seed}")
                chart = wandb.plot.line_series(
                    xs=xs,
                    ys=ys,
                    keys=keys,
                    title=f"{model}: validation mean (%)",
                    xname="iteration",
                )
                run.log({f"curves/{model}": chart})
        info = {
            "mode": mode,
            "project": project,
            "entity": entity,
            "id": run.id,
            "url": getattr(run, "url", None),
            # relative to the working directory (the workflow's): the results travel
            "dir": os.path.relpath(run.dir),
        }
    finally:
        run.finish()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(info, indent=2) + "\n")
    return info

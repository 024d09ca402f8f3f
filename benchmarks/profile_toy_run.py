"""Where the time of one training run goes: a wall-clock profile by part.

Runs `python -m cppo.train` in this process with timers around the trainer's parts and prints
one table (seconds and share of the wall time):

- start-up: the imports of the training stack;
- rollout generation (TRL's generate), mu recording and rewards (the rest of scoring a batch);
- updates: loss forward and backward (the optimizer step is in "other");
- in-loop validation; checkpoint saving; the remainder (model and data loading, optimizer
  steps, logging, callbacks).

    python benchmarks/profile_toy_run.py --config run.yaml [--out profile.json]

The run directory of the config must not exist yet (a resumed run would skip work).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

STARTED = time.perf_counter()
TOTALS: dict[str, float] = defaultdict(float)
_ACTIVE: list[str] = []


@contextmanager
def timed(part: str):
    """Time a part, excluding the nested parts timed inside it."""
    t0 = time.perf_counter()
    _ACTIVE.append(part)
    try:
        yield
    finally:
        _ACTIVE.pop()
        dt = time.perf_counter() - t0
        TOTALS[part] += dt
        if _ACTIVE:
            TOTALS[_ACTIVE[-1]] -= dt


def wrap(cls: type, name: str, part: str) -> None:
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        with timed(part):
            return original(self, *args, **kwargs)

    setattr(cls, name, wrapper)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", default=None, help="write the table as JSON here too")
    ns = parser.parse_args()

    from transformers import Trainer
    from trl import GRPOTrainer

    from cppo.run.config import load_run_config
    from cppo.training.trainer import CPPOTrainer
    from cppo.training.validation_callback import InLoopValidation

    cfg = load_run_config(ns.config)
    if Path(cfg["output_dir"]).exists():
        raise SystemExit(f"{cfg['output_dir']} exists: profile a fresh run directory")
    # outermost first: each part excludes what the parts nested in it take
    wrap(Trainer, "training_step", "updates (forward, backward)")
    wrap(CPPOTrainer, "_generate_and_score_completions", "mu recording and rewards")
    wrap(GRPOTrainer, "_generate", "rollout generation")
    wrap(InLoopValidation, "run", "in-loop validation")
    wrap(Trainer, "_save_checkpoint", "checkpoints")

    from cppo.training.run import run_training

    setup = time.perf_counter()
    run_training(cfg, progress=False)
    wall = time.perf_counter() - STARTED
    parts = {"start-up (imports before the run)": setup - STARTED, **TOTALS}
    parts["other (data, logging, model load)"] = wall - sum(parts.values())
    rows = {k: round(v, 2) for k, v in parts.items()}
    width = max(map(len, rows))
    print(f"{'part':<{width}}  seconds  share")
    for k, v in rows.items():
        print(f"{k:<{width}}  {v:7.1f}  {100 * v / wall:4.0f}%")
    print(f"{'wall':<{width}}  {wall:7.1f}")
    if ns.out:
        Path(ns.out).write_text(json.dumps({"parts": rows, "wall": round(wall, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

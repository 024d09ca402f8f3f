"""Where the time of one training run goes: wall-clock and process CPU time by part.

Runs `python -m cppo.train` in this process with timers around the trainer's parts and prints
one table (wall seconds, CPU seconds, share of the CPU time):

- start-up: the imports of the training stack;
- rollout generation (TRL's generate: transformers' generate or the KV-cache loop), mu
  recording and rewards (the rest of scoring a batch);
- loss forward (pi's log-probs); backward and the rest of a training step;
- in-loop validation; checkpoint saving; the remainder (model and data loading, optimizer
  steps, logging, callbacks).

    python benchmarks/profile_toy_run.py --config run.yaml [--set transformers.sampler=generate]
        [--out profile.json]

`--set key.path=value` overrides a run.yaml key (YAML value), e.g. to profile main's engine
(`transformers.sampler=generate`, `transformers.loss_layout=padded`) beside the default on
the same config. Compare CPU time when the machine is shared: wall time then measures the
neighbours. The run directory of the config must not exist yet (a resumed run would skip work).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

STARTED = (time.perf_counter(), time.process_time())
WALL: dict[str, float] = defaultdict(float)
CPU: dict[str, float] = defaultdict(float)
_ACTIVE: list[str] = []


@contextmanager
def timed(part: str):
    """Time a part, excluding the nested parts timed inside it."""
    w0, c0 = time.perf_counter(), time.process_time()
    _ACTIVE.append(part)
    try:
        yield
    finally:
        _ACTIVE.pop()
        dw, dc = time.perf_counter() - w0, time.process_time() - c0
        WALL[part] += dw
        CPU[part] += dc
        if _ACTIVE:
            WALL[_ACTIVE[-1]] -= dw
            CPU[_ACTIVE[-1]] -= dc


def set_key(cfg: dict, assignment: str) -> None:
    import yaml

    path, _, value = assignment.partition("=")
    *parents, leaf = path.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = yaml.safe_load(value)


def wrap(cls: type, name: str, part: str) -> None:
    original = getattr(cls, name, None)
    if original is None:  # an older tree: the part stays in the one around it
        print(f"note: {cls.__name__}.{name} not found, not timed apart", file=sys.stderr)
        return

    def wrapper(self, *args, **kwargs):
        with timed(part):
            return original(self, *args, **kwargs)

    setattr(cls, name, wrapper)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], help="key.path=value")
    parser.add_argument("--out", default=None, help="write the table as JSON here too")
    ns = parser.parse_args()

    from transformers import Trainer
    from trl import GRPOTrainer

    from cppo import config_schema
    from cppo.run.config import validate_run_config
    from cppo.training.trainer import CPPOTrainer
    from cppo.training.validation_callback import InLoopValidation

    raw = config_schema.load_yaml(ns.config)
    for assignment in ns.set:
        set_key(raw, assignment)
    cfg = validate_run_config(raw)
    if Path(cfg["output_dir"]).exists():
        raise SystemExit(f"{cfg['output_dir']} exists: profile a fresh run directory")
    # outermost first: each part excludes what the parts nested in it take
    wrap(Trainer, "training_step", "backward, optimizer glue")
    wrap(CPPOTrainer, "_policy_logps", "loss forward")
    wrap(CPPOTrainer, "_generate_and_score_completions", "mu recording and rewards")
    wrap(GRPOTrainer, "_generate", "rollout generation")
    wrap(InLoopValidation, "run", "in-loop validation")
    wrap(Trainer, "_save_checkpoint", "checkpoints")

    from cppo.training.run import run_training

    setup = (time.perf_counter(), time.process_time())
    run_training(cfg, progress=False)
    total = (time.perf_counter() - STARTED[0], time.process_time() - STARTED[1])
    start_up = "start-up (imports before the run)"
    WALL[start_up], CPU[start_up] = setup[0] - STARTED[0], setup[1] - STARTED[1]
    other = "other (data, logging, model load, optimizer)"
    WALL[other] = total[0] - sum(WALL.values())
    CPU[other] = total[1] - sum(CPU.values())
    rows = {k: {"wall": round(WALL[k], 2), "cpu": round(CPU[k], 2)} for k in WALL}
    width = max(map(len, rows))
    print(f"{'part':<{width}}  wall s   CPU s  CPU share")
    for k, v in rows.items():
        print(f"{k:<{width}}  {v['wall']:6.1f}  {v['cpu']:6.1f}  {100 * v['cpu'] / total[1]:5.0f}%")
    print(f"{'total':<{width}}  {total[0]:6.1f}  {total[1]:6.1f}")
    if ns.out:
        out = {"parts": rows, "wall": round(total[0], 2), "cpu": round(total[1], 2), "set": ns.set}
        Path(ns.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

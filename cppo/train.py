"""Train one {model, method, seed}: `python -m cppo.train --config run.yaml` (console script cppo-train).

On a GPU node: `accelerate launch --config_file config/accelerate/zero3.yaml -m cppo.train --config run.yaml`.
Re-running the same command resumes from the run directory's last checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cppo.run.config import RunConfigError, load_run_config, schema_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cppo-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run.yaml")
    parser.add_argument(
        "--print-schema", action="store_true", help="list every run.yaml key and default"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ns = parser.parse_args(argv)
    if ns.print_schema:
        for key, default in schema_table():
            print(f"{key}: {default}")
        return 0
    if not ns.config:
        parser.error("--config is required")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(ns.config)
    except (RunConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from cppo.hub import ModelNotCachedError
    from cppo.run.directory import RunIntegrityError
    from cppo.training.run import run_training

    try:
        run_dir = run_training(cfg, progress=not ns.no_progress)
    except (RunConfigError, ModelNotCachedError, RunIntegrityError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

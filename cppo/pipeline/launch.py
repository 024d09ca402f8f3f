"""Run a module as a program after importing plugin modules in the same process.

    python -m cppo.pipeline.launch --import my_pkg.my_rule [--import ...] -- cppo.train --config run.yaml

A method defined outside the cppo package registers its rule when its module is imported
(`@cppo.rules.register_rule("name")`); this puts the import inside the trainer's own process
(also under `accelerate launch -m cppo.pipeline.launch ...`), so the trainer needs no edit.
"""

from __future__ import annotations

import argparse
import importlib
import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: launch [--import MODULE]... -- MODULE [ARGS...]")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m cppo.pipeline.launch")
    parser.add_argument("--import", dest="imports", action="append", default=[])
    opts = parser.parse_args(argv[:split])
    target, *rest = argv[split + 1 :] or [""]
    if not target:
        raise SystemExit("launch: no module to run after '--'")
    for name in opts.imports:
        importlib.import_module(name)
    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

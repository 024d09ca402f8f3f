"""Wall time of Snakemake dry runs (`snakemake -n -q`) of the shipped configs.

A dry run is what a user waits for before every real run (DAG, config validation, rule
probes, resource check); the paper config builds the largest DAG. Each config runs `--repeat`
times in a fresh working directory; the table gives every time and the median.

    python benchmarks/bench_dry_run.py [--configs paper toy] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run_seconds(config: Path) -> float:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", work]
        start = time.perf_counter()
        proc = subprocess.run(
            [*cmd, "-n", "-q", "--configfile", str(config)],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=900,
        )
        elapsed = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"dry run of {config} failed:\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["paper", "toy"])
    parser.add_argument("--repeat", type=int, default=3)
    ns = parser.parse_args()
    print(f"{'config':<10} {'median s':>9}  runs")
    for name in ns.configs:
        times = [dry_run_seconds(ROOT / "config" / f"{name}.yaml") for _ in range(ns.repeat)]
        runs = " ".join(f"{t:.1f}" for t in times)
        print(f"{name:<10} {statistics.median(times):9.1f}  {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

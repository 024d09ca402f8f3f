"""Running the Snakemake workflow from tests (in a temporary working directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
FAKES = {
    "commands": {
        "toy": {"launcher": "python -m", "module": "pipeline_fakes.toy"},
        "train": {"launcher": "python -m", "module": "pipeline_fakes.train"},
        "evaluate": {"launcher": "python -m", "module": "pipeline_fakes.evaluate"},
    }
}


def env(*pythonpath: str | Path, **extra: str) -> dict[str, str]:
    """The test's environment with this interpreter first on PATH (jobs call `python`)."""
    out = dict(os.environ)
    out["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), out.get("PATH", "")])
    paths = [str(p) for p in pythonpath] + [str(ROOT / "tests")]
    if out.get("PYTHONPATH"):
        paths.append(out["PYTHONPATH"])
    out["PYTHONPATH"] = os.pathsep.join(paths)
    out.setdefault("OMP_NUM_THREADS", "1")
    out.update(extra)
    return out


def snakemake(
    workdir: Path,
    *args: str,
    configfiles: list[str | Path] = (),
    environ: dict[str, str] | None = None,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args]
    if configfiles:
        cmd += ["--configfile", *map(str, configfiles)]
    return subprocess.run(
        cmd,
        cwd=workdir,
        env=environ or env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    stats = output.split("Job stats:", 1)[1]
    counts = {}
    for line in stats.splitlines()[3:]:
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    return counts

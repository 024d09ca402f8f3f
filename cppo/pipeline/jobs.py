"""Small job bodies behind the Snakemake rules (each is one `python -m cppo.pipeline` command)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

STATE_MARKER = "pipeline_run.yaml"


class _TreeDumper(yaml.SafeDumper):
    """yaml.safe_dump without anchors: a value that two keys share (a config's YAML alias) is
    written out at both, so a run.yaml reads as plain keys and values."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def yaml_text(data: Any) -> str:
    """`data` as YAML, keys in their order (run.yaml: the order of Plan.resolver.run_config)."""
    return yaml.dump(data, Dumper=_TreeDumper, sort_keys=False)


def write_yaml(data: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml_text(data))


def write_json(data: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def log(msg: str) -> None:
    print(f"[cppo.pipeline] {msg}", file=sys.stderr, flush=True)


# --- training --------------------------------------------------------------------------------


def prepare_state_dir(run_config: str | Path, state_dir: str | Path) -> str:
    """Make the trainer's state directory ready for a (re)start; returns what was done.

    The state directory is not a Snakemake output, so a failed or killed job leaves it (and its
    checkpoints) in place and the trainer resumes on the next run. If the run config changed
    since the state was made, resuming would mix two experiments: the old state is moved aside
    to <state_dir>.stale-<UTC time> and training starts fresh.
    """
    state = Path(state_dir)
    text = Path(run_config).read_text()
    marker = state / STATE_MARKER
    action = "fresh"
    if state.exists() and any(state.iterdir()):
        if marker.exists() and marker.read_text() != text:
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
            stale = state.with_name(f"{state.name}.stale-{stamp}")
            shutil.move(str(state), str(stale))
            action = f"config changed: moved the old state to {stale}"
        else:
            action = "resume"
    state.mkdir(parents=True, exist_ok=True)
    marker.write_text(text)
    (state / "DONE").unlink(missing_ok=True)
    return action


ATTEMPTS_LOG = "pipeline_attempts.log"


def train_job(run_config: str, state_dir: str, command: list[str]) -> int:
    """Start or resume one training run: `<command> --config <run_config>`.

    Every attempt is appended to <state_dir>/pipeline_attempts.log, which outlives the job's
    Snakemake log (Snakemake truncates that one when the job is rerun).
    """
    action = prepare_state_dir(run_config, state_dir)
    log(f"{state_dir}: {action}")
    cmd = [*command, "--config", run_config]
    log("running: " + " ".join(cmd))
    attempts = Path(state_dir) / ATTEMPTS_LOG

    def record(event: str) -> None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        with attempts.open("a") as fh:
            fh.write(f"{stamp} {event}\n")

    record(f"start ({action})")
    code = subprocess.call(cmd)
    record(f"exit {code}")
    if code != 0:
        log(f"trainer exited with {code}; the state in {state_dir} is kept for a resume")
        return code
    if not (Path(state_dir) / "DONE").exists():
        log(f"trainer exited 0 but wrote no {state_dir}/DONE")
        return 1
    return 0


class TermHandler:
    """SIGTERM to Snakemake, as a user or a scheduler sends it, stops the local jobs now.

    Snakemake's own handling of SIGTERM waits for every running job (a training may take hours)
    and then reports "At least one job did not complete successfully" although none failed.
    Installed from the workflow's `onstart` (after Snakemake has installed its handler, which
    it still calls so that no new job starts), this sends SIGTERM to the job processes first: a
    training stops within seconds and resumes from its last checkpoint on the next invocation.
    `explain()`, from `onerror`, says so in place of the misleading final line.
    """

    def __init__(self) -> None:
        self.received = False
        self.stopped = 0

    def install(self) -> None:
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            self.received = True
            self.stopped = stop_descendants()
            log(f"SIGTERM: stopping {self.stopped} job processes; no new job starts")
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_term)

    def explain(self) -> None:
        if self.received:
            log(
                f"stopped on SIGTERM ({self.stopped} job processes ended): no job failed. Rerun "
                "the same command to continue; training jobs resume from their last checkpoint"
            )


def descendants(pid: int) -> list[int]:
    """Every descendant of process `pid`, from Linux's /proc (empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_descendants() -> int:
    """SIGTERM to every descendant process of this one; returns how many there were."""
    pids = descendants(os.getpid())
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return len(pids)


# --- checks and small data steps -------------------------------------------------------------


def _row_dict(row: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(row) and not isinstance(row, type):
        return dataclasses.asdict(row)
    return dict(row)


def export_benchmark(name: str, out: str | Path) -> int:
    """Write the evaluation package's copy of a benchmark to a JSONL (id, problem, answer...)."""
    from evaluation.benchmarks import load_benchmark

    bench = load_benchmark(name)
    rows = [_row_dict(r) for r in bench.rows]
    for i, row in enumerate(rows):
        missing = {"id", "problem", "answer"} - set(row)
        if missing:
            raise ValueError(f"{name} row {i}: missing {sorted(missing)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def prefetch_model(hub_id: str, revision: str, out: str | Path) -> dict[str, Any]:
    """Put a hub model at a pinned commit into the HF cache; record where it is.

    The train job does not read this marker: the trainer finds the snapshot with the same
    local-only look-up (cppo.hub.cached_snapshot), so a compute node needs the same HF_HOME /
    HF_HUB_CACHE and no network. That look-up is run here too, so a marker exists only for a
    snapshot the trainer will find. An already complete snapshot is not downloaded again.
    """
    from cppo.hub import ModelNotCachedError, cached_snapshot, download_snapshot, hub_cache_dir

    try:
        path = cached_snapshot(hub_id, revision)
    except ModelNotCachedError:
        download_snapshot(hub_id, revision)
        path = cached_snapshot(hub_id, revision)
    if path.name != revision:
        raise ValueError(
            f"{hub_id}: revision {revision} resolved to snapshot {path.name}; pin the 40-hex commit"
        )
    info = {
        "id": hub_id,
        "revision": revision,
        "commit": path.name,
        "path": str(path),
        "hub_cache": str(hub_cache_dir()),
    }
    write_json(info, out)
    return info


def evaluate_run(
    selection: str | Path, checkpoints: list[str], out_root: str | Path, command: list[str]
) -> int:
    """Post-hoc evaluation of a run's selected checkpoints: `<command> --model PATH
    [--revision REV] --model-name NAME --out <out_root>/<checkpoint>` for each one.

    A checkpoint at the same step as one already evaluated (best == final when a run peaks at
    its last validation) holds the same weights: its outputs are copied, not recomputed.
    """
    data = json.loads(Path(selection).read_text())
    out_root = Path(out_root)
    done: dict[tuple, Path] = {}
    for ckpt in checkpoints:
        if ckpt not in ("best", "final"):
            raise ValueError(f"checkpoint must be best or final, not {ckpt!r}")
        entry = data[ckpt]
        out = out_root / ckpt
        key = (entry["step"], entry.get("revision"))
        if key in done:
            log(f"{ckpt}: step {entry['step']} is {done[key].name}'s checkpoint; copying")
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(done[key], out)
            for summary in out.glob("*.summary.json"):  # say which checkpoint this copy is
                data_s = json.loads(summary.read_text())
                data_s["model"] = f"{data.get('run_dir', '')}:{ckpt}"
                data_s["copied_from"] = done[key].name
                summary.write_text(json.dumps(data_s, indent=2) + "\n")
            continue
        cmd = [*command, "--model", entry["path"]]
        if entry.get("revision"):
            cmd += ["--revision", entry["revision"]]
        cmd += ["--model-name", f"{data.get('run_dir', '')}:{ckpt}", "--out", str(out)]
        log("running: " + " ".join(cmd))
        code = _run_evaluation(cmd)
        if code != 0:
            return code
        done[key] = out
    return 0


# the default evaluate command (config `commands.evaluate`): this interpreter's own package
EVALUATION_CLI = ["python", "-m", "evaluation"]


def _run_evaluation(cmd: list[str]) -> int:
    """The default evaluation command runs in this process (its imports, ~5 s of a toy
    evaluation, are paid once per run instead of once per checkpoint); any other command (e.g.
    a launcher pointing at another environment) as a subprocess."""
    if cmd[: len(EVALUATION_CLI)] != EVALUATION_CLI:
        return subprocess.call(cmd)
    from evaluation.cli import main

    try:
        return int(main(cmd[len(EVALUATION_CLI) :]) or 0)
    except SystemExit as stop:  # argparse errors
        return stop.code if isinstance(stop.code, int) else 1

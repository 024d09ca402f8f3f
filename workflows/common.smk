# Shared state for the workflow files: the validated config and the job matrix
# (cppo.pipeline.plan.Plan: PLAN.matrix for runs and paths, PLAN.resolver for run settings,
# PLAN.commands for command lines and resources) plus small helpers. Kept free of rules on purpose.
import re
import sys

from snakemake.exceptions import WorkflowError

from cppo.pipeline.aggregate import output_csvs
from cppo.pipeline.commands import format_cli_args
from cppo.pipeline.config import ConfigError
from cppo.pipeline.figures import figure_specs
from cppo.pipeline.jobs import TermHandler, write_json, yaml_text
from cppo.pipeline.plan import Plan
from cppo.pipeline.resources import check as resource_check
from cppo.pipeline.resources import format_report
from cppo.pipeline.tables import TABLES, table_names
from cppo.run.directory import integrity_problems

try:
    PLAN = Plan(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

# Per-GPU memory, GPU-hours and disk of the GPU training jobs (cppo.pipeline.resources): a
# config that cannot fit stops here, before anything is submitted; the table is printed once,
# by the main process (dry runs included), not by every job.
RESOURCES = resource_check(PLAN, workflow.basedir)
if RESOURCES.rows and workflow.is_main_process:
    print(format_report(RESOURCES), file=sys.stderr)
if not RESOURCES.ok:
    raise WorkflowError(str(ConfigError(RESOURCES.errors))) from None

R = PLAN.matrix.root
PIPE = "python -m cppo.pipeline"

# A finished run whose directory does not hold what its DONE marker says (a truncated or torn
# metrics.jsonl, no final/) is named here, dry runs included; its select job refuses it.
if workflow.is_main_process:
    for _run in PLAN.matrix.runs:
        for _problem in integrity_problems(PLAN.matrix.run_dir(*_run)):
            print(
                f"DAMAGED RUN {PLAN.matrix.run_dir(*_run)}: {_problem}; move or delete the "
                "directory to train it again",
                file=sys.stderr,
            )

# What the aggregate, plot and report steps read, and the tables and figures they make, named
# by their owners (cppo.pipeline.tables.TABLES, cppo.pipeline.figures.figure_specs).
MANIFEST = PLAN.manifest()
TABLE_NAMES = table_names(MANIFEST)
FIGURES = figure_specs(MANIFEST)
FIGURE_NAMES = list(FIGURES)
AGGREGATE_CSVS = output_csvs(MANIFEST)


def alternatives(names):
    """A wildcard constraint matching exactly one of `names`."""
    return "|".join(re.escape(str(n)) for n in names) or "(?!)"


wildcard_constraints:
    model=alternatives(PLAN.matrix.models),
    method=alternatives(PLAN.matrix.methods),
    seed=r"\d+",


def run_done(w):
    return PLAN.matrix.done_path(w.model, w.method, w.seed)


def all_done():
    return [PLAN.matrix.done_path(*run) for run in PLAN.matrix.runs]


def all_selections():
    if not PLAN.matrix.eval_checkpoints:
        return []
    return [PLAN.matrix.selection_path(*run) for run in PLAN.matrix.runs]


def all_eval_summaries():
    return [
        path
        for run in PLAN.matrix.runs
        for ckpt in PLAN.matrix.eval_checkpoints
        for path in PLAN.matrix.eval_summaries(*run, ckpt)
    ]


def benchmark_files(names):
    return [PLAN.matrix.benchmark_path(b) for b in names]


def res(step, key):
    """A resource of a per-model step (train, evaluate) as an input function of the wildcards;
    None leaves the resource out (e.g. `nodes` of a single-node job)."""
    return lambda w: PLAN.commands.snakemake_resources(step, w.model)[key]


def format_dapo_args(dapo):
    """Options of `python -m cppo.pipeline dapo` from the data.dapo_math_17k block."""
    if dapo.get("local_file"):
        opts = {"source-file": dapo["local_file"], "sha256": dapo.get("sha256")}
    else:
        opts = {
            "hub-id": dapo["hub_id"],
            "revision": dapo["revision"],
            "filename": dapo["filename"],
            "sha256": dapo.get("sha256"),
        }
    opts["dedupe"] = dapo.get("dedupe", "prompt")
    return format_cli_args(opts)


def initial_model_args(model):
    """--initial-model [--initial-revision] of `cppo.pipeline select` (the step-0 model)."""
    path, revision = PLAN.matrix.initial_model(model)
    args = f"--initial-model {path}"
    return f"{args} --initial-revision {revision}" if revision else args


TABLE_EXTS = ["csv", "md", "tex", "html"]
FIG_EXTS = ["png", "pdf"]


def wandb_args(wb):
    """Options of `python -m cppo.pipeline publish` from publish.wandb."""
    args = format_cli_args({"project": wb["project"], "entity": wb["entity"], "mode": wb["mode"]})
    return " ".join([args, *(format_cli_args({"tag": t}) for t in wb["tags"])])

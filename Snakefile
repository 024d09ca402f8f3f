# CPPO reproduction pipeline. Toy scale on CPU by default:
#   snakemake --cores all
# Paper scale on a SLURM cluster:
#   snakemake --profile profiles/slurm --configfile config/paper.yaml
# The rules are thin: the logic lives in cppo.pipeline (python -m cppo.pipeline ...) and in the
# packages it calls (cppo.toy, cppo.train, evaluation).
import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# The repository's packages must be importable here (config checks) and in every job, also
# when jobs run in the conda envs of envs/, which hold only the third-party dependencies.
sys.path.insert(0, workflow.basedir)
os.environ.update(
    PYTHONPATH=os.pathsep.join(p for p in (workflow.basedir, os.environ.get("PYTHONPATH")) if p)
)

# --configfile replaces the default instead of being merged into it (Snakemake would merge),
# so `--configfile config/paper.yaml` never inherits toy entries.
if not workflow.overwrite_configfiles:

    configfile: os.path.join(workflow.basedir, "config", "toy.yaml")


report: "workflows/report/workflow.rst"


include: "workflows/common.smk"
include: "workflows/data.smk"
include: "workflows/model.smk"
include: "workflows/train.smk"
include: "workflows/evaluate.smk"
include: "workflows/aggregate.smk"
include: "workflows/plot.smk"
include: "workflows/report.smk"


localrules:
    all,


# SIGTERM stops the running jobs at once (training resumes from its last checkpoint) instead of
# Snakemake's wait for every running job; the message on exit says that no job failed.
TERM = TermHandler()


onstart:
    TERM.install()


onerror:
    TERM.explain()


# Included files cannot set the default target, so it lives here: every table and figure,
# the Markdown summary, and the wandb publication when it is enabled.
rule all:
    default_target: True
    input:
        f"{R}/summary.md",
        expand("{root}/tables/{name}.{ext}", root=R, name=TABLE_NAMES, ext=TABLE_EXTS),
        expand("{root}/figures/{name}.{ext}", root=R, name=FIGURE_NAMES, ext=FIG_EXTS),
        [f"{R}/publish/wandb.json"] if PLAN.cfg["publish"]["wandb"]["enabled"] else [],

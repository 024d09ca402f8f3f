"""Command line of the pipeline steps: `python -m cppo.pipeline <command> ...`.

Commands used by the Snakemake rules: train-job, select, evaluate-run, export-benchmark, dapo,
prefetch, aggregate, table, figure, summary, publish.
For people: validate (check config files), check-resources (per-GPU memory, GPU-hours and disk
of the GPU training jobs; refuses a config that cannot fit) and resolve (print one run's run.yaml).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _checked_plan(configs: list[str]):
    """(plan, resource report) of config files, or None after printing the config error."""
    from cppo.pipeline.config import ConfigError, load_config
    from cppo.pipeline.plan import Plan
    from cppo.pipeline.resources import check

    try:
        plan = Plan(load_config(*configs))
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None
    except OSError as err:
        print(f"cannot read config file {err.filename}: {err.strerror}", file=sys.stderr)
        return None
    return plan, check(plan)


def _cmd_validate(args: argparse.Namespace) -> int:
    from cppo.pipeline.config import ConfigError

    checked = _checked_plan(args.configs)
    if checked is None:
        return 1
    plan, report = checked
    if not report.ok:
        print(ConfigError(report.errors), file=sys.stderr)
        return 1
    print(f"ok: profile {plan.matrix.profile}, {len(plan.matrix.runs)} training runs")
    return 0


def _cmd_check_resources(args: argparse.Namespace) -> int:
    from cppo.pipeline.resources import format_report

    checked = _checked_plan(args.configs)
    if checked is None:
        return 1
    print(format_report(checked[1]))
    return 0 if checked[1].ok else 1


def _cmd_resolve(args: argparse.Namespace) -> int:
    from cppo.pipeline.config import load_config
    from cppo.pipeline.jobs import yaml_text
    from cppo.pipeline.plan import Plan

    plan = Plan(load_config(*args.configs))
    print(yaml_text(plan.resolver.run_config(args.model, args.method, args.seed)))
    return 0


def _cmd_train_job(args: argparse.Namespace) -> int:
    from cppo.pipeline.jobs import train_job

    if not args.command:
        raise SystemExit("train-job: give the trainer command after '--'")
    return train_job(args.run_config, args.state_dir, args.command)


def _cmd_select(args: argparse.Namespace) -> int:
    from cppo.pipeline.jobs import write_json
    from cppo.run.directory import select_checkpoints

    try:
        sel = select_checkpoints(
            args.run_dir, args.t_stop_steps, args.initial_model, args.initial_revision
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"select: {err}", file=sys.stderr)
        return 1
    write_json(sel, args.out)
    return 0


def _cmd_evaluate_run(args: argparse.Namespace) -> int:
    from cppo.pipeline.jobs import evaluate_run

    if not args.command:
        raise SystemExit("evaluate-run: give the evaluation command after '--'")
    return evaluate_run(args.selection, args.checkpoints, args.out_root, args.command)


def _cmd_export_benchmark(args: argparse.Namespace) -> int:
    from cppo.pipeline.jobs import export_benchmark

    n = export_benchmark(args.name, args.out)
    print(f"{args.name}: {n} rows -> {args.out}")
    return 0


def _cmd_dapo(args: argparse.Namespace) -> int:
    from cppo.pipeline.dapo import prepare

    stats = prepare(
        args.out,
        source_file=args.source_file,
        hub_id=args.hub_id,
        revision=args.revision,
        filename=args.filename,
        sha256=args.sha256,
        dedupe=args.dedupe,
    )
    print(json.dumps(stats, indent=2))
    return 0


def _cmd_prefetch(args: argparse.Namespace) -> int:
    from cppo.pipeline.jobs import prefetch_model

    print(json.dumps(prefetch_model(args.id, args.revision, args.out)))
    return 0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from cppo.pipeline.aggregate import write_all

    for name, path in write_all(args.manifest, args.out_dir).items():
        print(f"{name}: {path}")
    return 0


def _cmd_table(args: argparse.Namespace) -> int:
    from cppo.pipeline.aggregate import load_manifest
    from cppo.pipeline.tables import render

    for path in render(load_manifest(args.manifest), args.tables_dir, args.name):
        print(path)
    return 0


def _cmd_figure(args: argparse.Namespace) -> int:
    from cppo.pipeline.aggregate import load_manifest
    from cppo.pipeline.figures import make_figure

    for path in make_figure(load_manifest(args.manifest), args.name, args.out_prefix):
        print(path)
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from cppo.pipeline.aggregate import load_manifest
    from cppo.pipeline.report import write_summary

    write_summary(load_manifest(args.manifest), args.tables, args.figures, args.out)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from cppo.pipeline.aggregate import load_manifest
    from cppo.pipeline.publish import publish

    manifest = load_manifest(args.manifest)
    root = Path(manifest["results_dir"])
    tables = {p.stem: p for p in sorted((root / "tables").glob("*.csv"))}
    figures = {p.stem: p for p in sorted((root / "figures").glob("*.png"))}
    publish(
        manifest,
        tables,
        figures,
        project=args.project,
        entity=args.entity or None,
        mode=args.mode,
        tags=args.tag,
        out=args.out,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cppo.pipeline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("validate", help="check workflow config files (merged in order)")
    s.add_argument("configs", nargs="+")
    s.set_defaults(func=_cmd_validate)

    s = sub.add_parser(
        "check-resources",
        help="per-GPU memory, GPU-hours and disk of the GPU training jobs; exit 1 if one cannot fit",
    )
    s.add_argument("configs", nargs="+")
    s.set_defaults(func=_cmd_check_resources)

    s = sub.add_parser("resolve", help="print the run.yaml of one {model, method, seed}")
    s.add_argument("configs", nargs="+")
    s.add_argument("--model", required=True)
    s.add_argument("--method", required=True)
    s.add_argument("--seed", type=int, required=True)
    s.set_defaults(func=_cmd_resolve)

    s = sub.add_parser("train-job", help="start or resume one training run")
    s.add_argument("--run-config", required=True)
    s.add_argument("--state-dir", required=True)
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_train_job)

    s = sub.add_parser("select", help="best-within-T_stop and final checkpoints of a run")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--t-stop-steps", type=int, required=True)
    s.add_argument("--initial-model", required=True, help="the step-0 model (path or hub id)")
    s.add_argument("--initial-revision", default=None, help="hub revision of --initial-model")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_select)

    s = sub.add_parser("evaluate-run", help="post-hoc evaluation of a run's checkpoints")
    s.add_argument("--selection", required=True)
    s.add_argument("--checkpoints", nargs="+", required=True, choices=["best", "final"])
    s.add_argument("--out-root", required=True)
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_evaluate_run)

    s = sub.add_parser("export-benchmark", help="write an evaluation benchmark to JSONL")
    s.add_argument("--name", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_export_benchmark)

    s = sub.add_parser("dapo", help="prepare DAPO-Math-17k for training")
    s.add_argument("--out", required=True)
    s.add_argument("--source-file", default=None)
    s.add_argument("--hub-id", default=None)
    s.add_argument("--revision", default=None)
    s.add_argument("--filename", default="data/dapo-math-17k.parquet")
    s.add_argument("--sha256", default=None)
    s.add_argument("--dedupe", choices=["prompt", "index", "none"], default="prompt")
    s.set_defaults(func=_cmd_dapo)

    s = sub.add_parser("prefetch", help="download a hub model at a pinned revision")
    s.add_argument("--id", required=True)
    s.add_argument("--revision", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_prefetch)

    s = sub.add_parser("aggregate", help="long-form CSVs from the runs of a manifest")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out-dir", required=True)
    s.set_defaults(func=_cmd_aggregate)

    s = sub.add_parser("table", help="render one table to Markdown, LaTeX and HTML")
    s.add_argument("--manifest", required=True)
    s.add_argument("--tables-dir", required=True)
    s.add_argument("--name", required=True)
    s.set_defaults(func=_cmd_table)

    s = sub.add_parser("figure", help="draw one figure (PNG + PDF)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--out-prefix", required=True)
    s.set_defaults(func=_cmd_figure)

    s = sub.add_parser("summary", help="write the Markdown summary")
    s.add_argument("--manifest", required=True)
    s.add_argument("--tables", nargs="*", default=[])
    s.add_argument("--figures", nargs="*", default=[])
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_summary)

    s = sub.add_parser("publish", help="push tables, figures and curves to wandb")
    s.add_argument("--manifest", required=True)
    s.add_argument("--project", required=True)
    s.add_argument("--entity", default=None)
    s.add_argument("--mode", choices=["auto", "online", "offline"], default="auto")
    s.add_argument("--tag", action="append", default=[])
    s.add_argument("--out", required=True)
    s.set_defaults(func=_cmd_publish)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

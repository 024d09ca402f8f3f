"""The Snakemake pipeline's Python side: config schema, run-config resolution, checkpoint
selection, aggregation into tables, figures, report and publishing.

Snakemake rules stay thin and call `python -m cppo.pipeline <command>` (see __main__.py).
"""

"""Stand-ins for the toy, trainer and evaluation CLIs with the same arguments and file formats.

They let the pipeline's own logic (DAG wiring, resume, selection, aggregation, tables, figures)
run end to end in seconds, without torch. Select them through the config's `commands` block and
put tests/ on PYTHONPATH.
"""

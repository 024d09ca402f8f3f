"""The run contract: what the pipeline writes for a training run and what every backend (the
project's TRL trainer, cppo.training; verl, cppo.backends.verl) reads and leaves behind.

    config.py     run.yaml: schema (schema.yaml), defaults, loading, the plugin imports, the
                  method bound to its rule and the divergence the run computes
    metrics.py    metrics.jsonl: the keys every train record carries, writing and reading it,
                  the best validation
    directory.py  the run directory: snapshots, checkpoint selection, the DONE marker
    backends.py   what a backend cannot run as asked (its train command and the resource check)

This package imports nothing from cppo.training, cppo.pipeline or cppo.backends, so each of
those can import it and none needs another (tests/test_layering.py walks the imports).
"""

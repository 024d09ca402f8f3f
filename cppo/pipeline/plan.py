"""From a workflow config to the job matrix the Snakemake rules read, in plain Python so that it
is testable without Snakemake and the rule files stay declarative.

A Plan validates the config once (schema, cross-references, every run's rule params) and holds
three views of it, one per job:

- matrix (cppo.pipeline.matrix): models x methods x seeds and every path under results/<profile>/;
- resolver (cppo.pipeline.resolve): each run's rule params, schedule, T_stop and run.yaml;
- commands (cppo.pipeline.commands): each job's command line, threads, resources and conda env;

plus the manifest (cppo.pipeline.manifest) that the aggregate, table, figure and report steps read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cppo.pipeline.commands import Commands
from cppo.pipeline.config import ConfigError, validate
from cppo.pipeline.manifest import build_manifest
from cppo.pipeline.matrix import RunMatrix
from cppo.pipeline.resolve import RunResolver


class Plan:
    """The job matrix of one workflow config."""

    def __init__(
        self, config: Mapping[str, Any], *, normalized: bool = False, check_rules: bool = True
    ):
        self.cfg: dict[str, Any] = dict(config) if normalized else validate(config)
        self.matrix = RunMatrix(self.cfg)
        self.commands = Commands(self.matrix)
        self.resolver = RunResolver(self.matrix, self.commands)
        if check_rules:
            errors = self.resolver.rule_errors()
            if errors:
                raise ConfigError(errors)

    def manifest(self) -> dict[str, Any]:
        return build_manifest(self.matrix, self.resolver)

"""Evaluation for the CPPO reproduction: benchmarks, sampling backends, hang-proof grading,
Avg@k / pass@k metrics, the ``python -m evaluation`` CLI and lm-eval task definitions.

Submodules are imported on use; importing this package loads neither torch nor math-verify.
"""

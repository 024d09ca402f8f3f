"""Training backends besides the project's TRL trainer (cppo.training): they run the same
registered rules (cppo.rules) and write the same run directory (metrics.jsonl, checkpoints)."""

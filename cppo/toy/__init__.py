"""Toy-scale testbed: a synthetic verifiable arithmetic task and tiny Qwen3 / Qwen3-MoE models.

Steps (each also a CLI command of `python -m cppo.toy`):
  data        task.write_data           train.jsonl (DAPO schema), val.jsonl, test.jsonl, meta.json
  tokenizer   tokenizer.build_from_data word+character tokenizer with the Qwen chat format
  model       models.build_model        a randomly initialised model directory from a preset
  warm-start  warm_start.warm_start     SFT on worked solutions (flavours: base, instruct)
  quick-eval  quick_eval.toy_avg_at_k   testbed Avg@k for calibration
Sizes and schedules live in presets.yaml.
"""

from .task import TaskConfig, generate_splits, write_data

__all__ = ["TaskConfig", "generate_splits", "write_data"]

"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tensor tests on one thread: deterministic and fair on a shared 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The diagnostics each rule reports beyond the trainer's contract keys (TRAIN_KEYS), written out
# by hand from the rules' code so that a key the trainer drops or a rule loses fails a test.
RULE_EXTRA_KEYS = {
    "grpo": {"outward/fraction", "grpo/dual_clip_fraction"},
    "cispo": {"cispo/capped_fraction", "cispo/weight_mean"},
    "minpro": {"minpro/weight_mean", "minpro/prefix_min_mean", "minpro/clip_fraction"},
    "dppo": {"outward/fraction"},
    "trm_max": {"outward/fraction", "trm/reject_fraction", "trm/score_mean"},
    "trm_avg": {"outward/fraction", "trm/reject_fraction", "trm/score_mean"},
    "cppo": {"outward/fraction", "cppo/prefix_share"},
    "none": {"outward/fraction"},
    "gspo": {"outward/fraction", "gspo/seq_ratio_abs_dev_mean"},
    "gmpo": {"outward/fraction", "gmpo/seq_ratio_abs_dev_mean"},
    "sapo": {"outward/fraction", "sapo/gate_mean", "sapo/gate_outward_mean", "sapo/damping_mean"},
    "icepop": {"outward/fraction", "icepop/below_fraction", "icepop/above_fraction"},
    "opsm": {"outward/fraction", "opsm/masked_fraction"},
    "m2po": {"outward/fraction", "m2po/m2_before", "m2po/m2_after"},
}


def metrics_records(path) -> list[dict]:
    """Every record of a metrics.jsonl in file order, duplicates included (the file as written;
    cppo.run.metrics.read_metrics is the reader that keeps the last record of a step)."""
    import json
    from pathlib import Path

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

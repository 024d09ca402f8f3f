"""The paper's numbers as checked in (cppo/pipeline/data/paper_table*.csv)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cppo.pipeline.paper import paper_models, paper_table

SPEC = Path(__file__).resolve().parents[2] / "shared" / "spec" / "cppo-method.md"
MODELS = ["Qwen3-1.7B", "Qwen3-1.7B-Base", "Qwen3-8B-Base", "Qwen3-30B-A3B-Base"]
METHODS = ["grpo", "minpro", "cispo", "dppo", "trm_max", "trm_avg", "cppo"]


def test_shape_and_keys():
    t1, t4 = paper_table("table1"), paper_table("table4")
    assert len(t1) == 28 and len(t4) == 84
    assert paper_models() == MODELS
    assert set(t1.method) == set(METHODS) and set(t1.benchmark) == {"mean"}
    assert set(t4.benchmark) == {"aime24", "aime25", "aime26"}
    assert not t1.duplicated(["model", "method"]).any()


def test_hand_checked_cells():
    t1 = paper_table("table1").set_index(["model", "method"])
    t4 = paper_table("table4").set_index(["model", "method", "benchmark"]).sort_index()
    assert t1.loc[("Qwen3-1.7B", "cppo"), "value"] == 31.88
    assert t1.loc[("Qwen3-8B-Base", "grpo"), "value"] == 23.96
    assert t1.loc[("Qwen3-30B-A3B-Base", "cispo"), "status"] == "collapse"
    assert t1.loc[("Qwen3-30B-A3B-Base", "cispo"), "note"] == "step 215"
    assert t4.loc[("Qwen3-30B-A3B-Base", "cppo", "aime24"), "value"] == 64.79
    assert t4.loc[("Qwen3-1.7B-Base", "minpro", "aime26"), "value"] == 6.66
    assert (t4.loc[("Qwen3-30B-A3B-Base", "cispo")]["status"] == "collapse").all()


def test_table1_is_the_mean_of_table4():
    # the headline is the unweighted mean of the three AIME columns (rounding: 2 decimals)
    t1 = paper_table("table1")
    t4 = paper_table("table4")
    ok = t1[t1.status == "ok"]
    means = t4[t4.status == "ok"].groupby(["model", "method"])["value"].mean()
    for r in ok.itertuples():
        assert abs(means[(r.model, r.method)] - r.value) <= 0.0075, (r.model, r.method)


@pytest.mark.skipif(not SPEC.exists(), reason="shared/spec not beside the repository")
def test_csv_equals_the_spec_tables():
    text = SPEC.read_text()
    labels = {
        "GRPO (clip-higher)": "grpo",
        "GRPO": "grpo",
        "MinPRO": "minpro",
        "CISPO": "cispo",
        "DPPO": "dppo",
        "TRM-Max": "trm_max",
        "TRM-Avg": "trm_avg",
        "CPPO": "cppo",
    }
    t1 = paper_table("table1").set_index(["model", "method"])
    t4 = paper_table("table4").set_index(["model", "method", "benchmark"])
    n1 = n4 = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in labels and re.match(r"[\d.]+", cells[1]):
            for model, cell in zip(MODELS, cells[1:], strict=True):
                row = t1.loc[(model, labels[cells[0]])]
                if cell.startswith("collapse"):
                    assert row["status"] == "collapse"
                else:
                    assert row["value"] == float(cell), (model, cells[0])
                n1 += 1
        elif len(cells) == 5 and cells[1] in labels and cells[0] in {m[6:] for m in MODELS}:
            model = f"Qwen3-{cells[0]}"
            for bench, cell in zip(["aime24", "aime25", "aime26"], cells[2:], strict=True):
                row = t4.loc[(model, labels[cells[1]], bench)]
                if cell == "collapse":
                    assert row["status"] == "collapse"
                else:
                    assert row["value"] == float(cell), (model, cells[1], bench)
                n4 += 1
    assert (n1, n4) == (28, 84)

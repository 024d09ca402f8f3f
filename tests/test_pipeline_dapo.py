"""DAPO-Math-17k preparation, offline on the bundled first-3-rows fixture."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from cppo.pipeline import dapo

FIXTURE = Path(__file__).parent / "fixtures" / "dapo_math_17k_first3.jsonl"
FIXTURE_SHA256 = "6e8822a6ddfe193d8e4db95bb7182ee918a4cec040ce4c07ec4649bf0169cf71"


def rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def test_fixture_is_the_shared_copy():
    assert dapo.sha256_file(FIXTURE) == FIXTURE_SHA256


def test_prepare_keeps_the_schema_and_content(tmp_path):
    out = tmp_path / "train.jsonl"
    stats = dapo.prepare(out, source_file=FIXTURE, sha256=FIXTURE_SHA256)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert got == rows()  # already in the trainer's format: unchanged, in order
    assert [r["reward_model"]["ground_truth"] for r in got] == ["34", "113", "-3"]
    assert stats["rows_in"] == stats["rows_out"] == 3 and stats["off_template"] == 0
    saved = json.loads((tmp_path / "train.stats.json").read_text())
    assert saved["source_sha256"] == FIXTURE_SHA256 and saved["dedupe"] == "prompt"


def test_dedupe_by_prompt_and_index():
    base = rows()
    dup = copy.deepcopy(base[0])
    dup["extra_info"]["index"] = "another-uuid"  # same problem under another id
    conflict = copy.deepcopy(base[1])
    conflict["reward_model"]["ground_truth"] = "999"
    data = base + [dup, copy.deepcopy(base[2]), conflict]
    out, stats = dapo.prepare_rows(data, dedupe="prompt")
    assert [r["extra_info"]["index"] for r in out] == [r["extra_info"]["index"] for r in base]
    assert stats == {
        "rows_in": 6,
        "rows_out": 3,
        "duplicates": 3,
        "conflicts": 1,
        "off_template": 0,
    }
    out, stats = dapo.prepare_rows(data, dedupe="index")
    assert len(out) == 4 and stats["duplicates"] == 2 and stats["conflicts"] == 1
    out, _ = dapo.prepare_rows(data, dedupe="none")
    assert len(out) == 6


def test_parquet_input_like_the_hub_file(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    data = rows() * 3  # the hub file repeats every problem
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "dapo-math-17k.parquet")
    out = tmp_path / "train.jsonl"
    stats = dapo.prepare(out, source_file=tmp_path / "dapo-math-17k.parquet")
    assert stats["rows_in"] == 9 and stats["rows_out"] == 3 and stats["duplicates"] == 6
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: r.pop("prompt"), "prompt"),
        (lambda r: r["prompt"].append({"role": "user", "content": "x"}), "one user message"),
        (lambda r: r["reward_model"].update(ground_truth=""), "empty ground_truth"),
        (lambda r: r["prompt"][0].update(role="system"), "one user message"),
    ],
)
def test_malformed_rows_are_rejected(mutate, match):
    bad = rows()
    mutate(bad[1])
    with pytest.raises(dapo.DapoFormatError, match=match):
        dapo.prepare_rows(bad)


def test_wrong_checksum_is_an_error(tmp_path):
    with pytest.raises(dapo.DapoFormatError, match="sha256"):
        dapo.prepare(tmp_path / "o.jsonl", source_file=FIXTURE, sha256="0" * 64)


def test_cli(tmp_path):
    from cppo.pipeline.__main__ import main

    out = tmp_path / "t.jsonl"
    assert main(["dapo", "--out", str(out), "--source-file", str(FIXTURE)]) == 0
    assert len(out.read_text().splitlines()) == 3

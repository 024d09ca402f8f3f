"""Benchmark loaders: bundled AIME sets, validation at load, hub loaders (offline, mocked)."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
import types
from pathlib import Path

import pytest

from evaluation import benchmarks
from evaluation.benchmarks import (
    DATA_DIR,
    canonical_answer,
    load_benchmark,
    network_allowed,
    repair_latex_escapes,
)
from evaluation.dapo import format_prompt
from evaluation.prompting import BOXED_SUFFIX, build_prompts, chat_prompt

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data is not beside the repo")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.delenv("CPPO_EVAL_ALLOW_NETWORK", raising=False)
    monkeypatch.delenv("CPPO_MATH500_PATH", raising=False)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", ["aime24", "aime25", "aime26"])
def test_bundled_aime_sets_are_valid(name):
    bench = load_benchmark(name)
    assert bench.name == name and len(bench) == 30
    assert bench.source == f"bundled:{name}.jsonl"
    assert len(set(bench.ids)) == 30
    year = 2000 + int(name[-2:])
    assert bench.ids == [f"{year}-{e}-{n}" for e in ("I", "II") for n in range(1, 16)]
    for answer in bench.answers:
        assert re.fullmatch(r"0|[1-9]\d{0,2}", answer)


@needs_shared
@pytest.mark.parametrize("name", ["aime24", "aime25", "aime26"])
def test_bundled_files_equal_the_shared_data(name):
    shared_rows = [
        json.loads(line) for line in (SHARED / name / f"{name}.jsonl").read_text().splitlines()
    ]
    assert load_benchmark(name).rows == shared_rows
    assert (DATA_DIR / f"{name}.jsonl").read_bytes() == (
        SHARED / name / f"{name}.jsonl"
    ).read_bytes()


@needs_shared
@pytest.mark.parametrize("year", ["2024", "2025"])
def test_bundled_answers_match_the_matharena_keys(year):
    # An independent answer key (zero-padded upstream, hence int()).
    key = []
    for exam in ("I", "II"):
        path = SHARED / f"aime{year[2:]}" / "original" / f"matharena_aime_{year}_{exam}_answers.csv"
        with open(path) as fh:
            key += [str(int(row["answer"])) for row in csv.DictReader(fh)]
    assert load_benchmark(f"aime{year[2:]}").answers == key


def test_readme_records_the_bundled_checksums():
    readme = (DATA_DIR / "README.md").read_text()
    for name in ("aime24", "aime25", "aime26"):
        digest = hashlib.sha256((DATA_DIR / f"{name}.jsonl").read_bytes()).hexdigest()
        assert digest in readme, name


def test_any_jsonl_path_works_and_is_named_by_its_stem(tmp_path):
    path = _write_jsonl(
        tmp_path / "val.jsonl",
        [{"id": "a", "problem": "1+1?", "answer": "2"}, {"id": 7, "problem": "2+3?", "answer": 5}],
    )
    bench = load_benchmark(path)
    assert bench.name == "val" and bench.ids == ["a", "7"] and bench.answers == ["2", "5"]
    assert bench.prompt_style == "dapo"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"id": "a", "problem": "p", "answer": "025"}], "zero-padded"),
        ([{"id": "a", "problem": "p", "answer": " 25"}], "not stripped"),
        ([{"id": "a", "problem": "p", "answer": ""}], "not stripped"),
        ([{"id": "a", "problem": "p", "answer": "???"}], "unusable gold"),
        ([{"id": "a", "problem": "p", "answer": "\\text{}"}], "unusable gold"),
        ([{"id": "a", "problem": "", "answer": "1"}], "problem"),
        (
            [
                {"id": "a", "problem": "p", "answer": "1"},
                {"id": "a", "problem": "q", "answer": "2"},
            ],
            "duplicate",
        ),
        ([{"id": "a", "problem": "p", "answer": ["1"]}], "string"),
    ],
)
def test_bad_rows_raise_at_load(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        load_benchmark(path)


def test_aime_validation_checks_count_and_range(tmp_path):
    rows = [json.loads(line) for line in (DATA_DIR / "aime24.jsonl").read_text().splitlines()]
    with pytest.raises(ValueError, match="expected 30 rows"):
        load_benchmark("aime24", path=_write_jsonl(tmp_path / "short.jsonl", rows[:29]))
    rows[3]["answer"] = "1000"
    with pytest.raises(ValueError, match="outside"):
        load_benchmark("aime24", path=_write_jsonl(tmp_path / "range.jsonl", rows))
    rows[3]["answer"] = "12.5"
    with pytest.raises(ValueError, match="not an integer"):
        load_benchmark("aime24", path=_write_jsonl(tmp_path / "frac.jsonl", rows))


def test_unknown_name_and_bad_source():
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("aime99")
    with pytest.raises(ValueError, match="source"):
        load_benchmark("aime24", source="web")


def test_network_is_opt_in(monkeypatch):
    assert network_allowed() is False
    monkeypatch.setenv("CPPO_EVAL_ALLOW_NETWORK", "1")
    assert network_allowed() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert network_allowed() is False
    assert network_allowed(True) is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert network_allowed(False) is False
    with pytest.raises(RuntimeError, match="network"):
        load_benchmark("aime24", source="hub", allow_network=False)


def test_math500_needs_a_file_offline(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="not bundled"):
        load_benchmark("math500")
    rows = [
        {"problem": f"p{i}", "answer": "\\frac{1}{2}", "unique_id": f"test/x/{i}.json", "level": 1}
        for i in range(500)
    ]
    path = _write_jsonl(tmp_path / "math500.jsonl", rows)
    bench = load_benchmark("math500", path=path)
    assert len(bench) == 500 and bench.ids[0] == "test/x/0.json"
    monkeypatch.setenv("CPPO_MATH500_PATH", str(path))
    assert load_benchmark("math500").ids == bench.ids


def test_canonical_answer_and_escape_repair():
    assert canonical_answer("025") == "25"
    assert canonical_answer(25) == "25"
    assert canonical_answer(" 7 ") == "7"
    assert canonical_answer("\\frac{1}{2}") == "\\frac{1}{2}"
    with pytest.raises(ValueError):
        canonical_answer(True)
    assert repair_latex_escapes("\x0crac{1}{2} and \triangle") == "\\frac{1}{2} and \\triangle"


class _FakeDatasets(types.ModuleType):
    def __init__(self, records):
        super().__init__("datasets")
        self.records = records
        self.calls = []

    def load_dataset(self, repo, config=None, *, split, revision):
        self.calls.append((repo, config, split, revision))
        return list(self.records)


def _install_fake_datasets(monkeypatch, records) -> _FakeDatasets:
    fake = _FakeDatasets(records)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return fake


def test_hub_aime24_is_canonicalised_ordered_and_checked(monkeypatch):
    local = load_benchmark("aime24")
    records = []
    for i, row in enumerate(local.rows):
        exam, number = row["exam"].split()[1], row["number"]
        records.append(
            {
                "id": 60 + i,
                "problem": row["problem"],
                "answer": f"{int(row['answer']):03d}",  # zero-padded as upstream
                "url": f"https://aops/wiki/index.php/2024_AIME_{exam}_Problems/Problem_{number}",
            }
        )
    records.reverse()  # the loader must restore I-1..II-15 order
    fake = _install_fake_datasets(monkeypatch, records)
    bench = load_benchmark("aime24", source="hub", allow_network=True)
    spec = benchmarks.REGISTRY["aime24"].hub
    assert fake.calls == [(spec.repo, None, spec.split, spec.revision)]
    assert bench.source == f"hub:{spec.repo}@{spec.revision}"
    assert bench.ids == local.ids and bench.answers == local.answers


def test_hub_answers_that_disagree_with_the_bundled_copy_raise(monkeypatch):
    local = load_benchmark("aime25")
    records = [
        {"problem": r["problem"], "answer": int(r["answer"]), "id": str(i)}
        for i, r in enumerate(local.rows)
    ]
    records[4]["answer"] = (records[4]["answer"] + 1) % 1000
    _install_fake_datasets(monkeypatch, records)
    with pytest.raises(ValueError, match="disagree"):
        load_benchmark("aime25", source="hub", allow_network=True)


def test_hub_is_used_by_auto_only_when_allowed(monkeypatch):
    local = load_benchmark("aime26")
    records = [
        {"problem": "\x0crac{a}{b} " + r["problem"], "answer": r["answer"], "id": str(i)}
        for i, r in enumerate(local.rows)
    ]
    fake = _install_fake_datasets(monkeypatch, records)
    assert load_benchmark("aime26").source.startswith("bundled")
    assert fake.calls == []
    monkeypatch.setenv("CPPO_EVAL_ALLOW_NETWORK", "1")
    bench = load_benchmark("aime26")
    assert bench.source.startswith("hub:math-ai/aime26@")
    assert bench.problems[0].startswith("\\frac{a}{b} ")  # broken escape repaired
    assert bench.answers == local.answers


def test_prompts_go_through_the_chat_template():
    from evaluation.testing import make_char_tokenizer

    tok = make_char_tokenizer()
    bench = load_benchmark("aime24")
    prompts = build_prompts(bench.problems[:2], tok)
    user = format_prompt(bench.problems[0])
    assert prompts[0] == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert user.startswith("Solve the following math problem step by step.")
    boxed = build_prompts(bench.problems[:1], tok, style="boxed")[0]
    assert bench.problems[0] + BOXED_SUFFIX in boxed
    assert build_prompts(["2+2?"], tok, style="raw", chat_template=False) == ["2+2?"]
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        chat_prompt(tok, "hi")
    with pytest.raises(ValueError, match="prompt style"):
        build_prompts(["x"], make_char_tokenizer(), style="fancy")

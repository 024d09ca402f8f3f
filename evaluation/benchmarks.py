"""Benchmark registry and loaders, with validation at load time.

Names: ``aime24``, ``aime25``, ``aime26`` (bundled in ``evaluation/data``; 30 problems each) and
``math500`` (hub, or a local JSONL). Any path to a benchmark JSONL works too (the name is the
file stem, e.g. the toy ``val.jsonl`` -> ``val``). Rows are ``{"id", "problem", "answer", ...}``.

Where data comes from (``source``):
- ``"bundled"``: the package's copies (AIME only).
- ``"hub"``: the HF hub dataset at a pinned revision (needs ``datasets`` and network).
- ``"auto"`` (default): the hub when network use is allowed (``allow_network=True`` or
  ``CPPO_EVAL_ALLOW_NETWORK=1``; ``HF_HUB_OFFLINE=1``/``HF_DATASETS_OFFLINE=1`` always win),
  otherwise the bundled copy; for math500 otherwise the file given by ``path=`` or
  ``CPPO_MATH500_PATH``. Hub and bundled AIME texts are not byte-identical (different upstream
  transcriptions), so runs that must be comparable should pin ``source``.

Validation (a ``ValueError`` naming the row): expected row count, unique non-empty ids,
non-empty problems, answers that are canonical strings (no surrounding whitespace, no zero
padding of integers; AIME answers integers in 0..999), and every gold answer parseable by both
graders -- an unparseable gold is an error here, never a free point later.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from evaluation.grading import check_gold

DATA_DIR = Path(__file__).resolve().parent / "data"
ENV_ALLOW_NETWORK = "CPPO_EVAL_ALLOW_NETWORK"
ENV_MATH500_PATH = "CPPO_MATH500_PATH"
SOURCES = ("auto", "bundled", "hub")

_INT_RE = re.compile(r"-?\d+")
_CANONICAL_INT_RE = re.compile(r"-?(0|[1-9]\d*)")


@dataclass(frozen=True)
class HubSource:
    repo: str
    revision: str
    split: str
    config: str | None = None


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    bundled: str | None
    hub: HubSource | None
    expected_rows: int | None
    answer_range: tuple[int, int] | None = None  # integer answers within this range
    prompt_style: str = "dapo"


REGISTRY: dict[str, BenchmarkSpec] = {
    "aime24": BenchmarkSpec(
        "aime24",
        "aime24.jsonl",
        HubSource("HuggingFaceH4/aime_2024", "2fe88a2f1091d5048c0f36abc874fb997b3dd99a", "train"),
        30,
        (0, 999),
    ),
    "aime25": BenchmarkSpec(
        "aime25",
        "aime25.jsonl",
        HubSource("math-ai/aime25", "563bb8404243c5f09de6ec262f2db674fe5bce9b", "test"),
        30,
        (0, 999),
    ),
    "aime26": BenchmarkSpec(
        "aime26",
        "aime26.jsonl",
        HubSource("math-ai/aime26", "79037aebdb6580008fb960d17cb21fd3099083e3", "test"),
        30,
        (0, 999),
    ),
    "math500": BenchmarkSpec(
        "math500",
        None,
        HubSource("HuggingFaceH4/MATH-500", "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be", "test"),
        500,
    ),
}


@dataclass
class Benchmark:
    """A validated evaluation set. ``prompt_style`` selects the user-message template."""

    name: str
    rows: list[dict]
    source: str = ""
    prompt_style: str = "dapo"
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]

    @property
    def problems(self) -> list[str]:
        return [r["problem"] for r in self.rows]

    @property
    def answers(self) -> list[str]:
        return [r["answer"] for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


def available_benchmarks() -> list[str]:
    return sorted(REGISTRY)


def network_allowed(allow_network: bool | None = None) -> bool:
    """Whether loaders may reach the hub: explicit flag, else CPPO_EVAL_ALLOW_NETWORK=1."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes"}:
            return False
    if allow_network is not None:
        return bool(allow_network)
    return os.environ.get(ENV_ALLOW_NETWORK, "").strip().lower() in {"1", "true", "yes"}


# ------------------------------------------------------------------ validation


def canonical_answer(answer) -> str:
    """The canonical string form of an answer read from a file or the hub.

    Integers (or integer strings) lose zero padding; other strings are stripped.
    """
    if isinstance(answer, bool):
        raise ValueError(f"answer must be a string or an integer, got {answer!r}")
    if isinstance(answer, int):
        return str(answer)
    if not isinstance(answer, str):
        raise ValueError(f"answer must be a string or an integer, got {answer!r}")
    text = answer.strip()
    if _INT_RE.fullmatch(text):
        return str(int(text))
    return text


def validate_rows(
    rows: list[dict],
    *,
    name: str,
    expected_rows: int | None = None,
    answer_range: tuple[int, int] | None = None,
) -> list[dict]:
    """Check benchmark rows; raise ValueError naming the first bad row. Returns the rows."""
    if expected_rows is not None and len(rows) != expected_rows:
        raise ValueError(f"{name}: expected {expected_rows} rows, found {len(rows)}")
    if not rows:
        raise ValueError(f"{name}: no rows")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"{name} row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not a JSON object")
        rid = row.get("id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"{where}: 'id' must be a non-empty string, got {rid!r}")
        if rid in seen:
            raise ValueError(f"{where}: duplicate id {rid!r}")
        seen.add(rid)
        problem = row.get("problem")
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"{where} ({rid}): 'problem' must be a non-empty string")
        answer = row.get("answer")
        if not isinstance(answer, str):
            raise ValueError(f"{where} ({rid}): 'answer' must be a string, got {answer!r}")
        if answer != answer.strip() or not answer:
            raise ValueError(f"{where} ({rid}): answer {answer!r} is empty or not stripped")
        if _INT_RE.fullmatch(answer) and not _CANONICAL_INT_RE.fullmatch(answer):
            raise ValueError(
                f"{where} ({rid}): answer {answer!r} is zero-padded; write {str(int(answer))!r}"
            )
        if answer_range is not None:
            if not _CANONICAL_INT_RE.fullmatch(answer):
                raise ValueError(f"{where} ({rid}): answer {answer!r} is not an integer")
            lo, hi = answer_range
            if not lo <= int(answer) <= hi:
                raise ValueError(f"{where} ({rid}): answer {answer} outside [{lo}, {hi}]")
        try:
            check_gold(answer)
        except ValueError as exc:
            raise ValueError(f"{where} ({rid}): unusable gold answer: {exc}") from None
    return rows


# ------------------------------------------------------------------ files


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
    return rows


def _rows_from_file(path: Path) -> list[dict]:
    """Read a benchmark JSONL; ids default to `unique_id` (MATH-500 layout) or the row index.

    Integer answers (e.g. math-ai's) become strings; strings are kept as they are so that
    validation can flag non-canonical ones instead of silently changing them.
    """
    rows = []
    for i, raw in enumerate(read_jsonl(path)):
        if not isinstance(raw, dict):
            raise ValueError(f"{path} row {i}: not a JSON object")
        row = dict(raw)
        rid = row.get("id", row.get("unique_id", i))
        row["id"] = str(rid)
        if isinstance(row.get("answer"), int) and not isinstance(row.get("answer"), bool):
            row["answer"] = str(row["answer"])
        rows.append(row)
    return rows


@lru_cache(maxsize=32)
def _load_file_cached(path: str, mtime_ns: int, size: int, name: str, expected, answer_range):
    rows = _rows_from_file(Path(path))
    validate_rows(rows, name=name, expected_rows=expected, answer_range=answer_range)
    return rows


def _load_file(path: Path, name: str, expected=None, answer_range=None) -> list[dict]:
    stat = path.stat()
    rows = _load_file_cached(
        str(path.resolve()), stat.st_mtime_ns, stat.st_size, name, expected, answer_range
    )
    return [dict(r) for r in rows]


# ------------------------------------------------------------------ hub

_AIME_URL_RE = re.compile(r"(\d{4})_AIME_(I{1,2})_Problems/Problem_(\d+)")
# JSON escapes that swallowed a LaTeX backslash upstream ("\frac" -> form feed + "rac").
_BROKEN_ESCAPES = {"\x0c": "\\f", "\x08": "\\b", "\t": "\\t", "\r": "\\r"}


def repair_latex_escapes(text: str) -> str:
    """Undo JSON-escape damage to LaTeX (``\\f``, ``\\b``, ``\\t``, ``\\r`` control characters).

    AIME statements contain no real tabs, form feeds, backspaces or carriage returns.
    """
    for bad, good in _BROKEN_ESCAPES.items():
        text = text.replace(bad, good)
    return text


def _hub_rows_aime24(records: list[dict]) -> list[dict]:
    rows = []
    for rec in records:
        match = _AIME_URL_RE.search(str(rec.get("url", "")))
        if match is None:
            raise ValueError(f"aime24 hub row {rec.get('id')!r}: cannot read exam from its url")
        year, exam, number = match.group(1), match.group(2), int(match.group(3))
        rows.append(
            {
                "id": f"{year}-{exam}-{number}",
                "year": int(year),
                "exam": f"AIME {exam}",
                "number": number,
                "problem": repair_latex_escapes(str(rec["problem"])),
                "answer": canonical_answer(rec["answer"]),
                "source_id": rec.get("id"),
            }
        )
    rows.sort(key=lambda r: (len(r["exam"]), r["number"]))
    return rows


def _hub_rows_math_ai(year: int):
    def convert(records: list[dict]) -> list[dict]:
        rows = []
        for i, rec in enumerate(records):
            exam = "I" if i < 15 else "II"
            number = i % 15 + 1
            rows.append(
                {
                    "id": f"{year}-{exam}-{number}",
                    "year": year,
                    "exam": f"AIME {exam}",
                    "number": number,
                    "problem": repair_latex_escapes(str(rec["problem"])),
                    "answer": canonical_answer(rec["answer"]),
                    "source_id": str(rec.get("id", i)),
                }
            )
        return rows

    return convert


def _hub_rows_math500(records: list[dict]) -> list[dict]:
    return [
        {
            "id": str(rec["unique_id"]),
            "problem": str(rec["problem"]),
            "answer": str(rec["answer"]).strip(),
            "subject": rec.get("subject"),
            "level": rec.get("level"),
        }
        for rec in records
    ]


_HUB_CONVERTERS = {
    "aime24": _hub_rows_aime24,
    "aime25": _hub_rows_math_ai(2025),
    "aime26": _hub_rows_math_ai(2026),
    "math500": _hub_rows_math500,
}


def _load_hub(spec: BenchmarkSpec) -> list[dict]:
    import datasets  # only here: offline use never needs it

    hub = spec.hub
    assert hub is not None
    dataset = datasets.load_dataset(hub.repo, hub.config, split=hub.split, revision=hub.revision)
    rows = _HUB_CONVERTERS[spec.name]([dict(r) for r in dataset])
    validate_rows(
        rows,
        name=f"{spec.name} (hub)",
        expected_rows=spec.expected_rows,
        answer_range=spec.answer_range,
    )
    if spec.bundled is not None:
        # The bundled copies were cross-checked against several answer keys: the hub must agree.
        bundled = _load_file(
            DATA_DIR / spec.bundled, spec.name, spec.expected_rows, spec.answer_range
        )
        hub_answers = [(r["id"], r["answer"]) for r in rows]
        local_answers = [(r["id"], r["answer"]) for r in bundled]
        if hub_answers != local_answers:
            diff = [(h, b) for h, b in zip(hub_answers, local_answers, strict=True) if h != b]
            raise ValueError(
                f"{spec.name}: hub answers at {hub.revision[:12]} disagree with the bundled copy: {diff[:5]}"
            )
    return rows


# ------------------------------------------------------------------ public loader


def load_benchmark(
    name_or_path: str | os.PathLike,
    *,
    source: str = "auto",
    path: str | os.PathLike | None = None,
    prompt_style: str | None = None,
    allow_network: bool | None = None,
) -> Benchmark:
    """Load and validate a benchmark by registry name or JSONL path (see module docstring)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    key = str(name_or_path)
    spec = REGISTRY.get(key)
    if spec is None:
        file = Path(key)
        if not file.is_file():
            raise ValueError(
                f"unknown benchmark {key!r}: not one of {available_benchmarks()} and not a file"
            )
        rows = _load_file(file, file.stem)
        return Benchmark(file.stem, rows, str(file), prompt_style or "dapo")

    style = prompt_style or spec.prompt_style
    online = network_allowed(allow_network)
    if path is not None:
        rows = _load_file(Path(path), spec.name, spec.expected_rows, spec.answer_range)
        return Benchmark(spec.name, rows, str(path), style)
    if source == "hub" or (source == "auto" and online and spec.hub is not None):
        if not online:
            raise RuntimeError(
                f"{spec.name}: source='hub' needs network access (allow_network=True or "
                f"{ENV_ALLOW_NETWORK}=1, and no HF_HUB_OFFLINE)"
            )
        rows = _load_hub(spec)
        hub = spec.hub
        return Benchmark(spec.name, rows, f"hub:{hub.repo}@{hub.revision}", style)
    if spec.bundled is not None:
        rows = _load_file(DATA_DIR / spec.bundled, spec.name, spec.expected_rows, spec.answer_range)
        return Benchmark(spec.name, rows, f"bundled:{spec.bundled}", style)
    env_path = os.environ.get(ENV_MATH500_PATH) if spec.name == "math500" else None
    if env_path:
        rows = _load_file(Path(env_path), spec.name, spec.expected_rows, spec.answer_range)
        return Benchmark(spec.name, rows, env_path, style)
    raise RuntimeError(
        f"{spec.name} is not bundled: allow network access ({ENV_ALLOW_NETWORK}=1) to read "
        f"{spec.hub.repo if spec.hub else 'the hub'}, or pass a JSONL path "
        f"(path=..., {ENV_MATH500_PATH}=..., or --benchmark-file)"
    )

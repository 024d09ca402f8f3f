"""The toy task: chains of single-digit additions and subtractions with worked solutions.

A problem lists lettered terms, "What is the total of a) 7 b) +5 c) -3 d) +8?", and its worked
solution writes every running total, "b) 7+5=12. c) 12-3=9. d) 9+8=17.\nAnswer: 17", so the
response grows with the number of terms (~30-100 tokens at the default difficulty) and each
step depends on the one before it.

Why this shape (measured on a 0.4M-parameter Qwen3, see the package README):
- single-digit +/- chains with running totals are learnable by tiny models, multiplication
  is not;
- the letters make "which term comes next" a content lookup (the next letter, then its value
  in the problem). With a bare expression ("What is 7+5-3+8?", style "plain") the model has
  to count terms by position; it learns that too, but after a long, seed-dependent plateau
  (at 900 SFT steps some seeds sat at 10%, others reached 50-80%), whereas the lettered
  form reached 80-90% for every seed tried.
The running total never goes negative.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evaluation.dapo import format_prompt

from .presets import data_defaults, task_preset

DATA_SOURCE = "cppo_toy_arith"
SPLITS = ("train", "val", "test")
STYLES = ("lettered", "plain")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knob: the number of terms and the largest operand."""

    min_terms: int = 4
    max_terms: int = 9
    max_operand: int = 9
    p_minus: float = 0.5
    style: str = "lettered"  # "lettered" or "plain" (see the module docstring)

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.style == "lettered" and self.max_terms > len(LETTERS):
            raise ValueError(f"the lettered style has at most {len(LETTERS)} terms")
        if not 2 <= self.min_terms <= self.max_terms:
            raise ValueError(
                f"need 2 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}"
            )
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not 0.0 <= self.p_minus <= 1.0:
            raise ValueError(f"p_minus must be in [0, 1], got {self.p_minus}")

    @classmethod
    def from_difficulty(cls, difficulty: str, **overrides: Any) -> TaskConfig:
        params = task_preset(difficulty)
        params.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**params)


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]  # signed: the first is positive, then +d or -d
    style: str = "lettered"

    @property
    def key(self) -> str:
        """Canonical identity used for de-duplication and the split-disjointness check."""
        return self.text

    @property
    def text(self) -> str:
        if self.style == "plain":
            return f"What is {expression(self.terms)}?"
        head, *rest = self.terms
        parts = [f"a) {head}", *(f"{LETTERS[i]}) {t:+d}" for i, t in enumerate(rest, 1))]
        return f"What is the total of {' '.join(parts)}?"

    @property
    def answer(self) -> int:
        return sum(self.terms)

    @property
    def solution(self) -> str:
        return worked_solution(self.terms, self.style)


def expression(terms: Sequence[int]) -> str:
    head, *rest = terms
    return str(head) + "".join(f"{t:+d}" for t in rest)


def worked_solution(
    terms: Sequence[int], style: str = "lettered", slips: Mapping[int, int] | None = None
) -> str:
    """One "a+b=c." step per term after the first (prefixed by the term's letter in the
    lettered style), then the DAPO answer line.

    slips={k: delta} writes step k's result off by delta and carries the wrong total on to
    the next step, as someone who slipped and went on from there would (used by the warm
    start, cppo.toy.warm_start.add_slips).
    """
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}")
    slips = slips or {}
    total = terms[0]
    steps = []
    for i, t in enumerate(terms[1:], 1):
        label = f"{LETTERS[i]}) " if style == "lettered" else ""
        new = total + t + slips.get(i - 1, 0)
        steps.append(f"{label}{total}{t:+d}={new}.")
        total = new
    return " ".join(steps) + f"\nAnswer: {total}"


def draw_slips(terms: Sequence[int], rng: random.Random, step_rate: float) -> dict[int, int]:
    """Each step independently slips with probability `step_rate` by -2, -1, +1 or +2.

    Deltas that would make a later running total negative are not drawn, so a slipped
    solution looks like the task's own (totals never go below zero).
    """
    if not 0.0 <= step_rate <= 1.0:
        raise ValueError(f"step_rate must be in [0, 1], got {step_rate}")
    prefix = [sum(terms[: j + 1]) for j in range(len(terms))]
    slips: dict[int, int] = {}
    offset = 0
    for k in range(len(terms) - 1):
        if rng.random() >= step_rate:
            continue
        lowest = min(prefix[k + 1 :]) + offset
        deltas = [d for d in (-2, -1, 1, 2) if lowest + d >= 0]
        slips[k] = rng.choice(deltas)
        offset += slips[k]
    return slips


def sample_problem(rng: random.Random, cfg: TaskConfig) -> Problem:
    # The sign is drawn first and independently of the running total (except that nothing is
    # subtracted from 0), so it cannot be guessed from the total: it has to be read from the
    # problem. Drawing the operand first and allowing "-" only when d <= total made "+" far
    # more likely after small totals, a shortcut that stalled learning the real lookup.
    n = rng.randint(cfg.min_terms, cfg.max_terms)
    total = rng.randint(1, cfg.max_operand)
    terms = [total]
    for _ in range(n - 1):
        if total > 0 and rng.random() < cfg.p_minus:
            d = -rng.randint(1, min(total, cfg.max_operand))
        else:
            d = rng.randint(1, cfg.max_operand)
        terms.append(d)
        total += d
    return Problem(tuple(terms), cfg.style)


def generate_splits(cfg: TaskConfig, sizes: dict[str, int], seed: int) -> dict[str, list[Problem]]:
    """Unique problems from one seeded stream, dealt to val, test, then train (so the small
    evaluation splits do not change when n_train changes)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[Problem]] = {}
    for split in ("val", "test", "train"):
        want = sizes.get(split, 0)
        rows: list[Problem] = []
        misses = 0
        while len(rows) < want:
            p = sample_problem(rng, cfg)
            if p.key in seen:
                misses += 1
                if misses > 100 * want + 1000:
                    raise ValueError(
                        f"cannot draw {want} unique {split} problems with {cfg}: the task space "
                        "is too small; raise max_terms or max_operand"
                    )
                continue
            seen.add(p.key)
            rows.append(p)
        out[split] = rows
    check_disjoint({k: [p.key for p in v] for k, v in out.items()})
    return out


def check_disjoint(keys_by_split: dict[str, Iterable[str]]) -> None:
    """Raise ValueError if any problem occurs twice, within or across splits."""
    owner: dict[str, str] = {}
    for split, keys in keys_by_split.items():
        for k in keys:
            if k in owner:
                where = split if owner[k] == split else f"{owner[k]} and {split}"
                raise ValueError(f"problem {k!r} occurs twice ({where})")
            owner[k] = split


def _uid(seed: int, split: str, i: int, key: str) -> str:
    h = hashlib.sha1(f"{seed}:{split}:{i}:{key}".encode()).hexdigest()[:12]
    return f"toy-{split}-{i:06d}-{h}"


def train_row(p: Problem, uid: str) -> dict[str, Any]:
    """DAPO-Math-17k schema plus the plain problem and worked solution."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": format_prompt(p.text)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": str(p.answer), "style": "rule"},
        "extra_info": {"index": uid},
        "problem": p.text,
        "solution": p.solution,
        "terms": list(p.terms),
    }


def benchmark_row(p: Problem, uid: str) -> dict[str, Any]:
    return {
        "id": uid,
        "problem": p.text,
        "answer": str(p.answer),
        "n_terms": len(p.terms),
        "solution": p.solution,
    }


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    difficulty: str | None = None,
    cfg: TaskConfig | None = None,
) -> dict[str, Any]:
    """Write train.jsonl (DAPO schema), val.jsonl and test.jsonl (benchmark rows), meta.json."""
    d = data_defaults()
    difficulty = difficulty or d["difficulty"]
    cfg = cfg or TaskConfig.from_difficulty(difficulty)
    sizes = {
        "train": d["n_train"] if n_train is None else n_train,
        "val": d["n_val"] if n_val is None else n_val,
        "test": d["n_test"] if n_test is None else n_test,
    }
    splits = generate_splits(cfg, sizes, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        out / "train.jsonl",
        (train_row(p, _uid(seed, "train", i, p.key)) for i, p in enumerate(splits["train"])),
    )
    for split in ("val", "test"):
        write_jsonl(
            out / f"{split}.jsonl",
            (benchmark_row(p, _uid(seed, split, i, p.key)) for i, p in enumerate(splits[split])),
        )
    meta = {
        "task": DATA_SOURCE,
        "seed": seed,
        "difficulty": difficulty,
        "task_config": asdict(cfg),
        "sizes": sizes,
        "answer_range": {
            s: [min(p.answer for p in ps), max(p.answer for p in ps)] if ps else None
            for s, ps in splits.items()
        },
        "solution_chars": {
            s: [min(len(p.solution) for p in ps), max(len(p.solution) for p in ps)] if ps else None
            for s, ps in splits.items()
        },
        "disjoint_checked": True,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def verify_data_dir(data_dir: str | Path) -> None:
    """Re-check a written data directory: splits disjoint, gold answers consistent."""
    data_dir = Path(data_dir)
    train = read_jsonl(data_dir / "train.jsonl")
    keys = {"train": [r["problem"] for r in train]}
    for split in ("val", "test"):
        keys[split] = [r["problem"] for r in read_jsonl(data_dir / f"{split}.jsonl")]
    check_disjoint(keys)

"""Grading throughput on typical completions and worst-case time on hostile ones.

    python benchmarks/bench_grading.py [--n 4000] [--workers 2] [--timeout 5] [--json OUT]

Typical completions are synthetic chain-of-thought texts (1-3k characters of prose and inline
LaTeX) ending the way sampled answers end: a correct "Answer:" line, a wrong one, a \\boxed{}
answer, an equivalent form, or nothing (truncated). All texts are distinct, so no cache helps.
Throughput counts the whole `grade_batch` call (DAPO fast path + math-verify worker pool), after
one warm-up batch has started the pool. The hostile set is graded with the default timeout;
the worst single-item wall time must stay under it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from evaluation.grading import DEFAULT_TIMEOUT, grade_batch, shared_pool, shutdown_shared_pool
from evaluation.testing import hostile_completions

WORDS = [
    "we",
    "consider",
    "the",
    "following",
    "so",
    "that",
    "hence",
    "note",
    "since",
    "then",
    "let",
    "be",
    "integer",
    "sum",
    "product",
    "number",
    "equation",
    "value",
    "positive",
    "therefore",
    "consider",
    "case",
    "both",
    "sides",
]


def _sentence(rng: random.Random) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 999)
    math = rng.choice(
        [
            f"$x^2 + {a}x = {c}$",
            f"$\\frac{{{a}}}{{{b}}} + {c}$",
            f"$\\sqrt{{{a * a}}} = {a}$",
            f"$({a} + {b})^2 = {(a + b) ** 2}$",
            f"$\\binom{{{a}}}{{2}} = {a * (a - 1) // 2}$",
            f"${a} \\cdot {b} = {a * b}$",
        ]
    )
    return f"{words.capitalize()} {math}."


def typical_completions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    completions, golds = [], []
    for _ in range(n):
        gold = rng.randint(0, 999)
        body = " ".join(_sentence(rng) for _ in range(rng.randint(12, 30)))
        kind = rng.random()
        if kind < 0.35:
            ending = f"\n\nAnswer: {gold}"
        elif kind < 0.75:
            ending = f"\n\nAnswer: {(gold + rng.randint(1, 500)) % 1000}"
        elif kind < 0.85:
            ending = f"\n\nThus the answer is $\\boxed{{{rng.choice([gold, gold + 1])}}}$."
        elif kind < 0.92:
            ending = f"\n\nAnswer: ${gold}.0$"
        else:
            ending = ""  # cut off before an answer
        completions.append(body + ending)
        golds.append(str(gold))
    return completions, golds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)

    pool = shared_pool(args.workers)
    warm_c, warm_g = typical_completions(64, seed=123)
    grade_batch(warm_c, warm_g, timeout=args.timeout, pool=pool)

    completions, golds = typical_completions(args.n)
    numbers: dict = {"n": args.n, "workers": args.workers, "timeout": args.timeout}
    for mode in ("both", "math-verify", "dapo-strict"):
        start = time.perf_counter()
        report = grade_batch(completions, golds, mode=mode, timeout=args.timeout, pool=pool)
        elapsed = time.perf_counter() - start
        numbers[mode] = {
            "per_second": args.n / elapsed,
            "seconds": elapsed,
            "accuracy": report.accuracy,
            "timeouts": report.n_timeouts,
            "errors": report.n_errors,
        }
        print(
            f"typical, {mode:<12} {args.n / elapsed:8.0f} completions/s "
            f"({elapsed:.2f} s, accuracy {report.accuracy:.3f}, "
            f"timeouts {report.n_timeouts}, errors {report.n_errors})"
        )

    hostile = hostile_completions()
    rows = []
    worst = 0.0
    for label, completion, gold in hostile:
        start = time.perf_counter()
        result = grade_batch([completion], [gold], timeout=args.timeout, pool=pool).results[0]
        wall = time.perf_counter() - start
        worst = max(worst, wall)
        rows.append(
            {"label": label, "seconds": wall, "status": result.status, "correct": result.correct}
        )
        print(f"hostile  {label:<20} {wall:6.3f} s  {result.status:<8} correct={result.correct}")
    numbers["hostile"] = rows
    numbers["hostile_worst_seconds"] = worst
    numbers["pool_restarts"] = pool.n_restarts
    print(
        f"worst hostile item: {worst:.3f} s (timeout {args.timeout} s); pool restarts {pool.n_restarts}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(numbers, fh, indent=2)
    shutdown_shared_pool()
    return 0 if worst < args.timeout + 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Grading completions against gold answers, hang-proof.

Grading modes (every mode reads only the tail of a completion; that is the input-size limit):

- ``"dapo-strict"``: :func:`evaluation.dapo.dapo_correct` -- the last ``Answer:`` line within
  the last 300 characters, normalised with the DAPO/Minerva rules, string-equal to the
  normalised gold. This is the reward of the paper's training stack (verl's DAPO scorer).
  Pure string work on at most 300 characters: it runs in the calling process.
- ``"math-verify"``: ``math_verify.verify(parse(gold), parse(tail))`` -- gold first, since
  verify() is not symmetric -- where ``tail`` is the last :data:`MV_TAIL_CHARS` characters of
  the completion and ``parse`` uses math-verify's default extraction (LaTeX including
  ``\\boxed{}``, "final answer is" / "answer:" anchors, and plain numbers or arithmetic; the
  right-most match of the highest-priority kind wins). The gold string is parsed as ``$gold$``
  (then ``\\boxed{gold}``); a gold that yields nothing is an error, never a match.
- ``"both"`` (default): correct iff the ``dapo-strict`` verdict is True OR the ``math-verify``
  verdict is True. math-verify only runs when the DAPO match failed (the OR is already decided
  otherwise); this fast path is what makes grading of mostly-correct batches cheap.

math-verify runs in worker processes (:class:`evaluation._pool.GraderPool`) with a per-item
wall-clock ``timeout`` (default 5 s): a cooperative SIGALRM at half of it (pure-Python sympy
work stops there; typical items take milliseconds), then a hard kill of the worker at the full
timeout for C-level work that ignores signals, plus an address-space limit per worker. A
timed-out or failing item is wrong (its math-verify half is False) and is counted in
``GradeReport.n_timeouts`` / ``n_errors``. Model text is never passed to eval/exec by this code.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from evaluation import _mv
from evaluation._pool import GraderPool
from evaluation.dapo import dapo_correct, extract_answer, normalize_answer

MODES = ("dapo-strict", "math-verify", "both")
DEFAULT_MODE = "both"
DEFAULT_TIMEOUT = 5.0
DEFAULT_WORKERS = 2
# math-verify sees only this many trailing characters: bounds its regex and parsing work.
MV_TAIL_CHARS = 2000
# Cooperative in-worker deadline as a fraction of the hard per-item timeout. Half leaves room
# for a signal that lands inside a long C call to take effect before the hard kill.
SOFT_FRACTION = 0.5

__all__ = [
    "MODES",
    "DEFAULT_TIMEOUT",
    "GradeResult",
    "GradeReport",
    "grade",
    "grade_one",
    "grade_batch",
    "check_gold",
    "shared_pool",
    "shutdown_shared_pool",
]


@dataclass(frozen=True)
class GradeResult:
    """Verdict on one completion.

    ``status`` is "ok", "timeout" or "error" (the last two only from the math-verify half).
    ``math_verify_correct`` is None when math-verify was not run (dapo-strict mode, or the
    fast path of "both"). ``extracted`` is the answer the verdict rests on: in "math-verify"
    mode the string math-verify extracted, otherwise the normalised DAPO "Answer:" line when
    there is one, else math-verify's string (or None).
    """

    correct: bool
    status: str
    dapo_correct: bool
    math_verify_correct: bool | None
    extracted: str | None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class GradeReport:
    """Batched verdicts plus counts of grader timeouts and errors."""

    results: list[GradeResult]
    mode: str
    elapsed: float = 0.0
    pool_restarts: int = 0

    @property
    def correct(self) -> list[bool]:
        return [r.correct for r in self.results]

    @property
    def n_timeouts(self) -> int:
        return sum(r.status == "timeout" for r in self.results)

    @property
    def n_errors(self) -> int:
        return sum(r.status == "error" for r in self.results)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.results) if self.results else 0.0

    @property
    def max_seconds(self) -> float:
        return max((r.seconds for r in self.results), default=0.0)

    def __len__(self) -> int:
        return len(self.results)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown grading mode {mode!r}; expected one of {MODES}")


def check_gold(gold: str, *, math_verify: bool = True) -> None:
    """Raise ValueError when a gold answer could never be matched (or could match anything).

    Used by the benchmark loaders at load time. Gold strings are trusted data, so math-verify
    parses them in-process.
    """
    if not isinstance(gold, str) or not gold.strip():
        raise ValueError(f"gold answer must be a non-empty string, got {gold!r}")
    if not normalize_answer(gold):
        raise ValueError(f"gold answer {gold!r} normalises to an empty string")
    if math_verify:
        try:
            _mv.parse_gold(gold)
        except _mv.GoldParseError as exc:
            raise ValueError(str(exc)) from None


# ---------------------------------------------------------------- shared worker pool

_SHARED: GraderPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool(workers: int | None = None) -> GraderPool:
    """The process-wide grader pool, started on first use and reused by every later call.

    ``workers=None`` keeps the current pool (or starts one with DEFAULT_WORKERS); a different
    explicit count restarts it with that many workers.
    """
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is not None and not _SHARED.closed:
            if workers is None or workers == _SHARED.n_workers:
                return _SHARED
            _SHARED.close()
        _SHARED = GraderPool(workers or DEFAULT_WORKERS)
        return _SHARED


def shutdown_shared_pool() -> None:
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is not None:
            _SHARED.close()
            _SHARED = None


atexit.register(shutdown_shared_pool)


# ---------------------------------------------------------------- grading


def _tail(completion: str) -> str:
    return completion[-MV_TAIL_CHARS:]


def _in_process(jobs, soft_timeout):
    results = []
    in_main = threading.current_thread() is threading.main_thread()
    for tail, gold in jobs:
        start = time.monotonic()
        status, verdict, extracted, error = _mv.run_one(
            tail, gold, soft_timeout if in_main else None
        )
        results.append((status, verdict, extracted, error, time.monotonic() - start))
    return results


def grade_batch(
    completions: Sequence[str],
    golds: Sequence[str],
    *,
    mode: str = DEFAULT_MODE,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int = DEFAULT_WORKERS,
    pool: GraderPool | None = None,
    progress: bool = False,
) -> GradeReport:
    """Grade many completions; one GradeResult per completion, in order.

    ``workers`` > 0 uses the shared persistent pool with that many processes (or ``pool`` if
    given). ``workers=0`` runs math-verify in this process with only the cooperative SIGALRM
    deadline (main thread only) and no hard kill -- for trusted inputs and debugging.
    Identical (completion tail, gold) pairs are graded once.
    """
    _check_mode(mode)
    if len(completions) != len(golds):
        raise ValueError("completions and golds must have the same length")
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    started = time.monotonic()
    n = len(completions)
    dapo = [dapo_correct(c, g) for c, g in zip(completions, golds, strict=True)]
    answers = [extract_answer(c) for c in completions]

    need_mv = []
    if mode == "math-verify":
        need_mv = list(range(n))
    elif mode == "both":
        need_mv = [i for i in range(n) if not dapo[i]]

    # Deduplicate: sampled completions of small models repeat often.
    job_of: dict[tuple[str, str], int] = {}
    jobs: list[tuple[str, str]] = []
    item_job: dict[int, int] = {}
    for i in need_mv:
        key = (_tail(completions[i]), golds[i])
        if key not in job_of:
            job_of[key] = len(jobs)
            jobs.append(key)
        item_job[i] = job_of[key]

    bar = None
    if progress and jobs:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"grading ({mode})", unit="item", leave=False)
    restarts = 0
    soft = timeout * SOFT_FRACTION
    outcomes: list[tuple] = []
    if jobs:
        if workers <= 0 and pool is None:
            outcomes = _in_process(jobs, soft)
            if bar is not None:
                bar.update(len(jobs))
        else:
            the_pool = pool or shared_pool(workers)
            before = the_pool.n_restarts
            raw = the_pool.run(
                jobs,
                timeout=timeout,
                soft_timeout=soft,
                on_done=bar.update if bar is not None else None,
            )
            restarts = the_pool.n_restarts - before
            outcomes = [(o.status, o.verdict, o.extracted, o.error, o.seconds) for o in raw]
    if bar is not None:
        bar.close()

    results = []
    for i in range(n):
        if i in item_job:
            status, mv_ok, mv_extracted, error, seconds = outcomes[item_job[i]]
            mv_verdict = bool(mv_ok) if status == "ok" else False
            correct = mv_verdict if mode == "math-verify" else (dapo[i] or mv_verdict)
            if mode == "math-verify" and mv_extracted is not None:
                extracted = mv_extracted
            else:
                extracted = answers[i] if answers[i] is not None else mv_extracted
            results.append(
                GradeResult(correct, status, dapo[i], mv_verdict, extracted, seconds, error)
            )
        else:
            results.append(GradeResult(dapo[i], "ok", dapo[i], None, answers[i]))
    return GradeReport(results, mode, time.monotonic() - started, restarts)


def grade_one(
    completion: str,
    gold: str,
    *,
    mode: str = DEFAULT_MODE,
    timeout: float = DEFAULT_TIMEOUT,
    workers: int | None = None,
) -> GradeResult:
    """Grade a single completion (bounded time: at most ``timeout`` seconds of math-verify)."""
    _check_mode(mode)
    if mode == "dapo-strict" or (mode == "both" and dapo_correct(completion, gold)):
        return grade_batch([completion], [gold], mode=mode, timeout=timeout).results[0]
    pool = shared_pool(workers)
    return grade_batch([completion], [gold], mode=mode, timeout=timeout, pool=pool).results[0]


def grade(
    completion: str, gold: str, *, mode: str = DEFAULT_MODE, timeout: float = DEFAULT_TIMEOUT
) -> bool:
    """True when ``completion`` answers ``gold`` (see the module docstring for the modes).

    Time is bounded by ``timeout`` (wall clock, default 5 s); a timeout or grader error is False.
    """
    return grade_one(completion, gold, mode=mode, timeout=timeout).correct

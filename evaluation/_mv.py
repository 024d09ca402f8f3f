"""The math-verify half of grading, plus the loop a grader worker process runs.

Kept free of torch and of the rest of the package so that grader workers start fast (this
module is preloaded by the forkserver). Model text is only ever handed to math-verify's parser;
nothing here evaluates it. (math-verify's plain-expression extractor passes regex-restricted
arithmetic -- digits, operators, parentheses, no identifiers -- to sympy's `parse_expr`; what
that can cost is bounded by the worker's timeout and memory limit.)
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# math-verify warns once when its own signal timeouts are disabled; ours replace them.
logging.getLogger("math_verify").setLevel(logging.ERROR)
logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)

PRED_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
# Only strings produced by the parser itself are reported: str() of a sympy object can hang.
MAX_EXTRACTED_CHARS = 200


class SoftTimeout(BaseException):
    """Raised by SIGALRM inside a worker. A BaseException, so library `except Exception` can't eat it."""


class GoldParseError(ValueError):
    """The gold answer gives math-verify nothing to compare against."""


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """math-verify's reading of a gold answer string, as LaTeX math, then as a boxed answer.

    At least one parsed item must be a sympy object: a bare fallback string would only ever
    match by string equality, so such a gold is rejected as unparseable.
    """
    for wrapped in (f"${gold}$", f"\\boxed{{{gold}}}"):
        parsed = parse(wrapped, extraction_config=GOLD_CONFIG, parsing_timeout=None)
        if any(not isinstance(item, str) for item in parsed):
            return tuple(parsed)
    raise GoldParseError(f"math-verify cannot parse the gold answer {gold!r}")


def _extracted_string(parsed: list) -> str | None:
    for item in reversed(parsed):
        if isinstance(item, str):
            return item[:MAX_EXTRACTED_CHARS]
    return None


def math_verify_correct(completion_tail: str, gold: str) -> tuple[bool, str | None]:
    """(verdict, extracted string). Gold goes first: verify() is not symmetric."""
    gold_parsed = list(parse_gold(gold))
    pred = parse(completion_tail, extraction_config=PRED_CONFIG, parsing_timeout=None)
    if not pred:
        return False, None
    ok = verify(gold_parsed, pred, timeout_seconds=None)
    return bool(ok), _extracted_string(pred)


def _alarm(signum, frame):
    raise SoftTimeout()


def run_one(completion_tail: str, gold: str, soft_timeout: float | None) -> tuple:
    """Grade one item with math-verify under a SIGALRM budget (main thread of a process only).

    Returns (status, verdict, extracted, error) with status "ok" | "timeout" | "error".
    """
    use_alarm = soft_timeout is not None and soft_timeout > 0
    previous = None
    try:
        if use_alarm:
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, soft_timeout)
        try:
            verdict, extracted = math_verify_correct(completion_tail, gold)
        finally:
            if use_alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except SoftTimeout:
        return "timeout", False, None, "soft timeout"
    except RecursionError:
        return "error", False, None, "RecursionError"
    except MemoryError:
        return "error", False, None, "MemoryError"
    except Exception as exc:  # any parser failure is a wrong answer, and reported
        return "error", False, None, f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        if previous is not None:
            signal.signal(signal.SIGALRM, previous)
    return "ok", verdict, extracted, None


def _limit_memory(extra_bytes: int) -> None:
    # Cap the address space relative to what the worker already maps, so a hostile input that
    # builds a gigantic integer fails with MemoryError instead of swapping the machine.
    if extra_bytes <= 0:
        return
    try:
        with open("/proc/self/statm") as fh:
            current = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return
    limit = current + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _die_with_parent() -> None:
    # A worker stuck in C code cannot notice its parent's death; let the kernel kill it.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_main(conn, memory_limit_bytes: int) -> None:
    """Loop of a grader worker: say ready, then receive (index, tail, gold, soft_timeout) and
    reply per item.

    Replies carry the worker's own monotonic start/end times (CLOCK_MONOTONIC is system-wide),
    so the parent can place each item's wall-clock deadline exactly.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _limit_memory(memory_limit_bytes)
    conn.send(("ready", time.monotonic()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, tail, gold, soft_timeout = message
        start = time.monotonic()
        status, verdict, extracted, error = run_one(tail, gold, soft_timeout)
        try:
            conn.send((index, status, verdict, extracted, error, start, time.monotonic()))
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    import sys
    from multiprocessing.connection import Connection

    _die_with_parent()
    if os.getppid() != int(sys.argv[3]):  # parent already gone
        sys.exit(0)
    worker_main(Connection(int(sys.argv[1])), int(sys.argv[2]))

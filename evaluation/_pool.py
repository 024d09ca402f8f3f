"""A small process pool for grading with a hard per-item wall-clock deadline.

`concurrent.futures` and `multiprocessing.Pool` cannot abandon one task: a worker stuck in C code
(sympy building a 10^(10^10)-digit integer ignores signals) would stall the whole batch. Here each
worker has its own socket and a short queue of in-flight items; when the item at the head of a
worker's queue passes its deadline the worker is killed, that item is reported as a timeout, the
rest of its queue goes back to the pending list and a fresh worker is started in the background.

Workers are plain `python -m evaluation._mv` subprocesses rather than multiprocessing children:
they never re-import the caller's `__main__` (so unguarded scripts, notebooks and Snakemake
scripts are fine) and never inherit torch/CUDA state from the caller.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

# A worker that has not said "ready" within this many seconds is replaced.
STARTUP_TIMEOUT = 120.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class PoolOutcome:
    status: str  # "ok" | "timeout" | "error"
    verdict: bool
    extracted: str | None
    error: str | None
    seconds: float


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    spawned: float
    ready: bool = False
    inflight: deque = field(default_factory=deque)  # (index, dispatch time)
    last_end: float = 0.0  # worker-side end time of its previous item (or of startup)

    def head_start(self) -> float:
        return max(self.inflight[0][1], self.last_end)


class GraderPool:
    """Persistent math-verify worker processes with a hard per-item timeout.

    Args:
        workers: number of worker processes.
        depth: items queued per worker (hides pipe latency; each item's deadline starts when
            the worker begins it, not when it was queued).
        memory_limit_mb: address space each worker may add on top of its size at start.
    """

    def __init__(self, workers: int = 2, *, depth: int = 4, memory_limit_mb: int = 2048):
        if workers < 1:
            raise ValueError("GraderPool needs at least one worker")
        self.n_workers = workers
        self.depth = max(1, depth)
        self.memory_limit_bytes = int(memory_limit_mb) * 1024 * 1024
        self._lock = threading.Lock()
        self.n_restarts = 0
        self.closed = False
        self._workers: list[_Worker] = [self._spawn() for _ in range(workers)]

    # ------------------------------------------------------------------ workers

    def _spawn(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        child_fd = child_sock.fileno()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "evaluation._mv",
                str(child_fd),
                str(self.memory_limit_bytes),
                str(os.getpid()),
            ],
            pass_fds=(child_fd,),
            stdin=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        child_sock.close()
        return _Worker(process, Connection(parent_sock.detach()), time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError):
            worker.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=10)
        worker.conn.close()
        self.n_restarts += 1
        self._workers[self._workers.index(worker)] = self._spawn()

    @staticmethod
    def _requeue(worker: _Worker, pending: deque) -> None:
        for queued, _ in reversed(worker.inflight):
            pending.appendleft(queued)
        worker.inflight.clear()

    # ------------------------------------------------------------------ running

    def run(
        self,
        jobs: Sequence[tuple[str, str]],
        *,
        timeout: float,
        soft_timeout: float | None = None,
        on_done: Callable[[int], None] | None = None,
    ) -> list[PoolOutcome]:
        """Grade (completion_tail, gold) jobs with math-verify; one outcome per job, in order."""
        if self.closed:
            raise RuntimeError("GraderPool is closed")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        with self._lock:
            return self._run(jobs, timeout, soft_timeout, on_done)

    def _run(self, jobs, timeout, soft_timeout, on_done) -> list[PoolOutcome]:
        results: list[PoolOutcome | None] = [None] * len(jobs)
        pending: deque[int] = deque(range(len(jobs)))
        remaining = len(jobs)

        def finish(index: int, outcome: PoolOutcome) -> None:
            nonlocal remaining
            results[index] = outcome
            remaining -= 1
            if on_done is not None:
                on_done(1)

        def died(worker: _Worker) -> None:
            # Killed by the OS (e.g. out of memory) or failed to start: the item it was working
            # on is an error, the rest of its queue is retried on a fresh worker.
            if worker.inflight:
                start = worker.head_start()
                head, _ = worker.inflight.popleft()
                elapsed = time.monotonic() - start
                finish(head, PoolOutcome("error", False, None, "grader worker died", elapsed))
                self._requeue(worker, pending)
            elif self.n_restarts > 10 * self.n_workers + len(jobs):
                raise RuntimeError("grader workers keep dying without work") from None
            self._replace(worker)

        while remaining:
            for worker in list(self._workers):
                while worker.ready and pending and len(worker.inflight) < self.depth:
                    index = pending.popleft()
                    tail, gold = jobs[index]
                    try:
                        worker.conn.send((index, tail, gold, soft_timeout))
                    except OSError:
                        pending.appendleft(index)
                        died(worker)
                        break
                    worker.inflight.append((index, time.monotonic()))

            now = time.monotonic()
            deadlines = [
                w.head_start() + timeout if w.ready else w.spawned + STARTUP_TIMEOUT
                for w in self._workers
                if w.inflight or not w.ready
            ]
            wait_for = max(0.0, min(deadlines) - now) if deadlines else None
            watched = [w.conn for w in self._workers if w.inflight or not w.ready]
            ready_conns = wait(watched, timeout=wait_for)
            by_conn = {id(w.conn): w for w in self._workers}
            for conn in ready_conns:
                worker = by_conn[id(conn)]
                try:
                    while conn.poll():
                        message = conn.recv()
                        if message[0] == "ready":
                            worker.ready = True
                            worker.last_end = message[1]
                            continue
                        index, status, verdict, extracted, error, start, end = message
                        head, _ = worker.inflight.popleft()
                        if head != index:  # the protocol is FIFO per worker
                            raise RuntimeError("grader worker answered out of order")
                        worker.last_end = end
                        finish(
                            index, PoolOutcome(status, bool(verdict), extracted, error, end - start)
                        )
                except (EOFError, OSError):
                    died(worker)

            now = time.monotonic()
            for worker in list(self._workers):
                if worker.inflight and now >= worker.head_start() + timeout:
                    start = worker.head_start()
                    head, _ = worker.inflight.popleft()
                    finish(head, PoolOutcome("timeout", False, None, "hard timeout", now - start))
                    self._requeue(worker, pending)
                    self._replace(worker)
                elif not worker.ready and now >= worker.spawned + STARTUP_TIMEOUT:
                    self._replace(worker)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ shutdown

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in self._workers:
            try:
                worker.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=10)
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> GraderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # Interpreter shutdown may already have torn down what close() needs.
        with contextlib.suppress(Exception):
            self.close()

"""Decoding untrusted files with bounds: a time limit per file, a memory limit per worker process, and a death
of the worker that rejects only the file it was decoding.

One home for the converter's isolation (pipeline/data/convert.py runs its pool with these pieces) and the
served model's (pipeline/artifact/serving.py decodes request rows in a `DecodePool`). Both meet the same
inputs: a few KB of compressed data can declare gigabytes of pixels, and a C decoder does not return to the
interpreter until it is done, so only the kernel (RLIMIT_AS, a killed process) bounds it for sure.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager


class TimeLimitExceeded(Exception):
    """The decode ran past its time limit (raised by the SIGALRM handler inside `time_limit`)."""


# After the deadline the alarm repeats at this interval until the block is left. Python drops an exception
# raised inside a finaliser (a `__del__`, a weakref callback) with an "Exception ignored" message, so a single
# alarm that lands in one would let the block run on unbounded; the next one lands in the block itself.
_REPEAT_S = 0.1


class _Deadline:
    """The state one `time_limit` block shares with its SIGALRM handler."""

    def __init__(self):
        self.active = True

    def on_alarm(self, signum, frame):
        if self.active:  # a late alarm while the block is being left is not an error of the next code
            raise TimeLimitExceeded


@contextmanager
def time_limit(seconds: float | None):
    """Raise TimeLimitExceeded in the block after `seconds` (a SIGALRM timer: it interrupts Python code and
    blocking system calls such as opening a FIFO), again every `_REPEAT_S` until the block is left. Outside the
    main thread (no signals there), or with no limit, the block runs unbounded."""
    timed = bool(seconds) and threading.current_thread() is threading.main_thread()
    if timed:
        deadline = _Deadline()
        previous = signal.signal(signal.SIGALRM, deadline.on_alarm)
    try:
        if timed:
            # Armed inside the try: an alarm due before the block starts (a tiny limit) still disarms the timer
            # and restores the handler below; armed before it, the repeating timer outlived the block.
            signal.setitimer(signal.ITIMER_REAL, seconds, _REPEAT_S)
        yield
    finally:
        if timed:
            try:
                deadline.active = False  # from here on an alarm returns quietly...
            finally:  # ...so this part runs to its end even when one landed just before the line above
                deadline.active = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)


def limit_memory(max_bytes: int | None) -> None:
    """Cap this process's address space (RLIMIT_AS): an allocation past it fails with MemoryError, which the
    decoders turn into a one-line rejection, instead of the kernel's OOM killer taking the host's memory first.
    The worker's BLAS pools are single-threaded first: each idle OpenBLAS thread reserves address space."""
    import resource

    if max_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))


def _worker_init(max_bytes: int | None) -> None:
    limit_memory(max_bytes)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which then stops its workers


class DecodePool:
    """A forkserver process pool (workers never inherit the parent's TensorFlow state) whose workers run under
    `limit_memory(max_bytes)`. `map(fn, tasks)` returns fn's results in order; a task whose worker died gets
    `WorkerDied(reason)` instead, found by retrying every task that was in flight one per fresh pool. `fn` must
    be a module-level function (pickled by reference) that applies its own `time_limit`."""

    def __init__(self, workers: int, max_bytes: int | None, preload: tuple[str, ...] = ()):
        self.workers, self.max_bytes = max(1, workers), max_bytes
        self.ctx = multiprocessing.get_context("forkserver")
        if preload:
            self.ctx.set_forkserver_preload(list(preload))
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self, workers: int | None = None) -> concurrent.futures.ProcessPoolExecutor:
        env_threads = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        os.environ.update({k: os.environ.get(k, v) for k, v in env_threads.items()})
        return concurrent.futures.ProcessPoolExecutor(workers or self.workers, mp_context=self.ctx,
                                                      initializer=_worker_init, initargs=(self.max_bytes,))

    def map(self, fn: Callable, tasks: list) -> list:
        with self._lock:
            if self._pool is None:
                self._pool = self._executor()
            pool = self._pool
        futures = [pool.submit(fn, t) for t in tasks]
        results: list = []
        broken = False
        for future in futures:
            try:
                results.append(future.result())
            except concurrent.futures.process.BrokenProcessPool:
                broken = True
                results.append(None)
        if not broken:
            return results
        with self._lock:  # a fresh pool for the next request; the dead one is gone
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)
        for i, (task, value) in enumerate(zip(tasks, results, strict=True)):
            if value is None:
                results[i] = self._alone(fn, task)
        return results

    def _alone(self, fn: Callable, task):
        """One task in a pool of its own: its death names this task only."""
        single = self._executor(1)
        try:
            return single.submit(fn, task).result()
        except concurrent.futures.process.BrokenProcessPool:
            return WorkerDied("decoder process died on this input (out of memory, or killed)")
        finally:
            single.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class WorkerDied:
    """The result of a task whose decoder process died (kernel OOM kill, a signal)."""

    def __init__(self, reason: str):
        self.reason = reason

"""What every session in a process shares: one small executor and one deadline scheduler.

A process may hold one session or a thousand.  Background work (snapshots, KV-cache saves,
warm-ups, the embedded model's generation for async sessions) runs on one bounded thread pool,
and every deadline (a turn's timeout, a delayed KV save) sits in one heap served by a single
sleeping thread.  So the number of threads stays the same whatever the number of sessions:
no thread per session, no ``threading.Timer`` per turn.

Both are created lazily and survive ``fork()`` correctly: a child process gets fresh ones
(threads do not cross a fork).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Deadline", "generation_executor", "run_in_background", "schedule", "shared_executor"]

logger = logging.getLogger("conversation_session")

# Enough for a snapshot, a KV save, a warm-up and a couple of embedded generations at once;
# more threads would only contend for the same 1-2 model locks and the same disk.
MAX_WORKERS = max(4, min(8, (os.cpu_count() or 1) + 2))

# In-process generations for async sessions (the embedded model) hold a thread for a whole
# reply: they get a pool of their own, so they never queue snapshots and KV saves behind them.
# More would only wait for the model's lock; a queued generation waits its turn as it would there.
GENERATION_WORKERS = 4

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_generation: ThreadPoolExecutor | None = None
_scheduler: _Scheduler | None = None
_pid = os.getpid()


def _check_fork() -> None:
    """After fork() the parent's threads do not exist in the child: start over."""
    global _executor, _generation, _scheduler, _pid, _lock
    if os.getpid() != _pid:
        _lock = threading.Lock()
        _executor = None
        _generation = None
        _scheduler = None
        _pid = os.getpid()


def shared_executor() -> ThreadPoolExecutor:
    """The process-wide pool for blocking background work (bounded: ``MAX_WORKERS`` threads)."""
    global _executor
    _check_fork()
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="conversation-session")
        return _executor


def generation_executor() -> ThreadPoolExecutor:
    """The process-wide pool for blocking generations driven from an event loop (bounded)."""
    global _generation
    _check_fork()
    with _lock:
        if _generation is None:
            _generation = ThreadPoolExecutor(max_workers=GENERATION_WORKERS,
                                             thread_name_prefix="conversation-session-generate")
        return _generation


def run_in_background(fn: Callable[[], Any], what: str) -> Future[Any]:
    """Run ``fn`` on the shared pool; an exception is logged (background work never raises)."""

    def job() -> Any:
        try:
            return fn()
        except Exception:  # a failed background job must not vanish silently
            logger.exception("background %s failed", what)
            return None

    try:
        return shared_executor().submit(job)
    except RuntimeError:
        # The interpreter is exiting (the pool no longer takes work): a snapshot asked for by a
        # session being finalised now is still worth writing, so it runs here and now.
        done: Future[Any] = Future()
        done.set_result(job())
        return done


class Deadline:
    """A scheduled call; ``cancel()`` before it fires and it never runs."""

    __slots__ = ("_fn", "cancelled", "fired", "when")

    def __init__(self, when: float, fn: Callable[[], None]):
        self.when = when
        self._fn: Callable[[], None] | None = fn
        self.cancelled = False
        self.fired = False

    def cancel(self) -> None:
        self.cancelled = True
        self._fn = None  # drop the closure (it may hold a session) at once

    def _fire(self) -> None:
        fn = self._fn
        self._fn = None
        if fn is None or self.cancelled:
            return
        self.fired = True
        try:
            fn()
        except Exception:
            logger.exception("scheduled callback failed")


class _Scheduler:
    """One thread sleeping until the earliest deadline.  Callbacks must be quick (set a flag,
    cancel a token, submit work to the pool): they run on the scheduler's thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name="conversation-session-deadlines", daemon=True)
        self._thread.start()

    def add(self, delay: float, fn: Callable[[], None]) -> Deadline:
        d = Deadline(time.monotonic() + max(delay, 0.0), fn)
        with self._cond:
            heapq.heappush(self._heap, (d.when, next(self._seq), d))
            if self._heap[0][2] is d:
                self._cond.notify()
        return d

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    # Drop cancelled entries so a thousand finished turns do not pile up.
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                    if not self._heap:
                        self._cond.wait()
                        continue
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        _, _, due = heapq.heappop(self._heap)
                        break
                    self._cond.wait(wait)
            due._fire()


def schedule(delay: float, fn: Callable[[], None]) -> Deadline:
    """Call ``fn`` after ``delay`` seconds on the shared deadline thread (quick callbacks only)."""
    global _scheduler
    _check_fork()
    with _lock:
        if _scheduler is None:
            _scheduler = _Scheduler()
        scheduler = _scheduler
    return scheduler.add(delay, fn)

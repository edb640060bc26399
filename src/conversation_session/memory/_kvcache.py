"""Keeping the backend's cache warm for a session: the KV file on disk and the resume warm-up.

Two collaborators of a session, both running on the process's shared pool (``_runtime``):

* ``KVFile``: after each completed turn, save the embedded model's KV cache of the completed
  conversation beside the session (``<id>.kv``), a little later, so back-to-back turns skip
  saves they would only wait for; never a timed-out or interrupted tail (the backend saves only
  cells whose tokens are a prefix of the saved history).
* ``Warmup``: after ``load_history()``, restore that file (or prefill the history) while the
  user is still typing, so the first question after a restart is answered at warm speed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from .._exceptions import SessionError
from .._runtime import Deadline, run_in_background, schedule
from ..backends import Backend, CancelToken
from ..backends._kvstate import enforce_cap
from ..stores._kvpaths import host_kv_dir
from ..stores._record import MessageDict

__all__ = ["KV_CACHE_MAX_BYTES", "KVFile", "Warmup", "kv_file_path", "remove_kv_file"]

logger = logging.getLogger("conversation_session")

# The default total of the .kv files in one folder.  A session's file grows with its history
# (23 KB per token with the embedded model's f16 cells, 12 KB with q8_0: BENCHMARKS.md §18);
# 256 MiB keeps about 11,000 tokens of the most recently used conversations (one whole
# 8,192-token context, or five sessions of 2,000 tokens; twice that with q8_0).  An evicted
# session loses only speed: its history is computed again when it comes back.
KV_CACHE_MAX_BYTES = 256 << 20
# A KV-cache save waits this long for the next turn before it starts: scripted, back-to-back
# turns then skip the saves they would only wait for, and a person typing never notices.
KV_SAVE_DELAY_S = 0.5
# Background work stops within one step of being cancelled or finishes soon; this only
# guards against a stuck backend.
JOIN_TIMEOUT_S = 15.0


def kv_file_path(store: object, session_id: str) -> Path:
    """The one rule for where a session's KV file lives: beside the session when the store is a
    folder (``<id>.kv``), else in a per-host cache named after the store (PostgreSQL: the KV
    state belongs to this host's model, the history to the shared database)."""
    kv_path = getattr(store, "kv_path", None)
    if kv_path is not None:
        return Path(kv_path(session_id))
    return host_kv_dir(str(getattr(store, "description", repr(store)))) / f"{session_id}.kv"


def remove_kv_file(store: object, session_id: str) -> None:
    """After ``session_id`` was deleted from ``store``: remove its KV file from this host's cache.
    A store that names its KV files (``kv_path``: the folder store, PostgreSQL) removes the file
    itself in ``delete`` (a folder with the session, under its lock: removing it again here could
    take the file of a new session given the freed id); for any other store, every path that
    deletes a session (retention, prune, ``sessions delete``, the service's DELETE) calls this."""
    if getattr(store, "kv_path", None) is not None:
        return
    try:
        kv_file_path(store, session_id).unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # the history is gone either way; the cache cap evicts the file later
        logger.warning("could not remove the KV file of deleted session %s: %s", session_id, exc)


class KVFile:
    """Delayed, latest-wins saves of one session's KV cache to ``path``."""

    def __init__(self, backend: Backend, path: Callable[[], Path], cap: int, cache_key: Any):
        self._backend = backend
        self._path = path
        self.cap = cap
        self._key = cache_key
        self._lock = threading.Lock()
        self._pending: tuple[list[MessageDict], Callable[[], bool]] | None = None
        self._timer: Deadline | None = None
        self._running: Future[Any] | None = None
        self.stats: dict[str, Any] = {}

    def schedule(self, messages: list[MessageDict], still_current: Callable[[], bool]) -> None:
        """Save ``messages``' cache in ``KV_SAVE_DELAY_S``; a newer request replaces this one."""
        with self._lock:
            self._pending = (messages, still_current)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = schedule(KV_SAVE_DELAY_S, self._start)

    def _start(self) -> None:
        with self._lock:
            job, self._pending, self._timer = self._pending, None, None
            if job is None:
                return
            previous = self._running
            self._running = run_in_background(lambda: self._save(previous, *job), "KV-cache save")

    def _save(self, previous: Future[Any] | None, messages: list[MessageDict],
              still_current: Callable[[], bool]) -> None:
        if previous is not None:
            previous.result()  # saves of one session never overlap
        path = self._path()
        try:
            # A PostgreSQL session's KV file lives in this host's cache folder, made on first use
            # (private: the cache holds what the conversation said).
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            figures = self._backend.save_state(path, messages, still_current=still_current, cache_key=self._key)
        except (OSError, SessionError) as exc:
            figures = {"kv_save": f"failed: {exc}"}
            logger.warning("could not save the KV cache to %s: %s (only speed is lost)", path, exc)
        self.stats.update(figures)
        if figures.get("kv_save") == "saved":
            evicted = enforce_cap(path.parent, self.cap, keep=path)
            if evicted:
                logger.info("KV cache files over %d bytes: removed %s", self.cap, ", ".join(p.name for p in evicted))

    def flush(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Run a pending save now and wait for it; False if it did not finish in time."""
        self._start()
        with self._lock:
            running = self._running
        if running is None:
            return True
        try:
            running.result(timeout)
        except FutureTimeout:
            logger.warning("the KV cache save did not finish within %.0f s", timeout)
            return False
        return True

    def cancel_pending(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._pending = self._timer = None


class Warmup:
    """A background ``Backend.warm`` (after an optional KV restore) for a restored conversation."""

    def __init__(self, backend: Backend, messages: list[MessageDict],
                 restore: Callable[[], dict[str, Any]] | None, cache_key: Any):
        self.cancel = CancelToken()
        self.stats: dict[str, Any] = {"warmup": "running", "warmup_messages": len(messages)}
        t0 = time.perf_counter()

        def run() -> None:
            try:
                if restore is not None:
                    self.stats.update(restore())
                figures = backend.warm(messages, self.cancel, cache_key=cache_key) if backend.can_warm else {}
                self.stats.update(figures or {})
                self.stats["warmup"] = "cancelled" if self.cancel.cancelled else "done"
            except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs speed
                self.stats["warmup"] = "failed"
                self.stats["warmup_error"] = str(exc)
                logger.info("warm-up of the restored conversation failed: %s", exc)
            self.stats["warmup_s"] = round(time.perf_counter() - t0, 4)

        self.future = run_in_background(run, "warm-up")

    def wait(self, timeout: float | None) -> bool:
        """Let the warm-up finish (it is work the next turn would do anyway); False if it has not
        within ``timeout`` (it goes on, so asking again is fast)."""
        try:
            self.future.result(timeout)
        except FutureTimeout:
            return False
        return True

    async def await_done(self, timeout: float | None) -> bool:
        """``wait`` without blocking the event loop."""
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self.future)), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def stop(self) -> None:
        self.cancel.cancel()
        self.wait(JOIN_TIMEOUT_S)

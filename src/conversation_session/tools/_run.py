"""Running one call: in a thread of its own (sync tools) or a task (``async def`` tools), bounded
by the tool's ``timeout_s`` and by the turn (its deadline, ``cancel()``, ``interrupt()``).

Whatever happens, a call ends with exactly one outcome: its result, or an error text for the
model (``"error: <ExceptionClass>: <message>"``).  A thread cannot be killed: a tool that outlives
its limit goes on in the background, and what it returns then is logged, never recorded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._tool import Tool

if TYPE_CHECKING:
    from ..backends import CancelToken

__all__ = ["NOT_STARTED", "STOPPED", "CallOutcome", "arun_call", "run_call"]

logger = logging.getLogger("conversation_session")

STOPPED = ("error: the turn was stopped (timeout, cancel or interrupt) while this call ran; "
           "its outcome is unknown")
NOT_STARTED = "error: not run: the turn was stopped before this call"
"""A call the turn's end reached before it started: it never ran (so the model may ask again)."""


@dataclass(frozen=True)
class CallOutcome:
    """How one call ended: ``result`` or ``error`` (the text the model gets), never both."""

    result: str | None
    error: str | None
    duration_s: float
    stopped: bool = False   # the turn ended while it ran

    @property
    def text(self) -> str:
        return self.result if self.result is not None else self.error or ""


def as_text(value: Any) -> str:
    """A tool's return value as the model reads it: a str as is, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def error_text(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}"


def _late(name: str, limit: float | None) -> Any:
    def log(fut: concurrent.futures.Future[Any] | asyncio.Future[Any]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        outcome = error_text(exc) if exc is not None else as_text(fut.result())
        logger.warning("tool %s finished after its limit (%s s) or after its turn ended; not recorded: %.200s",
                       name, limit, outcome)
    return log


def _timeout_error(tool: Tool) -> str:
    return f"error: TimeoutError: {tool.name} did not finish within timeout_s={tool.timeout_s}"


def run_call(tool: Tool, arguments: dict[str, Any], cancel: CancelToken) -> CallOutcome:
    """Run a sync tool in a thread of its own and wait for it, its limit, or the turn's end."""
    if cancel.cancelled:  # the turn ended before the call started (e.g. while approval was asked)
        return CallOutcome(None, NOT_STARTED, 0.0, stopped=True)
    t0 = time.perf_counter()
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    wake = threading.Event()

    def work() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(tool.fn(**arguments))
        except BaseException as exc:  # noqa: BLE001 - becomes the model's error result
            fut.set_exception(exc)

    fut.add_done_callback(lambda _f: wake.set())
    cancel.on_cancel(wake.set)
    threading.Thread(target=work, name=f"tool-{tool.name}", daemon=True).start()
    wake.wait(tool.timeout_s)
    took = time.perf_counter() - t0
    if fut.done():
        exc = fut.exception()
        if exc is not None:
            logger.info("tool %s raised %s: %s", tool.name, type(exc).__name__, exc)
            return CallOutcome(None, error_text(exc), took)
        return CallOutcome(as_text(fut.result()), None, took)
    fut.add_done_callback(_late(tool.name, tool.timeout_s))
    if cancel.cancelled:
        return CallOutcome(None, STOPPED, took, stopped=True)
    return CallOutcome(None, _timeout_error(tool), took)


async def arun_call(tool: Tool, arguments: dict[str, Any], cancel: CancelToken) -> CallOutcome:
    """Run a tool for an event loop: ``async def`` as a task (cancelled at its limit), a plain
    function in a thread of its own; waited for until its limit or the turn's end."""
    if cancel.cancelled:  # the turn ended before the call started (e.g. while approval was asked)
        return CallOutcome(None, NOT_STARTED, 0.0, stopped=True)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    if tool.is_async:
        fut: asyncio.Future[Any] = asyncio.ensure_future(tool.fn(**arguments))
    else:
        cfut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def work() -> None:
            if not cfut.set_running_or_notify_cancel():
                return
            try:
                cfut.set_result(tool.fn(**arguments))
            except BaseException as exc:  # noqa: BLE001
                cfut.set_exception(exc)

        threading.Thread(target=work, name=f"tool-{tool.name}", daemon=True).start()
        fut = asyncio.wrap_future(cfut)
    stop: asyncio.Future[None] = loop.create_future()

    def stopped() -> None:
        if not stop.done():
            stop.set_result(None)

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(stopped)

    cancel.on_cancel(wake)
    try:
        await asyncio.wait({fut, stop}, timeout=tool.timeout_s, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The turn's task was cancelled while the tool ran: an async tool stops with it.
        fut.cancel()
        raise
    took = time.perf_counter() - t0
    if fut.done() and not fut.cancelled():
        exc = fut.exception()
        if exc is not None:
            logger.info("tool %s raised %s: %s", tool.name, type(exc).__name__, exc)
            return CallOutcome(None, error_text(exc), took)
        return CallOutcome(as_text(fut.result()), None, took)
    if tool.is_async:
        fut.cancel()  # a task can be stopped, unlike a thread
    else:
        fut.add_done_callback(_late(tool.name, tool.timeout_s))
    if cancel.cancelled:
        return CallOutcome(None, STOPPED, took, stopped=True)
    return CallOutcome(None, _timeout_error(tool), took)

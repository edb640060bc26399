"""Detached turns: a reply that survives the client that asked for it.

A turn asked with ``"detach": true`` (``POST /v1/sessions/{id}/messages``, ``POST .../retry``)
runs as a task of its own in the worker: a client that disconnects mid-reply (a reloaded or
closed browser tab) stops *following* it, while the turn goes on to completion and is saved.
Without ``detach`` nothing changes: a vanished client cancels the turn, as a voice device expects.

While it runs, anyone with the session's token can follow it (``GET .../live``: what was
written so far, then the rest as it comes) or stop it (``POST .../stop``: the reply is kept as
far as it was written, marked interrupted).  The table of running turns lives in the worker's
memory: with ``--workers N`` a follower that lands on another worker sees ``idle`` and finds the
reply in the history once it is saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.types import Send

from .._exceptions import SessionError
from ._errors import ApiError, result_json, turn_error
from ._log import session_id_var
from ._state import ServiceState

__all__ = ["LiveTurn", "finish_live", "live_turns", "sse_event", "start_live", "start_sse"]

logger = logging.getLogger("conversation_session.service")


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def start_sse(send: Send) -> None:
    """The start of a server-sent-events response (streamed and detached turns alike): never
    cached, never buffered by a proxy in front (``x-accel-buffering``)."""
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no")]})


class LiveTurn:
    """One detached turn: its events so far (pieces of text, and with server-side tools the
    ``tool_call`` / ``tool_result`` events in their place among them), its end (``done`` /
    ``interrupted`` / ``error``)."""

    def __init__(self, sid: str, text: str, *, retry: bool):
        self.sid = sid
        self.text = text
        self.retry = retry
        self.events: list[tuple[str, Any]] = []  # ("piece", text) or (tool event type, its data)
        self.final: tuple[str, dict[str, Any]] | None = None
        self.turn: Any = None
        self.stopped = False
        self.task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def start_event(self) -> dict[str, Any]:
        return {"session_id": self.sid, "text": self.text, "retry": self.retry}

    async def run(self, st: ServiceState, table: dict[str, LiveTurn]) -> None:
        final: tuple[str, dict[str, Any]] = ("error", {
            "code": "cancelled", "message": "the service stopped; nothing of the turn was kept", "status": 503})
        try:
            async with st.reg().hold(self.sid) as session:
                assert session is not None
                turn = session.stream_retry() if self.retry else session.stream(self.text)
                async with turn:
                    self.turn = turn

                    def tool_event(event: dict[str, Any]) -> None:  # a call as it happens, in its place
                        self.events.append((event["type"], {k: v for k, v in event.items() if k != "type"}))
                        self._notify()

                    turn.on_tool(tool_event)
                    async for piece in turn:
                        self.events.append(("piece", piece))
                        self._notify()
                    final = await self._result(st, turn)
        except asyncio.CancelledError:  # the service is shutting down
            st.counters["turns_cancelled"] += 1
            raise
        except Exception as exc:  # noqa: BLE001 - an error event (unknown ones logged by turn_error)
            st.counters["turns_failed"] += 1
            err = turn_error(exc)
            final = ("error", {"code": err.code, "message": err.message, "status": err.status})
        finally:
            self.turn = None
            table.pop(self.sid, None)
            self.final = final
            self._notify()

    async def _result(self, st: ServiceState, turn: Any) -> tuple[str, dict[str, Any]]:
        try:
            result = await turn.result()
        except SessionError:
            if not self.stopped:
                raise
            st.counters["turns_cancelled"] += 1  # stopped before anything was written
            return "interrupted", {"session_id": self.sid, "kept": False}
        st.counters["turns_completed"] += 1
        data = {"session_id": self.sid, **result_json(result)}
        if self.stopped:
            return "interrupted", {**data, "kept": bool(result.response) and result.turn > 0}
        return "done", data

    async def stop(self) -> None:
        """Stop the reply where it is: what was written so far is kept, marked interrupted."""
        turn = self.turn
        if turn is None or self.stopped:
            return
        self.stopped = True
        try:
            await turn.interrupt()
        except (SessionError, ValueError) as exc:
            logger.info("stop: interrupt failed (%s); cancelling the turn", exc)
            turn.cancel()

    async def follow(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """``start``, the turn so far (runs of pieces joined into one ``piece``, tool events as
        they were), each new event, then the end event."""
        yield "start", self.start_event()
        sent = 0
        while True:
            changed = self._changed
            if sent < len(self.events):
                kind, data = self.events[sent]
                if kind != "piece":
                    sent += 1
                    yield kind, data
                    continue
                end = sent
                while end < len(self.events) and self.events[end][0] == "piece":
                    end += 1
                text = "".join(piece for _, piece in self.events[sent:end])
                sent = end
                yield "piece", {"text": text}
                continue
            if self.final is not None:
                yield self.final
                return
            await changed.wait()


def live_turns(app: Starlette) -> dict[str, LiveTurn]:
    """The worker's running detached turns, by session id."""
    table: dict[str, LiveTurn] | None = getattr(app.state, "live_turns", None)
    if table is None:
        table = {}
        app.state.live_turns = table
    return table


def start_live(app: Starlette, st: ServiceState, sid: str, text: str, *, retry: bool) -> LiveTurn:
    """Start a detached turn on ``sid`` (409 while another one runs there)."""
    table = live_turns(app)
    if sid in table:
        raise ApiError(409, "busy", "a reply is still being written in this session; stop it first",
                       headers={"Retry-After": "1"})
    st.reg()  # 503 before anything starts while the model loads
    live = LiveTurn(sid, text, retry=retry)
    table[sid] = live
    session_id_var.set(sid)
    live.task = asyncio.get_running_loop().create_task(live.run(st, table))
    live.task.add_done_callback(_log_failure)
    return live


async def finish_live(app: Starlette, grace: float) -> None:
    """Shutdown: give the running detached turns ``grace`` seconds to complete (and be saved),
    then cancel the rest (nothing of them is kept, as for any turn cut by a shutdown)."""
    tasks = [live.task for live in live_turns(app).values() if live.task is not None]
    if not tasks:
        return
    logger.info("waiting up to %.0f s for %d detached turn(s) to complete", grace, len(tasks))
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(BaseException):
            await task


def _log_failure(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        exc = task.exception()
        if exc is not None:
            logger.error("detached turn failed", exc_info=exc)

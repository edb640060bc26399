"""The WebSocket of a session: ``/v1/sessions/{id}/ws``, for voice devices.

Client to server (JSON text frames)::

    {"type": "message", "text": "..."}          start a turn
    {"type": "interrupt", "heard": "...", "heard_ms": 1200}   stop the reply at once (both optional)
    {"type": "ping"}

Server to client::

    {"type": "ready", "session_id": ...}
    {"type": "piece", "text": ...}               as the reply streams
    {"type": "sentence", "text": ...}            each complete sentence (what a speaker would say)
    {"type": "done", "response", "turn", "figures"}
    {"type": "interrupted", "kept": bool, ...}   after an interrupt
    {"type": "error", "code", "message"}
    {"type": "pong"}

A connection holds its session only while a turn runs, so REST calls and other devices can
use the session between turns.  Disconnecting mid-reply cancels the turn (the backend stops,
nothing of the turn is kept), as a timeout does.  ``interrupt`` calls ``turn.interrupt(heard=,
heard_ms=)`` where the library has it (the heard part is kept), else ``turn.cancel()``
(nothing of the turn is kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from .._exceptions import SessionError
from ..speech import SentenceSplitter
from ._app import ApiError, ServiceState, check_text, result_json, turn_error
from ._log import session_id_var

__all__ = ["session_ws"]

logger = logging.getLogger("conversation_session.service")


class _Conn:
    def __init__(self, ws: WebSocket, state: ServiceState, sid: str):
        self.ws = ws
        self.state = state
        self.sid = sid
        self.send_lock = asyncio.Lock()
        self.task: asyncio.Task[None] | None = None
        self.turn: Any = None
        self.stopped = False

    async def send(self, data: dict[str, Any]) -> None:
        async with self.send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.send_text(json.dumps(data, ensure_ascii=False))

    async def error(self, err: ApiError) -> None:
        await self.send({"type": "error", "code": err.code, "message": err.message, "status": err.status})

    async def run_turn(self, text: str) -> None:
        st = self.state
        final: dict[str, Any]
        try:
            async with st.reg().hold(self.sid) as session:
                assert session is not None
                splitter = SentenceSplitter()
                async with session.stream(text) as turn:
                    self.turn = turn
                    async for piece in turn:
                        if self.stopped:
                            continue
                        await self.send({"type": "piece", "text": piece})
                        for sentence in splitter.feed(piece):
                            await self.send({"type": "sentence", "text": sentence})
                    if self.stopped:
                        final = await self._after_interrupt(turn)
                    else:
                        for sentence in splitter.flush():
                            await self.send({"type": "sentence", "text": sentence})
                        result = await turn.result()
                        st.counters["turns_completed"] += 1
                        final = {"type": "done", "session_id": self.sid, **result_json(result)}
        except asyncio.CancelledError:
            st.counters["turns_cancelled"] += 1
            raise
        except Exception as exc:  # noqa: BLE001 - sent as an error event (unknown ones logged by turn_error)
            st.counters["turns_failed"] += 1
            err = turn_error(exc)
            final = {"type": "error", "code": err.code, "message": err.message, "status": err.status}
        finally:
            self.turn = None
        # Sent once the session is handed back: a client answering at once finds it free.
        await self.send(final)

    async def _after_interrupt(self, turn: Any) -> dict[str, Any]:
        st = self.state
        try:
            result = await turn.result()   # with turn.interrupt(): the heard part, kept
        except SessionError:               # turn.cancel(): nothing kept
            st.counters["turns_cancelled"] += 1
            return {"type": "interrupted", "kept": False}
        kept = bool(result.response) and result.turn > 0
        st.counters["turns_completed" if kept else "turns_cancelled"] += 1
        return {"type": "interrupted", "kept": kept, "session_id": self.sid, **result_json(result)}

    async def interrupt(self, msg: dict[str, Any]) -> None:
        turn = self.turn
        if turn is None or self.stopped:
            return
        self.stopped = True
        if not hasattr(turn, "interrupt"):
            turn.cancel()
            return
        heard = msg.get("heard")
        heard_ms = msg.get("heard_ms")
        if not isinstance(heard, (str, int)) or isinstance(heard, bool):
            heard = None
        if not isinstance(heard_ms, (int, float)) or isinstance(heard_ms, bool) or heard_ms < 0:
            heard_ms = None
        try:
            outcome = turn.interrupt(heard, heard_ms=heard_ms) if heard_ms is not None else turn.interrupt(heard)
            if inspect.isawaitable(outcome):
                await outcome
        except (SessionError, ValueError, TypeError) as exc:  # a "heard" that is not a prefix, ...
            logger.info("interrupt with heard=%r failed (%s); cancelling the turn", heard, exc)
            turn.cancel()


async def session_ws(ws: WebSocket) -> None:
    st: ServiceState = ws.app.state.service
    sid = ws.path_params["sid"]
    try:
        owner = st.owner(ws)
        await st.owned(sid, owner)
        st.reg()
    except ApiError as err:
        # Refused before the handshake completes: the client sees an HTTP status (403).
        logger.info("websocket refused: %s", err.code)
        await ws.close(code=4000 + err.status)
        return
    except Exception as exc:  # noqa: BLE001 - the store is down: refuse, say why in the log
        logger.warning("websocket refused: %s", exc)
        await ws.close(code=1011)
        return
    session_id_var.set(sid)
    await ws.accept()
    conn = _Conn(ws, st, sid)
    await conn.send({"type": "ready", "session_id": sid})
    limit = st.config.max_body_bytes
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                raw = (message.get("bytes") or b"").decode("utf-8", errors="replace")
            if len(raw.encode(errors="replace")) > limit:
                await conn.error(ApiError(413, "too_large", f"a message is at most {limit} bytes"))
                continue
            try:
                msg = json.loads(raw)
                if not isinstance(msg, dict):
                    raise ValueError
            except (ValueError, RecursionError):
                await conn.error(ApiError(400, "bad_json", 'send a JSON object such as {"type": "message", '
                                                           '"text": "hello"}'))
                continue
            kind = msg.get("type")
            if kind == "interrupt":
                await conn.interrupt(msg)
            elif kind == "ping":
                await conn.send({"type": "pong"})
            elif kind == "message":
                try:
                    text = check_text(msg, st.config.max_text_bytes)
                    wait = st.limiter.take(owner)
                    if wait > 0:
                        raise ApiError(429, "rate_limited", f"too many requests; retry in {wait:.1f} s")
                    if conn.task is not None and not conn.task.done():
                        raise ApiError(409, "busy", "a reply is still streaming; interrupt it first")
                except ApiError as err:
                    await conn.error(err)
                    continue
                conn.stopped = False
                conn.task = asyncio.ensure_future(conn.run_turn(text))
            else:
                await conn.error(ApiError(400, "bad_request", f"unknown message type {kind!r}; use message, "
                                                              "interrupt or ping"))
    except WebSocketDisconnect:
        pass
    except RuntimeError:  # receive after the socket closed
        pass
    finally:
        task = conn.task
        if task is not None and not task.done():
            logger.info("websocket closed mid-reply: turn cancelled, nothing kept")
            task.cancel()
        if task is not None:
            with contextlib.suppress(BaseException):
                await task

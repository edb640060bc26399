"""The WebSocket of a session: ``/v1/sessions/{id}/ws``, for voice devices.

Client to server (JSON text frames)::

    {"type": "message", "text": "..."}          start a turn
    {"type": "interrupt", "heard": "...", "heard_ms": 1200}   stop the reply at once (both optional)
    {"type": "ping"}

Server to client::

    {"type": "ready", "session_id": ...}         (+ "audio": "wav" when audio was asked for)
    {"type": "piece", "text": ...}               as the reply streams
    {"type": "sentence", "text": ...}            each complete sentence (what a speaker would say)
    {"type": "tool_call", "id", "name", "arguments"}          a server-side tool is about to run
    {"type": "tool_result", "id", "name", "arguments", "result" | "error", "duration_s"}  its result, recorded
    {"type": "done", "response", "turn", "figures"}
    {"type": "interrupted", "kept": bool, ...}   after an interrupt
    {"type": "error", "code", "message"}
    {"type": "pong"}

With audio (the server runs with ``--tts``, the client connects with ``?audio=wav``), each
sentence's audio follows, in sentence order, without holding up the text::

    {"type": "audio", "sentence": i, "format": "wav", "bytes": n}   then one binary frame of n bytes
    {"type": "audio_end", "sentences": k, "interrupted": bool}     after the turn's last audio

``i`` counts the turn's ``sentence`` events from 0.  ``done`` is sent when the text is complete
(the turn is saved), usually before the last audio.  ``interrupt`` also stops the audio: no
audio frame follows the ``audio_end`` with ``interrupted: true``; with ``heard_ms`` alone, the
heard text is cut by the durations of the audio actually sent.

An ``interrupt`` after ``done`` while that turn's audio is still being sent stops the audio and
cuts the saved reply to what was heard (``cut_last_reply``: kept marked ``interrupted``, the
turn withdrawn if nothing was heard, recorded durably like an undo), then answers::

    {"type": "interrupted", "after_done": true, "cut": bool, "kept": bool, "session_id",
     "response": the reply as the session now holds it ("" when withdrawn), "turn": turns now}

What was heard, in order: the client's ``heard`` (a string that starts the reply, or a number
of characters); else ``heard_ms`` cut by the real durations of the audio sent; else the
sentences whose audio was sent in full.  The last two never go beyond the sentences whose audio
was sent (the client's own ``heard`` is trusted): a device cannot have heard audio it never
got, while a sentence it got may have played (we cannot tell), so it stays -- the rule errs on
keeping what may have been heard, never on keeping what certainly was not.  (A frame still going
out at the instant of the stop is not counted: the cut errs short there.) A ``heard`` that does
not start the reply is ignored (the next rule applies).  Once ``audio_end`` (``interrupted:
false``) was sent the device has the whole reply: an interrupt then changes nothing, and
nothing is answered.  ``cut`` is false when everything sent was heard, or when the session moved
on meanwhile (another device's turn, an undo: the last reply is no longer this one); a store
that cannot record the cut sends an ``error`` event instead (the reply stays whole).  The cut
takes the session as a turn does, so it never interleaves with another turn on it.

Authentication: ``Authorization: Bearer <token>`` on the handshake; a browser, which cannot set
that header, offers the subprotocols ``conversation-session`` and ``bearer.<token>``
(``Sec-WebSocket-Protocol``) and the service selects ``conversation-session`` (the token is never
echoed).  ``?token=`` still works here (only here) for old clients, but puts the token in URLs
and logs; plain HTTP requests must send the header.

A connection holds its session only while a turn runs, so REST calls and other devices can
use the session between turns.  Disconnecting mid-reply cancels the turn (the backend stops,
nothing of the turn is kept), as a timeout does: what a voice device expects.  A client that
wants its reply to outlive it (the web page) uses REST with ``"detach": true`` (see ``_live``).
``interrupt`` calls ``turn.interrupt(heard=, heard_ms=)`` where the library has it (the heard
part is kept), else ``turn.cancel()`` (nothing of the turn is kept).
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
from ..speech import SentenceSplitter, heard_prefix, split_sentence_spans
from ._audio import AUDIO_FORMATS, AudioStream
from ._auth import WS_PROTOCOL
from ._errors import ApiError, result_json, turn_error
from ._log import session_id_var
from ._requests import check_text
from ._state import ServiceState

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
        self.streamed: list[str] = []   # the running turn's pieces (for heard_ms with audio)
        self.audio: AudioStream | None = None
        # The last turn this connection completed, (reply, turn number), until the next message:
        # an interrupt while its audio is still going out cuts it.
        self.committed: tuple[str, int] | None = None

    async def send(self, data: dict[str, Any]) -> None:
        async with self.send_lock:
            if self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.send_text(json.dumps(data, ensure_ascii=False))

    async def send_audio(self, event: dict[str, Any], frame: bytes | None, wanted: Any) -> None:
        """An audio event and its frame back to back; checked under the lock, so nothing of
        audio stopped by an interrupt goes out after the event that reports the stop."""
        async with self.send_lock:
            if wanted() and self.ws.application_state == WebSocketState.CONNECTED:
                await self.ws.send_text(json.dumps(event, ensure_ascii=False))
                if frame is not None:
                    await self.ws.send_bytes(frame)

    async def error(self, err: ApiError) -> None:
        await self.send({"type": "error", "code": err.code, "message": err.message, "status": err.status})

    async def _tool_event(self, event: dict[str, Any]) -> None:
        """A ``tool_call`` (about to run) or ``tool_result`` (recorded) event, as it happens."""
        if not self.stopped:
            await self.send(event)

    async def run_turn(self, text: str) -> None:
        st = self.state
        final: dict[str, Any]
        audio = self.audio
        audio_started = False
        self.streamed = []
        self.committed = None
        try:
            async with (await st.wait_ready()).hold(self.sid) as session:
                assert session is not None
                splitter = SentenceSplitter()
                async with session.stream(text) as turn:
                    self.turn = turn
                    turn.on_tool(self._tool_event)
                    if audio is not None:
                        audio.start_turn()
                        audio_started = True
                    async for piece in turn:
                        if self.stopped:
                            continue
                        self.streamed.append(piece)
                        await self.send({"type": "piece", "text": piece})
                        for sentence in splitter.feed(piece):
                            await self._sentence(sentence)
                    if self.stopped:
                        final = await self._after_interrupt(turn)
                    else:
                        for sentence in splitter.flush():
                            await self._sentence(sentence)
                        result = await turn.result()
                        st.counters["turns_completed"] += 1
                        self.committed = (result.response, result.turn)
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
            if audio is not None and audio_started and not self.stopped:
                audio.end_turn()  # audio_end follows the turn's last audio (none after an interrupt)
        # Sent once the session is handed back: a client answering at once finds it free.
        await self.send(final)

    async def _sentence(self, sentence: str) -> None:
        await self.send({"type": "sentence", "text": sentence})
        if self.audio is not None and not self.stopped:
            self.audio.sentence(sentence)

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
        running = turn is not None and not self.stopped
        heard = msg.get("heard")
        heard_ms = msg.get("heard_ms")
        if not isinstance(heard, (str, int)) or isinstance(heard, bool):
            heard = None
        if not isinstance(heard_ms, (int, float)) or isinstance(heard_ms, bool) or heard_ms < 0:
            heard_ms = None
        if self.audio is not None:
            if running and heard is None and heard_ms is not None:
                # The device played our audio: its sentences' real durations place the cut
                # better than the library's estimate from the speaking rate.
                heard = heard_prefix("".join(self.streamed), heard_ms, self.audio.durations()).text
                heard_ms = None
            if running:
                self.stopped = True  # before stop(): no sentence of this turn is queued after it
            durations = self.audio.durations()  # before stop(): what went out of this turn's audio
            end = await self.audio.stop()
            if end is not None:
                await self.send(end)
                committed = self.committed
                if not running and committed is not None:
                    # After done: the saved reply is cut to what its stopped audio let be heard.
                    self.committed = None
                    await self._cut_committed(committed, heard, heard_ms, durations)
        if not running:
            return
        self.stopped = True
        if not hasattr(turn, "interrupt"):
            turn.cancel()
            return
        try:
            outcome = turn.interrupt(heard, heard_ms=heard_ms) if heard_ms is not None else turn.interrupt(heard)
            if inspect.isawaitable(outcome):
                await outcome
        except (SessionError, ValueError, TypeError) as exc:  # a "heard" that is not a prefix, ...
            logger.info("interrupt with heard=%r failed (%s); cancelling the turn", heard, exc)
            turn.cancel()


    async def _cut_committed(self, committed: tuple[str, int], heard: str | int | None, heard_ms: float | None,
                             durations: list[float | None]) -> None:
        reply, turn_no = committed
        text = _heard_after_done(reply, heard, heard_ms, durations)
        event: dict[str, Any] = {"type": "interrupted", "after_done": True, "cut": False, "kept": True,
                                 "session_id": self.sid}
        try:
            # Held like a turn: nothing else runs on the session while the cut is checked and made.
            async with (await self.state.wait_ready()).hold(self.sid) as session:
                assert session is not None
                history = session.history
                if session.turns != turn_no or not history or history[-1].get("role") != "assistant" \
                        or history[-1].get("content") != reply:
                    logger.info("interrupt after done: the session moved on since; nothing cut")
                else:
                    event["cut"] = await session.cut_last_reply(text)
                history = session.history
                event["turn"] = session.turns
                last = history[-1] if history and history[-1].get("role") == "assistant" else None
                if event["cut"]:
                    event["kept"] = last is not None and session.turns == turn_no
                    event["response"] = last["content"] if event["kept"] and last is not None else ""
                elif last is not None and last.get("content") == reply:
                    event["response"] = reply  # all of it was heard
        except Exception as exc:  # noqa: BLE001 - sent as an error event; the reply stays whole
            err = turn_error(exc)
            logger.warning("interrupt after done: the reply could not be cut (%s)", err.message)
            await self.error(err)
            return
        await self.send(event)


def _heard_after_done(reply: str, heard: str | int | None, heard_ms: float | None,
                      durations: list[float | None]) -> str:
    """What of ``reply`` was heard when its audio stopped after ``durations`` (one entry per
    sentence sent or failed), by the rule of the module docstring."""
    spans = split_sentence_spans(reply)
    sent = min(len(durations), len(spans))
    ceiling = reply[:spans[sent - 1].end] if sent else ""  # the sentences whose audio went out
    if isinstance(heard, int) and not isinstance(heard, bool):
        return reply[:max(heard, 0)]
    if isinstance(heard, str):
        if reply.startswith(heard):
            return heard
        logger.info("interrupt after done: heard=%r does not start the reply; ignored", heard[:40])
    if heard_ms is not None:
        text = heard_prefix(reply, heard_ms, durations).text
        return text if len(text) < len(ceiling) else ceiling
    return ceiling


async def session_ws(ws: WebSocket) -> None:
    st: ServiceState = ws.app.state.service
    sid = ws.path_params["sid"]
    try:
        owner = await st.owner(ws)
        await st.owned(sid, owner)
        await st.wait_ready()
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
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
    # A page authenticates with the subprotocol bearer.<token>: the handshake must then select
    # a protocol it offered -- the plain one, so the token is never sent back.
    await ws.accept(subprotocol=WS_PROTOCOL if WS_PROTOCOL in offered else None)
    conn = _Conn(ws, st, sid)
    wanted = (ws.query_params.get("audio") or "none").lower()
    problem = None
    if wanted in AUDIO_FORMATS:
        if st.tts_engine is not None and st.tts_pool is not None:
            conn.audio = AudioStream(st.tts_engine, st.tts_pool, conn.send_audio)
        else:
            problem = ApiError(400, "audio_unavailable", "this server does not synthesise speech (start it with "
                                                         "--tts); replies come as text only")
    elif wanted not in ("none", "off", "0", "false"):
        problem = ApiError(400, "bad_request", f"audio={wanted!r} is not offered; use audio=wav (or none)")
    ready: dict[str, Any] = {"type": "ready", "session_id": sid}
    if conn.audio is not None:
        ready["audio"] = "wav"
    await conn.send(ready)
    if problem is not None:
        await conn.error(problem)
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
                    await st.limit(owner)
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
        if conn.audio is not None:
            # Stops the synthesis and waits for it: no engine process outlives the connection.
            await conn.audio.aclose()

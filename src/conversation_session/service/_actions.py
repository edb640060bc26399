"""REST beyond a turn, for the web page and any client: undo, retry, rename, search, stats, and
the detached turns of ``_live`` (follow one, stop one).

    POST  /v1/sessions/{id}/undo                  withdraw the last turn (durably)
    POST  /v1/sessions/{id}/retry                 ask the last user message again (body as a message's:
                                                  "stream", "detach")
    PATCH /v1/sessions/{id}     {"title": "..."}  rename (null: no title)
    GET   /v1/sessions/{id}/stats                 the context figures (tokens in the window, cache)
    GET   /v1/sessions/{id}/live                  server-sent events: the detached reply being written
    POST  /v1/sessions/{id}/stop                  stop the detached reply (kept as far as written)
    POST  /v1/sessions/{id}/cut   {"heard", "turn"}  barge-in after the reply was saved: keep it
                                                  as far as it was heard (the page played it)
    GET   /v1/search?q=...                        this token's sessions holding the text
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .._exceptions import SessionError
from ..stores._record import clean_title
from ._errors import ApiError, ClientGone, result_json, turn_error
from ._live import LiveTurn, live_turns, sse_event, start_live, start_sse
from ._requests import read_json, run_watched
from ._state import state_of

__all__ = ["detached_turn", "get_live", "get_stats", "patch_session", "post_cut", "post_retry", "post_stop",
           "post_undo", "search_sessions"]

logger = logging.getLogger("conversation_session.service")

MAX_TITLE_CHARS = 200


def _flag(data: dict[str, Any], name: str) -> bool:
    value = data.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, "bad_request", f'"{name}" must be true or false')
    return value


class FollowStream(Response):
    """A detached turn as server-sent events (``start``, ``piece`` ..., then ``done``,
    ``interrupted`` or ``error``).  A client that goes away stops following; the turn goes on."""

    def __init__(self, live: LiveTurn):
        super().__init__(status_code=200, media_type="text/event-stream")
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await start_sse(send)
        try:
            await run_watched(self._produce(send), receive)
        except ClientGone:
            logger.info("client stopped following a detached reply: the turn goes on and will be saved")
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _produce(self, send: Send) -> None:
        async for event, data in self.live.follow():
            await send({"type": "http.response.body", "body": sse_event(event, data), "more_body": True})


async def detached_turn(request: Request, sid: str, text: str, *, stream: bool, retry: bool = False) -> Response:
    """Start a detached turn (the caller checked ownership) and follow it."""
    st = state_of(request)
    await st.wait_ready()  # a request arriving while the model loads waits for it (bounded)
    live = start_live(request.app, st, sid, text, retry=retry)
    if stream:
        return FollowStream(live)
    end: list[tuple[str, dict[str, Any]]] = []

    async def wait_end() -> None:
        async for event, data in live.follow():
            if event not in ("start", "piece"):
                end.append((event, data))

    try:
        await run_watched(wait_end(), request.receive)
    except ClientGone:
        return Response(status_code=499)  # the turn goes on and is saved
    event, data = end[0]
    if event == "error":
        raise ApiError(data["status"], data["code"], data["message"])
    return JSONResponse(data)


async def post_retry(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    data = await read_json(request, st.config.max_body_bytes, optional=True)
    stream, detach = _flag(data, "stream"), _flag(data, "detach")
    await st.owned(sid, owner)
    if detach:
        return await detached_turn(request, sid, "", stream=stream, retry=True)
    if stream:
        raise ApiError(400, "bad_request", 'a streamed retry is a detached one: send "detach": true too')
    try:
        async with (await st.wait_ready()).hold(sid) as session:
            assert session is not None
            result = await run_watched(session.retry(), request.receive)
    except ClientGone:
        return Response(status_code=499)
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer
        raise turn_error(exc) from None
    return JSONResponse({"session_id": sid, **result_json(result)})


async def post_undo(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    await read_json(request, st.config.max_body_bytes, optional=True)
    await st.owned(sid, owner)
    if sid in live_turns(request.app):
        raise ApiError(409, "busy", "a reply is still being written; stop it first", headers={"Retry-After": "1"})
    try:
        async with (await st.wait_ready()).hold(sid) as session:
            assert session is not None
            undone = await session.undo()
            turns = session.turns
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer
        raise turn_error(exc) from None
    return JSONResponse({"session_id": sid, "undone": undone, "turns": turns})


async def patch_session(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    data = await read_json(request, st.config.max_body_bytes)
    if "title" not in data:
        raise ApiError(400, "bad_request", 'send {"title": "..."} (null removes the title)')
    title = data["title"]
    if title is not None and not isinstance(title, str):
        raise ApiError(400, "bad_request", '"title" must be a string or null')
    if title is not None and len(title) > MAX_TITLE_CHARS:
        raise ApiError(413, "too_large", f'"title" is over {MAX_TITLE_CHARS} characters')
    try:
        clean = clean_title(title)
    except ValueError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    entry = await st.owned(sid, owner)
    if not entry.get("store_id"):
        raise ApiError(409, "empty_session", "the session has no turn yet; send a message first, then rename it")
    try:
        async with (await st.wait_ready()).hold(sid) as session:
            assert session is not None
            saved = await session.set_title(clean)
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer
        raise turn_error(exc) from None
    if not saved:
        raise ApiError(503, "store_unavailable", "the title could not be saved; retry", headers={"Retry-After": "2"})
    return JSONResponse({"session_id": sid, "title": clean})


async def get_stats(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    await st.owned(sid, owner)
    if sid in live_turns(request.app):
        raise ApiError(409, "busy", "a reply is being written; ask again when it is done", headers={"Retry-After": "1"})
    try:
        async with (await st.wait_ready()).hold(sid) as session:
            assert session is not None
            stats = await session.get_cache_stats()
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer
        raise turn_error(exc) from None
    return JSONResponse({"session_id": sid, "stats": _jsonable(stats)})


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


async def get_live(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    entry = await st.owned(sid, owner)
    live = live_turns(request.app).get(sid)
    if live is not None and live.final is None:
        return FollowStream(live)
    turns = 0
    if entry.get("store_id"):
        turns = (await st.record(entry, sid)).turns
    body = sse_event("idle", {"session_id": sid, "turns": turns})
    return Response(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def post_stop(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    await read_json(request, st.config.max_body_bytes, optional=True)
    await st.owned(sid, owner)
    live = live_turns(request.app).get(sid)
    if live is None or live.final is not None:
        return JSONResponse({"session_id": sid, "stopped": False})
    await live.stop()
    return JSONResponse({"session_id": sid, "stopped": True})


async def post_cut(request: Request) -> Response:
    """Cut the saved last reply to what was heard (a player that buffered the whole reply's audio
    stops it later than the WebSocket could know): ``heard`` starts the reply, ``turn`` is the
    turn count it was the last of (anything else: the session moved on, 409, nothing cut)."""
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    data = await read_json(request, st.config.max_body_bytes)
    heard, turn = data.get("heard"), data.get("turn")
    if not isinstance(heard, str):
        raise ApiError(400, "bad_request", '"heard" must be the start of the last reply that was heard')
    if not isinstance(turn, int) or isinstance(turn, bool):
        raise ApiError(400, "bad_request", '"turn" must be the turn number of that reply')
    await st.owned(sid, owner)
    if sid in live_turns(request.app):
        raise ApiError(409, "busy", "a reply is being written; stop it instead", headers={"Retry-After": "1"})
    try:
        async with (await st.wait_ready()).hold(sid) as session:
            assert session is not None
            history = session.history
            last = history[-1] if history and history[-1].get("role") == "assistant" else None
            if last is None or session.turns != turn:
                raise ApiError(409, "moved_on", "the session moved on since that reply; nothing was cut")
            if not last["content"].startswith(heard):
                raise ApiError(400, "bad_request", '"heard" does not start the last reply')
            cut = await session.cut_last_reply(heard)
            history = session.history
            last = history[-1] if history and history[-1].get("role") == "assistant" else None
            kept = last is not None and session.turns == turn
            return JSONResponse({"session_id": sid, "cut": cut, "kept": kept, "turn": session.turns,
                                 "response": last["content"] if kept and last is not None else ""})
    except ApiError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer
        raise turn_error(exc) from None


async def search_sessions(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    text = request.query_params.get("q", "")
    if not text.strip():
        raise ApiError(400, "bad_request", "search for what? give ?q=<text>")
    if len(text) > 200:
        raise ApiError(413, "too_large", "the search text is over 200 characters")
    store, owners = st.tables()
    mine = {e.get("store_id"): sid for sid, e in await st.io(owners.list, owner) if e.get("store_id")}
    try:
        hits = await st.io(lambda: store.search(text, limit=100, only=list(mine)))
    except (SessionError, ValueError) as exc:
        raise turn_error(exc) from None
    out = [{"session_id": mine[h.session_id], "title": h.title, "updated_at": h.updated_at, "index": h.index,
            "role": h.role, "snippet": h.snippet} for h in hits if h.session_id in mine]
    return JSONResponse({"query": text, "hits": out[:100]})

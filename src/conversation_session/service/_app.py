"""The ASGI app: the factory (every route, behind the guard) and the native REST/SSE routes
under /v1; the other surfaces (Home Assistant, Ollama, OpenAI, the page) are modules of their own.

Every response to a bad request is a 4xx with a JSON body ``{"error": {"code", "message"},
"request_id"}``; an unexpected failure is a 500 with the same shape (the traceback goes to the
log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._exceptions import (
    SessionError,
    SessionLockedError,
)
from ..backends import Backend
from ..memory._kvcache import remove_kv_file
from ..session._aio import AsyncConversationSession
from ..stores import StoreAPI
from ..stores._file import encode_snapshot
from ._actions import detached_turn
from ._compat import PathToken
from ._config import CONFIG_ENV, ServiceConfig
from ._errors import ApiError, ClientGone, result_json, turn_error
from ._guard import Guard
from ._ha import ha_process
from ._handoff import ask_release, holder_pid
from ._live import finish_live, sse_event, start_sse
from ._log import request_id_var, session_id_var, setup_json_logging
from ._ollama_api import ollama_routes
from ._openai_api import openai_routes
from ._openapi import openapi_document
from ._registry import Busy, Gone
from ._requests import chat_watched, check_text, read_json, run_watched
from ._state import ServiceState, state_of
from ._web import web_routes
from ._ws import session_ws

__all__ = ["app_from_env", "create_app"]

logger = logging.getLogger("conversation_session.service")

_RID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


# -- REST ---------------------------------------------------------------------------------------------
async def healthz(request: Request) -> Response:
    st = state_of(request)
    reg = st.registry
    return JSONResponse({
        "status": "ok", "pid": os.getpid(), "ready": st.ready.is_set(),
        "open_sessions": reg.open_count if reg else 0, "busy_sessions": reg.busy_count if reg else 0,
        **st.counters,
        "backend_cancelled": getattr(st.backend, "cancelled", None),
    })


async def readyz(request: Request) -> Response:
    st = state_of(request)
    if not st.ready.is_set():
        raise ApiError(503, "not_ready", st.startup_error or "the model is still loading", headers={"Retry-After": "2"})
    store, owners = st.tables()
    try:
        await asyncio.wait_for(st.io(store.is_locked, "readyz_probe"), 5.0)
        await asyncio.wait_for(st.io(owners.check), 5.0)
    except (SessionError, OSError, asyncio.TimeoutError) as exc:
        raise ApiError(503, "store_unavailable", f"the store is unreachable: {exc or 'timeout'}",
                       headers={"Retry-After": "2"}) from None
    assert st.backend is not None
    return JSONResponse({"status": "ready", "backend": st.backend.name, "model": st.backend.model_name,
                         "store": store.description})


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


async def create_session(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    data = await read_json(request, st.config.max_body_bytes, optional=True)
    persona = None
    if data.get("system_prompt") is not None:
        persona = check_text(data, st.config.max_text_bytes, "system_prompt")
    _, owners = st.tables()
    sid, entry = await st.io(owners.create, owner, None, persona)
    session_id_var.set(sid)
    logger.info("session created")
    return JSONResponse({"session_id": sid, "created_at": entry["created_at"]}, status_code=201,
                        headers={"Location": f"/v1/sessions/{sid}"})


async def list_sessions(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    store, owners = st.tables()
    mine = await st.io(owners.list, owner)
    infos = {}
    if any(e.get("store_id") for _, e in mine):
        infos = {i.session_id: i for i in await st.io(store.list_sessions)}
    out = []
    for sid, entry in mine:
        info = infos.get(entry.get("store_id") or "")
        out.append({
            "session_id": sid, "created_at": info.created_at if info else entry["created_at"],
            "updated_at": info.updated_at if info else entry["created_at"],
            "turns": info.turns if info else 0, "total_messages": info.total_messages if info else 0,
            "first_user_line": info.first_user_line if info else "", "title": info.title if info else None,
        })
    out.sort(key=lambda s: (s["updated_at"], s["session_id"]), reverse=True)
    return JSONResponse({"sessions": out})


async def get_session(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    entry = await st.owned(sid, owner)
    record = await st.record(entry, sid)
    return JSONResponse({
        # The saved session's own dates once it has a turn (the file shows the same ones).
        "session_id": sid, "created_at": record.created_at, "updated_at": record.updated_at or record.created_at,
        "title": record.title,
        "turns": record.turns, "total_messages": len(record.messages), "llm_model": record.llm_model or None,
        "system_prompt": record.system_prompt, "store_session_id": entry.get("store_id"),
        "memory": st.config.memory,
        "summary": record.summary["text"] if record.summary else None,
        "summarized_turns": sum(1 for m in record.messages[:record.summary["covers"]] if m["role"] == "user")
        if record.summary else 0,
        "history": record.messages,
    })


async def export_session(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    entry = await st.owned(sid, owner)
    fmt = request.query_params.get("format", "json")
    if fmt not in ("json", "md"):
        raise ApiError(400, "bad_request", "format is json (the session file) or md (Markdown)")
    record = await st.record(entry, sid)
    record.session_id = sid
    if fmt == "md":
        from ..cli._export import render_markdown  # here: the cli package is not the service's to load
        return Response(render_markdown(record).encode(), media_type="text/markdown; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{sid}.md"'})
    body = encode_snapshot(record, record.messages)
    return Response(body, media_type="application/json; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{sid}.json"'})


async def delete_session(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    entry = await st.owned(sid, owner)
    store, owners = st.tables()
    deadline = time.monotonic() + st.config.lock_wait_s
    try:
        async with (await st.wait_ready()).hold(sid, open_session=False):
            # Freshly read: another worker may have bound a store session meanwhile.
            entry = await st.owned(sid, owner)
            store_id = entry.get("store_id")
            while store_id:
                try:
                    if await st.io(store.delete, store_id):
                        await st.io(remove_kv_file, store, store_id)
                    break
                except SessionLockedError as exc:
                    pid = holder_pid(exc.holder)
                    if pid is not None:
                        ask_release(pid, store_id)  # another worker here keeps it open: ask it to let go
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.02)
            await st.io(owners.remove, sid)
    except (Busy, SessionLockedError, Gone) as exc:
        raise turn_error(exc) from None
    logger.info("session deleted")
    return JSONResponse({"session_id": sid, "deleted": True})


async def post_message(request: Request) -> Response:
    st = state_of(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    data = await read_json(request, st.config.max_body_bytes)
    text = check_text(data, st.config.max_text_bytes)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "bad_request", '"stream" must be true or false')
    detach = data.get("detach", False)
    if not isinstance(detach, bool):
        raise ApiError(400, "bad_request", '"detach" must be true or false')
    await st.owned(sid, owner)
    if detach:  # the turn completes and is saved even if this client goes away (see _live)
        return await detached_turn(request, sid, text, stream=stream)
    reg = await st.wait_ready()
    if stream:
        hold = reg.hold(sid)
        try:
            session = await hold.__aenter__()
        except (SessionError, ValueError, Busy, Gone) as exc:
            raise turn_error(exc) from None
        assert session is not None
        return TurnStream(st, hold, session, text)

    try:
        result = await chat_watched(reg, sid, text, request.receive)
    except ClientGone:
        st.counters["turns_cancelled"] += 1
        logger.info("client disconnected mid-turn: turn cancelled, nothing kept")
        return Response(status_code=499)
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer (unknown ones logged there)
        st.counters["turns_failed"] += 1
        raise turn_error(exc) from None
    st.counters["turns_completed"] += 1
    return JSONResponse({"session_id": sid, **result_json(result)})


class TurnStream(Response):
    """A turn as server-sent events: ``piece`` events, then one ``done`` (or ``error``).  Written
    as its own ASGI response so the session is always handed back, and a client that
    disconnects mid-reply cancels the turn (nothing of it is kept)."""

    def __init__(self, state: ServiceState, hold: Any, session: AsyncConversationSession, text: str):
        super().__init__(status_code=200, media_type="text/event-stream")
        self.state = state
        self.hold = hold
        self.session = session
        self.text = text

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        st = self.state
        failure: BaseException | None = None
        try:
            await start_sse(send)
            try:
                await run_watched(self._produce(send), receive)
            except ClientGone:
                st.counters["turns_cancelled"] += 1
                logger.info("client disconnected mid-stream: turn cancelled, nothing kept")
                return
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException as exc:
            failure = exc
            raise
        finally:
            with contextlib.suppress(BaseException):
                await self.hold.__aexit__(type(failure) if failure else None, failure,
                                          failure.__traceback__ if failure else None)

    async def _produce(self, send: Send) -> None:
        st = self.state
        try:
            async with self.session.stream(self.text) as turn:
                async def tool_event(event: dict[str, Any]) -> None:  # sent as the call happens
                    await send({"type": "http.response.body", "more_body": True,
                                "body": sse_event(event["type"], {k: v for k, v in event.items() if k != "type"})})

                turn.on_tool(tool_event)
                async for piece in turn:
                    await send({"type": "http.response.body", "body": sse_event("piece", {"text": piece}),
                                "more_body": True})
                result = await turn.result()
        except (SessionError, ValueError, Busy, Gone) as exc:
            st.counters["turns_failed"] += 1
            err = turn_error(exc)
            await send({"type": "http.response.body", "more_body": True,
                        "body": sse_event("error", {**err.body()["error"], "status": err.status})})
            return
        st.counters["turns_completed"] += 1
        await send({"type": "http.response.body", "more_body": True,
                    "body": sse_event("done", {"session_id": self.hold_sid, **result_json(result)})})

    @property
    def hold_sid(self) -> str | None:
        return session_id_var.get()


# -- plumbing ------------------------------------------------------------------------------------------
class RequestContext:
    """Outermost layer: the request id (X-Request-ID, echoed or made), one log line per
    request, and the last word on errors: JSON, never a traceback."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", []):
            if name == b"x-request-id":
                given = value.decode("latin-1")
        rid = given if given and _RID_RE.fullmatch(given) else uuid.uuid4().hex[:16]
        request_id_var.set(rid)
        session_id_var.set(None)
        t0 = time.perf_counter()
        status: list[int] = []

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "websocket.accept":
                status.append(101)
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "websocket.http.response.start":  # a handshake refused (_guard)
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if scope["type"] == "http" and not status:
                err = turn_error(exc) if isinstance(exc, SessionError | ApiError) else None
                if err is None:
                    logger.error("unhandled error", exc_info=exc)
                    err = ApiError(500, "internal", "internal error; see the server log for this request id")
                with contextlib.suppress(Exception):
                    await err.response()(scope, receive, send_with_id)
            elif not isinstance(exc, OSError):
                logger.error("error after the response started", exc_info=exc)
        finally:
            if scope.get("path") not in ("/healthz", "/readyz"):
                logger.info("%s %s %s", scope.get("method", "WS"), scope.get("path"), status[0] if status else "-",
                            extra={"status": status[0] if status else None,
                                   "ms": round((time.perf_counter() - t0) * 1000, 2)})


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})).response()


def create_app(config: ServiceConfig | None = None, *, backend: Backend | None = None,
               store: StoreAPI | None = None) -> Starlette:
    """The service as an ASGI app (one worker).  ``backend``/``store`` objects may be given
    (tests, embedding in a host); otherwise they are built from ``config``."""

    cfg = config or ServiceConfig()
    state = ServiceState(cfg, backend=backend, store=store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await finish_live(app, cfg.shutdown_grace_s)  # detached turns: the grace, then cancelled
            await state.stop()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/sessions", create_session, methods=["POST"]),
        Route("/v1/sessions", list_sessions, methods=["GET"]),
        Route("/v1/sessions/{sid}", get_session, methods=["GET"]),
        Route("/v1/sessions/{sid}", delete_session, methods=["DELETE"]),
        Route("/v1/sessions/{sid}/messages", post_message, methods=["POST"]),
        Route("/v1/sessions/{sid}/export", export_session, methods=["GET"]),
        WebSocketRoute("/v1/sessions/{sid}/ws", session_ws),
        Route("/api/conversation/process", ha_process, methods=["POST"]),
        *web_routes(),
        *ollama_routes(),   # Ollama's API (_ollama_api), and OpenAI's (_openai_api), over the same sessions
        *openai_routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error})
    app.state.service = state
    app.add_middleware(Guard, config=cfg)  # before routing, inside RequestContext (request id, log line)
    app.add_middleware(RequestContext)
    app.add_middleware(PathToken)  # outermost: the token leaves the path before anything logs it
    return app


def app_from_env() -> Starlette:
    """The app factory each ``uvicorn --workers N`` process calls (config from the environment)."""
    text = os.environ.get(CONFIG_ENV)
    cfg = ServiceConfig.from_env(text) if text else ServiceConfig()
    setup_json_logging(cfg.log_level, cfg.log_format)
    return create_app(cfg)

"""The ASGI app: REST under /v1, the Home Assistant-shaped endpoint, health, OpenAPI.

Every response to a bad request is a 4xx with a JSON body ``{"error": {"code", "message"},
"request_id"}``; an unexpected failure is a 500 with the same shape (the traceback goes to the
log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._exceptions import (
    BackendError,
    SessionError,
    SessionLockedError,
    SessionNotFoundError,
    SessionTimeoutError,
    StoreUnavailableError,
)
from .._result import ChatResult
from ..backends import Backend, FakeBackend, create_backend
from ..session._aio import AsyncConversationSession
from ..speech import EspeakEngine, SpeechEngine
from ..stores import StoreAPI, is_postgres_url, is_session_id, open_store
from ..stores._file import HistoryStore, encode_snapshot
from ..stores._record import SessionRecord, is_utf8_text
from ._auth import Authenticator, RateLimiter
from ._config import CONFIG_ENV, ServiceConfig
from ._handoff import ask_release, holder_pid
from ._log import request_id_var, session_id_var, setup_json_logging
from ._openapi import openapi_document
from ._owners import FileOwners, OwnerTable, PostgresOwners
from ._registry import Busy, Gone, Registry

__all__ = ["ApiError", "ServiceState", "app_from_env", "create_app", "result_json"]

logger = logging.getLogger("conversation_session.service")

_RID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_GENERATED_RE = re.compile(r"c[0-9a-f]{24}|[0-9A-HJKMNP-TV-Z]{26}")  # ours, or a ULID (Home Assistant's)


class ApiError(Exception):
    """An error answer: HTTP status, a stable code, a message saying what to do."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra},
                "request_id": request_id_var.get()}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected while its turn ran: the turn was cancelled."""


def result_json(result: ChatResult) -> dict[str, Any]:
    out = {
        "response": result.response,
        "turn": result.turn,
        "figures": {
            "ttft_s": result.ttft_s, "total_s": result.total_s, "prompt_tokens": result.prompt_tokens,
            "cached_tokens": result.cached_tokens, "completion_tokens": result.completion_tokens,
            "saved": result.saved, "finish_reason": result.finish_reason, "trimmed_turns": result.trimmed_turns,
        },
    }
    if getattr(result, "interrupted", False):  # barge-in: what reached the user was kept
        out["interrupted"] = True
        out["heard_fraction"] = getattr(result, "heard_fraction", None)
    return out


def turn_error(exc: BaseException) -> ApiError:
    """A library error as the answer a client can act on."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, SessionTimeoutError):
        return ApiError(504, "timeout", str(exc), extra={"partial_response": exc.partial_response})
    if isinstance(exc, (Busy, SessionLockedError)):
        return ApiError(409, "busy", str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, Gone):
        return ApiError(404, "not_found", "no such session")
    if isinstance(exc, BackendError):
        return ApiError(502, "backend_error", str(exc))
    if isinstance(exc, StoreUnavailableError):
        return ApiError(503, "store_unavailable", str(exc), headers={"Retry-After": "2"})
    if isinstance(exc, ValueError):
        return ApiError(400, "invalid_text", str(exc))
    if isinstance(exc, SessionError):
        return ApiError(500, "session_error", str(exc))
    logger.error("unexpected error", exc_info=exc)
    return ApiError(500, "internal", "internal error; see the server log for this request id")


class _WordFake(FakeBackend):
    """The fake backend, streaming its reply word by word (so streaming, sentence events and
    interrupts have something to cut)."""

    def _start(self, request: Any) -> Any:
        plan = super()._start(request)
        text = "".join(plan.pieces)
        plan.pieces = re.findall(r"\S+\s*", text) or [text]
        return plan


def make_backend(config: ServiceConfig) -> Backend:
    if config.backend == "fake":
        return _WordFake(piece_delay=config.fake_delay, context_length=config.fake_context)
    return create_backend(config.backend, config.model, base_url=config.base_url)


def make_store(config: ServiceConfig) -> StoreAPI:
    url = config.store
    if config.lease_ttl_s is not None and is_postgres_url(url):
        return open_store(url, lease_ttl_s=config.lease_ttl_s)
    return open_store(url, config.sessions_dir)


def make_owners(store: StoreAPI, config: ServiceConfig) -> OwnerTable:
    if isinstance(store, HistoryStore):
        return FileOwners(store.directory)
    url = getattr(store, "url", None)
    if is_postgres_url(url):
        return PostgresOwners(url, description=store.description)
    raise ValueError(f"the service needs an ownership table for {store.description}; "
                     "use the file store or PostgreSQL")


class ServiceState:
    """What one worker holds: config, backend, store, ownership table, open sessions, counters."""

    def __init__(self, config: ServiceConfig, *, backend: Backend | None = None, store: StoreAPI | None = None):
        self.config = config
        self.auth = Authenticator(config.tokens)
        self.limiter = RateLimiter(config.rate, config.burst)
        self._given_backend = backend
        self._given_store = store
        self.backend: Backend | None = None
        self.store: StoreAPI | None = None
        self.owners: OwnerTable | None = None
        self.registry: Registry | None = None
        self.ready = asyncio.Event()
        self.startup_error: str | None = None
        self.counters = {"turns_completed": 0, "turns_cancelled": 0, "turns_failed": 0, "requests": 0}
        self._loader: asyncio.Task[None] | None = None
        # Speech for WebSocket clients that ask for audio (--tts): one engine, and a pool of its
        # own so synthesis never queues behind store calls (nor they behind it).
        self.tts_engine: SpeechEngine | None = None
        self.tts_pool: ThreadPoolExecutor | None = None
        if config.tts == "espeak":
            self.tts_engine = EspeakEngine(rate=config.tts_rate, voice=config.tts_voice)
            self.tts_pool = ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1)),
                                               thread_name_prefix="cs-tts")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        store = self._given_store
        if store is None:
            store = await loop.run_in_executor(None, make_store, cfg)
        self.owners = await loop.run_in_executor(None, make_owners, store, cfg)
        self.store = store
        self._loader = loop.create_task(self._load_backend())

    async def _load_backend(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            t0 = time.perf_counter()
            backend = self._given_backend
            if backend is None:
                backend = await loop.run_in_executor(None, make_backend, self.config)
            await backend.acheck()
            assert self.store is not None and self.owners is not None
            self.backend = backend
            self.registry = Registry(self.config, self.store, backend, self.owners)
            await self.registry.start()
            self.ready.set()
            logger.info("ready: backend %s (%s) in %.2f s, store %s", backend.name, backend.model_name,
                        time.perf_counter() - t0, self.store.description)
        except Exception as exc:  # noqa: BLE001 - reported by /readyz and the log
            self.startup_error = str(exc)
            logger.error("the backend could not start: %s", exc)

    async def stop(self) -> None:
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            with contextlib.suppress(BaseException):
                await self._loader
        if self.registry is not None:
            await self.registry.close(self.config.shutdown_grace_s)
        loop = asyncio.get_running_loop()
        if self.owners is not None:
            await loop.run_in_executor(None, self.owners.close)
        if self.backend is not None and self._given_backend is None:
            await self.backend.aclose()
        if self.store is not None and self._given_store is None:
            await loop.run_in_executor(None, self.store.close)
        if self.tts_pool is not None:
            self.tts_pool.shutdown(wait=True)  # connections have closed: their processes are gone
        logger.info("stopped: sessions closed and flushed")

    # -- per request ---------------------------------------------------------------------------
    async def owner(self, conn: HTTPConnection) -> str:
        owner = self.auth.owner(conn.headers.get("authorization"), conn.query_params.get("token"))
        if owner is None:
            raise ApiError(401, "unauthorized", "send Authorization: Bearer <token> (one of the server's --token)",
                           headers={"WWW-Authenticate": "Bearer"})
        await self.limit(owner)
        return owner

    async def limit(self, owner: str) -> None:
        """Count a request against ``owner``'s rate, across every worker sharing the store
        (``OwnerTable.take_rate``); 429 when it is spent.  While the shared buckets cannot be
        reached, this worker's own bucket counts (the request will meet the store's trouble
        anyway; the limit should not be what fails)."""
        cfg = self.config
        burst = max(cfg.burst, 1.0)
        wait: float | None = None
        if self.owners is not None:
            try:
                wait = await self.io(self.owners.take_rate, owner, cfg.rate, burst)
            except StoreUnavailableError as exc:
                logger.warning("rate limit counted in this worker only: %s", exc)
        if wait is None:
            wait = self.limiter.take(owner)
        if wait > 0:
            raise ApiError(429, "rate_limited", f"too many requests for this token; retry in {wait:.1f} s",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})

    def reg(self) -> Registry:
        if self.registry is None:
            why = f": {self.startup_error}" if self.startup_error else " (the model is still loading)"
            raise ApiError(503, "not_ready", f"the service is not ready{why}", headers={"Retry-After": "2"})
        return self.registry

    def tables(self) -> tuple[StoreAPI, OwnerTable]:
        if self.store is None or self.owners is None:
            raise ApiError(503, "not_ready", "the service is starting", headers={"Retry-After": "1"})
        return self.store, self.owners

    async def io(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.registry is not None:
            return await self.registry.io(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args))

    async def owned(self, sid: str, owner: str) -> dict[str, Any]:
        """The ownership entry of ``sid`` if ``owner`` owns it; 404 otherwise (the same answer
        whether it does not exist or belongs to someone else: ids are not confirmed)."""
        if not is_session_id(sid):
            raise ApiError(400, "invalid_id", "a session id is 1-128 letters, digits, '_' or '-'")
        session_id_var.set(sid)
        _, owners = self.tables()
        entry = await self.io(owners.get, sid)
        if entry is None or entry.get("owner") != owner:
            raise ApiError(404, "not_found", f"no session {sid}")
        return dict(entry)

    async def record(self, entry: dict[str, Any], sid: str) -> SessionRecord:
        """The saved session (read without taking it; works while a worker has it open)."""
        store, _ = self.tables()
        store_id = entry.get("store_id")
        record = None
        if store_id:
            with contextlib.suppress(SessionNotFoundError, FileNotFoundError):
                record = await self.io(store.load, store_id)
        if record is None:
            record = SessionRecord(session_id=sid, llm_model="", created_at=entry["created_at"],
                                   updated_at=entry["created_at"])
        return record


def _state(conn: HTTPConnection) -> ServiceState:
    state: ServiceState = conn.app.state.service
    return state


async def read_json(request: Request, limit: int, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object, at most ``limit`` bytes (413 beyond, 400 if not an object)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError(400, "bad_request", "invalid Content-Length")
        if int(length) > limit:
            raise ApiError(413, "too_large", f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "too_large", f"the body is over {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client went away while sending the body") from None
    raw = b"".join(chunks)
    if not raw.strip():
        if optional:
            return {}
        raise ApiError(400, "bad_json", 'send a JSON object, e.g. {"text": "hello"}')
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "bad_json", "the body is not valid UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return data


def check_text(data: dict[str, Any], limit: int, field: str = "text") -> str:
    text = data.get(field)
    if not isinstance(text, str):
        raise ApiError(400, "invalid_text", f'"{field}" must be a string')
    if not text.strip():
        raise ApiError(400, "invalid_text", f'"{field}" is empty')
    if not is_utf8_text(text):
        raise ApiError(400, "invalid_text", f'"{field}" holds a lone surrogate and cannot be saved as UTF-8')
    if len(text.encode()) > limit:
        raise ApiError(413, "too_large", f'"{field}" is over {limit} bytes')
    if "\x00" in text:
        raise ApiError(400, "invalid_text", f'"{field}" holds a NUL character')
    return text


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone (after the body was read, ``receive`` only says that)."""
    while True:
        message = await receive()
        if message["type"] in ("http.disconnect", "websocket.disconnect"):
            return


async def run_watched(coro: Awaitable[Any], receive: Receive) -> Any:
    """Run ``coro``; if the client disconnects first, cancel it (the backend stops generating
    and nothing of the turn is kept) and raise ``ClientGone``."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    raise ClientGone()


# -- REST ---------------------------------------------------------------------------------------------
async def healthz(request: Request) -> Response:
    st = _state(request)
    reg = st.registry
    return JSONResponse({
        "status": "ok", "pid": os.getpid(), "ready": st.ready.is_set(),
        "open_sessions": reg.open_count if reg else 0, "busy_sessions": reg.busy_count if reg else 0,
        **st.counters,
        "backend_cancelled": getattr(st.backend, "cancelled", None),
    })


async def readyz(request: Request) -> Response:
    st = _state(request)
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
    st = _state(request)
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
    st = _state(request)
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
            "first_user_line": info.first_user_line if info else "",
        })
    out.sort(key=lambda s: (s["updated_at"], s["session_id"]), reverse=True)
    return JSONResponse({"sessions": out})


async def get_session(request: Request) -> Response:
    st = _state(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    entry = await st.owned(sid, owner)
    record = await st.record(entry, sid)
    return JSONResponse({
        # The saved session's own dates once it has a turn (the file shows the same ones).
        "session_id": sid, "created_at": record.created_at, "updated_at": record.updated_at or record.created_at,
        "turns": record.turns, "total_messages": len(record.messages), "llm_model": record.llm_model or None,
        "system_prompt": record.system_prompt, "store_session_id": entry.get("store_id"),
        "memory": st.config.memory,
        "summary": record.summary["text"] if record.summary else None,
        "summarized_turns": sum(1 for m in record.messages[:record.summary["covers"]] if m["role"] == "assistant")
        if record.summary else 0,
        "history": record.messages,
    })


async def export_session(request: Request) -> Response:
    st = _state(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    entry = await st.owned(sid, owner)
    record = await st.record(entry, sid)
    record.session_id = sid
    body = encode_snapshot(record, record.messages)
    return Response(body, media_type="application/json; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="{sid}.json"'})


async def delete_session(request: Request) -> Response:
    st = _state(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    entry = await st.owned(sid, owner)
    store, owners = st.tables()
    deadline = time.monotonic() + st.config.lock_wait_s
    try:
        async with st.reg().hold(sid, open_session=False):
            # Freshly read: another worker may have bound a store session meanwhile.
            entry = await st.owned(sid, owner)
            store_id = entry.get("store_id")
            while store_id:
                try:
                    await st.io(store.delete, store_id)
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
    st = _state(request)
    owner = await st.owner(request)
    sid = request.path_params["sid"]
    data = await read_json(request, st.config.max_body_bytes)
    text = check_text(data, st.config.max_text_bytes)
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "bad_request", '"stream" must be true or false')
    await st.owned(sid, owner)
    reg = st.reg()
    if stream:
        hold = reg.hold(sid)
        try:
            session = await hold.__aenter__()
        except (SessionError, ValueError, Busy, Gone) as exc:
            raise turn_error(exc) from None
        assert session is not None
        return TurnStream(st, hold, session, text)

    async def turn() -> ChatResult:
        async with reg.hold(sid) as session:
            assert session is not None
            return await session.chat(text)

    try:
        result = await run_watched(turn(), request.receive)
    except ClientGone:
        st.counters["turns_cancelled"] += 1
        logger.info("client disconnected mid-turn: turn cancelled, nothing kept")
        return Response(status_code=499)
    except Exception as exc:  # noqa: BLE001 - mapped to a JSON answer (unknown ones logged there)
        st.counters["turns_failed"] += 1
        raise turn_error(exc) from None
    st.counters["turns_completed"] += 1
    return JSONResponse({"session_id": sid, **result_json(result)})


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


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
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no")]})
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
                async for piece in turn:
                    await send({"type": "http.response.body", "body": _sse("piece", {"text": piece}),
                                "more_body": True})
                result = await turn.result()
        except (SessionError, ValueError, Busy, Gone) as exc:
            st.counters["turns_failed"] += 1
            err = turn_error(exc)
            await send({"type": "http.response.body", "more_body": True,
                        "body": _sse("error", {**err.body()["error"], "status": err.status})})
            return
        st.counters["turns_completed"] += 1
        await send({"type": "http.response.body", "more_body": True,
                    "body": _sse("done", {"session_id": self.hold_sid, **result_json(result)})})

    @property
    def hold_sid(self) -> str | None:
        return session_id_var.get()


# -- Home Assistant ----------------------------------------------------------------------------------
_HA_SORRY = {
    "timeout": {"en": "Sorry, that took too long. Please ask again.",
                "zh-Hans": "抱歉，回答超时了，请再说一遍。", "zh-Hant": "抱歉，回答逾時了，請再說一遍。"},
    "error": {"en": "Sorry, I cannot answer right now.",
              "zh-Hans": "抱歉，我现在无法回答。", "zh-Hant": "抱歉，我現在無法回答。"},
}


def ha_sorry(kind: str, language: str) -> str:
    """The sentence a voice satellite speaks when a turn failed, in ``language`` (a BCP 47
    tag as Home Assistant sends it); English for a language it does not have."""
    parts = language.replace("_", "-").lower().split("-")
    key = "en"
    if parts[0] == "zh":
        key = "zh-Hant" if "hant" in parts or any(p in ("tw", "hk", "mo") for p in parts[1:]) else "zh-Hans"
    return _HA_SORRY[kind][key]


def _ha_answer(speech: str, conversation_id: str, language: str, *, error: str | None = None,
               extra: dict[str, Any] | None = None, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shape of Home Assistant's ``POST /api/conversation/process`` answer."""
    response: dict[str, Any] = {
        "speech": {"plain": {"speech": speech, "extra_data": None}},
        "card": {},
        "language": language,
        "response_type": "error" if error else "action_done",
        "data": {"code": error, **(details or {})} if error else {"targets": [], "success": [], "failed": []},
    }
    return {"response": response, "conversation_id": conversation_id,
            "continue_conversation": bool(not error and speech.rstrip().endswith(("?", "？"))), **(extra or {})}


async def ha_process(request: Request) -> Response:
    """Home Assistant's conversation API: memory that never expires and survives restarts.

    ``conversation_id`` absent, or one of ours / a ULID that is unknown: a new conversation
    (its id is returned).  A name the device picked itself ("kitchen"): that name keeps
    meaning the same conversation for this token, as Home Assistant does for non-ULID ids."""
    st = _state(request)
    owner = await st.owner(request)
    data = await read_json(request, st.config.max_body_bytes)
    text = check_text(data, st.config.max_text_bytes)
    language = data.get("language") or "en"
    cid = data.get("conversation_id")
    if not isinstance(language, str) or len(language) > 35:
        raise ApiError(400, "bad_request", '"language" must be a language tag such as "en"')
    if cid is not None and not is_session_id(cid):
        raise ApiError(400, "invalid_id", '"conversation_id" is 1-128 letters, digits, "_" or "-"')
    _, owners = st.tables()
    reg = st.reg()
    sid: str | None = None
    shown = cid
    if cid is not None:
        entry = await st.io(owners.get, cid)
        if entry is not None and entry.get("owner") == owner:
            sid = cid
        elif not _GENERATED_RE.fullmatch(cid):
            sid = await st.io(owners.find_alias, owner, cid) or (await st.io(owners.create, owner, cid))[0]
    if sid is None:
        sid, _ = await st.io(owners.create, owner)
        shown = sid
    assert shown is not None
    session_id_var.set(sid)

    async def turn() -> ChatResult:
        async with reg.hold(sid) as session:
            assert session is not None
            return await session.chat(text)

    try:
        result = await run_watched(turn(), request.receive)
    except ClientGone:
        st.counters["turns_cancelled"] += 1
        return Response(status_code=499)
    except (Busy, SessionLockedError, Gone, StoreUnavailableError) as exc:
        st.counters["turns_failed"] += 1
        raise turn_error(exc) from None
    except (SessionError, ValueError) as exc:
        st.counters["turns_failed"] += 1
        # A satellite reads the speech aloud: one short sentence in the request's language;
        # what a developer needs goes in ``data``.
        kind = "timeout" if isinstance(exc, SessionTimeoutError) else "error"
        details: dict[str, Any] = {"error": kind, "message": str(exc)}
        if isinstance(exc, SessionTimeoutError):
            details.update(timeout_s=exc.timeout, partial_response=exc.partial_response)
        return JSONResponse(_ha_answer(ha_sorry(kind, language), shown, language, error="failed_to_handle",
                                       details=details))
    st.counters["turns_completed"] += 1
    return JSONResponse(_ha_answer(result.response, shown, language,
                                   extra={"session_id": sid, "turn": result.turn}))


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
    from ._guard import Guard
    from ._ws import session_ws

    cfg = config or ServiceConfig()
    state = ServiceState(cfg, backend=backend, store=store)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
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
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error})
    app.state.service = state
    app.add_middleware(Guard, config=cfg)  # before routing, inside RequestContext (request id, log line)
    app.add_middleware(RequestContext)
    return app


def app_from_env() -> Starlette:
    """The app factory each ``uvicorn --workers N`` process calls (config from the environment)."""
    text = os.environ.get(CONFIG_ENV)
    cfg = ServiceConfig.from_env(text) if text else ServiceConfig()
    setup_json_logging(cfg.log_level, cfg.log_format)
    return create_app(cfg)

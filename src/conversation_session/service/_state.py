"""What one worker holds (``ServiceState``): config, backend, store, ownership table, open
sessions, counters; and the factories that build them from a ``ServiceConfig``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.requests import HTTPConnection

from .._exceptions import (
    SessionNotFoundError,
    StoreUnavailableError,
)
from ..backends import Backend, create_backend
from ..backends._fake import WordFakeBackend
from ..speech import EspeakEngine, SpeechEngine
from ..stores import StoreAPI, is_postgres_url, is_session_id, open_store
from ..stores._file import HistoryStore
from ..stores._keystore import store_options
from ..stores._record import SessionRecord
from ._auth import Authenticator, RateLimiter, subprotocol_token
from ._config import ServiceConfig
from ._errors import ApiError
from ._log import session_id_var
from ._owners import FileOwners, OwnerTable, PostgresOwners
from ._registry import Registry
from ._sealed_owners import SealedOwners

__all__ = ['ServiceState', 'make_backend', 'make_owners', 'make_store', 'state_of']

logger = logging.getLogger("conversation_session.service")


def make_backend(config: ServiceConfig) -> Backend:
    if config.backend == "fake":
        # The !call convention (a testing aid) acts only when tools are offered: the server's
        # (--tools-file) or a client's (the Ollama and OpenAI endpoints).
        return WordFakeBackend(piece_delay=config.fake_delay, context_length=config.fake_context,
                               script_calls=True)
    options = {} if config.kv_type is None else {"kv_cache_type": config.kv_type}
    return create_backend(config.backend, config.model, base_url=config.base_url, **options)


def make_store(config: ServiceConfig) -> StoreAPI:
    url = config.store
    if config.lease_ttl_s is not None and is_postgres_url(url):
        return open_store(url, lease_ttl_s=config.lease_ttl_s, encryption_key=config.key_file,
                          **store_options(url, None, config.keystore))
    return open_store(url, config.sessions_dir, encryption_key=config.key_file,
                      **store_options(url, config.sessions_dir, config.keystore))


def make_owners(store: StoreAPI, config: ServiceConfig) -> OwnerTable:
    table = _owner_table(store)
    keyring = getattr(store, "keyring", None)
    return table if keyring is None else SealedOwners(table, keyring)  # personas sealed like the sessions


def _owner_table(store: StoreAPI) -> OwnerTable:
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
            if self.config.backend == "fake" and self.config.fake_load_s:
                await asyncio.sleep(self.config.fake_load_s)  # tests: a model that takes a while to load
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
        # ``?token=`` only on a WebSocket, for old clients that cannot set a header there: a
        # token in a URL ends up in access logs, browser history and Referer headers, and every
        # HTTP client (the web page too) can send the header.
        query_token = conn.query_params.get("token")
        websocket = conn.scope["type"] == "websocket"
        owner = self.auth.owner(conn.headers.get("authorization"),
                                (query_token if websocket else None) or subprotocol_token(conn.headers))
        if owner is None:
            why = ("a token in the URL (?token=) is accepted only on WebSocket connections (URLs end up in "
                   "logs, history and Referer headers): send Authorization: Bearer <token> instead"
                   if query_token and not websocket else
                   "send Authorization: Bearer <token> (one of the server's --token)")
            raise ApiError(401, "unauthorized", why, headers={"WWW-Authenticate": "Bearer"})
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

    async def wait_ready(self) -> Registry:
        """The registry, waiting (up to ``ready_wait_s``) while the model is still loading: a
        client that connects right after a restart (a voice satellite, an SDK that never polls
        /readyz) gets its answer late rather than an error.  A failed start answers 503 at once."""
        deadline = time.monotonic() + self.config.ready_wait_s
        while self.registry is None and self.startup_error is None and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ready.wait(), min(0.25, max(deadline - time.monotonic(), 0.0)))
        return self.reg()

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


def state_of(conn: HTTPConnection) -> ServiceState:
    """The worker's state, from any request or WebSocket."""
    state: ServiceState = conn.app.state.service
    return state

"""The sessions a worker has open, and the one-request-at-a-time rule per session.

Each service session has a slot in this worker: an asyncio lock (two requests to one session
never interleave: the second waits up to ``lock_wait_s``, then ``Busy``, which the app answers
with 409) and, while in use or recently used, an open ``AsyncConversationSession``.

Across workers the store's lease is the lock: a session open in one worker cannot be opened in
another (``SessionLockedError``).  A worker keeps sessions open between requests (``keep_open``
seconds idle, at most ``max_open``, least recently used closed first) because a turn on an open
session is cheap; a worker that needs a session another worker on this host keeps idle asks it
to close it (``_handoff``) and retries with backoff until the same bound.  Workers on other
hosts cannot be asked: with PostgreSQL shared by several hosts, ``keep_open`` is 0 by default
(closed after each request).  A worker killed mid-turn holds nothing: the file store's
``flock`` dies with the process; a PostgreSQL lease expires after ``lease_ttl_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from .._exceptions import SessionError, SessionLockedError
from ..backends import Backend
from ..memory._kvcache import remove_kv_file
from ..session._aio import AsyncConversationSession
from ..stores._api import StoreAPI
from ..stores._housekeeping import prune
from ..stores._record import SessionRecord
from ..tools import Tool
from ..tools._builtin import tools_from_file
from ._config import ServiceConfig
from ._handoff import HandoffListener, ask_release, describe_holder, holder_pid
from ._owners import OwnerEntry, OwnerTable

__all__ = ["Busy", "Gone", "Registry"]

logger = logging.getLogger("conversation_session.service")
T = TypeVar("T")
RETENTION_EVERY_S = 3600.0  # --retention prunes at start, then this often


class _Placeholder:
    """The writer a session is constructed with when it is about to load an existing session:
    ``AsyncConversationSession`` makes a new store session in its constructor, which would cost
    a store round trip (PostgreSQL: an insert and a delete) on every request only to be
    replaced by ``load_history``.  It holds nothing and can write nothing."""

    def __init__(self, llm_model: str):
        self.record = SessionRecord(session_id="service_placeholder", llm_model=llm_model)
        self.session_id = self.record.session_id
        self.persisted = False
        self.last_error: BaseException | None = None

    def append(self, start: int, messages: list[Any], meta: dict[str, Any] | None = None) -> bool:
        raise SessionError("internal: a placeholder session cannot be written")

    def flush(self, timeout: float | None = 30.0) -> bool:
        return True

    def close(self) -> None:
        pass


class _LoadingStore:
    """The store, except that ``create()`` hands out a ``_Placeholder`` (see there)."""

    def __init__(self, store: StoreAPI):
        self._store = store

    def create(self, llm_model: str, *, session_id: str | None = None) -> _Placeholder:
        return _Placeholder(llm_model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _NamedStore:
    """The store, except that ``create()`` asks for the service's session id as the store id,
    so the file (or row) of a service session carries the id the API shows.  A store whose
    ``create`` takes no ``session_id`` (an embedder's own) names it itself, as before: the
    ownership table maps the two."""

    def __init__(self, store: StoreAPI, session_id: str):
        self._store = store
        self._session_id = session_id

    def create(self, llm_model: str, *, session_id: str | None = None) -> Any:
        try:
            named = "session_id" in inspect.signature(self._store.create).parameters
        except (TypeError, ValueError):
            named = False
        if named:
            return self._store.create(llm_model, session_id=session_id or self._session_id)
        return self._store.create(llm_model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Busy(Exception):
    """The session stayed busy (another request, or another worker) past the wait bound."""


class Gone(Exception):
    """The session was deleted."""


@dataclass
class _Slot:
    sid: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: AsyncConversationSession | None = None
    last_used: float = field(default_factory=time.monotonic)
    users: int = 0


class Registry:
    """Open sessions of one worker (see the module docstring)."""

    def __init__(self, config: ServiceConfig, store: StoreAPI, backend: Backend, owners: OwnerTable):
        self.config = config
        self.store = store
        self.backend = backend
        self.owners = owners
        # Server-side tools (serve --tools-file), loaded once per worker, offered by every session.
        self.tools: list[Tool] = tools_from_file(config.tools_file) if config.tools_file else []
        self._slots: dict[str, _Slot] = {}
        # Store and ownership-table calls block (a file lock, a PostgreSQL round trip): a pool of
        # their own, so they never queue behind the library's snapshots and KV saves.
        self._loading_store = _LoadingStore(store)
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cs-service")
        self._sweeper: asyncio.Task[None] | None = None
        self._retainer: asyncio.Task[None] | None = None
        self._handoff = HandoffListener()
        self._handoff_tasks: set[asyncio.Task[None]] = set()
        self.closing = False

    # -- plumbing ---------------------------------------------------------------------------
    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args))

    @property
    def open_count(self) -> int:
        return sum(1 for s in self._slots.values() if s.session is not None)

    @property
    def busy_count(self) -> int:
        """Sessions a request is using right now (a turn running, or opening/closing)."""
        return sum(1 for s in self._slots.values() if s.lock.locked())

    async def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            if self.config.retention_s:
                self._retainer = asyncio.get_running_loop().create_task(self._retain())
            await self._handoff.start(self._release_requested)

    def _release_requested(self, store_id: str) -> None:
        """Another worker wants ``store_id``: close it if it is open here and idle."""
        for slot in list(self._slots.values()):
            session = slot.session
            if session is not None and session.session_id == store_id and not slot.lock.locked():
                task = asyncio.get_running_loop().create_task(self._close_idle(slot))
                self._handoff_tasks.add(task)
                task.add_done_callback(self._handoff_tasks.discard)

    async def _close_idle(self, slot: _Slot) -> None:
        if slot.lock.locked() or slot.session is None:
            return  # in use again: the asker waits its turn
        await slot.lock.acquire()
        try:
            session, slot.session = slot.session, None
            if session is not None:
                await self._close_session(session)
        finally:
            slot.lock.release()
        if slot.users == 0 and slot.session is None:
            self._slots.pop(slot.sid, None)

    # -- using a session ----------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def hold(self, sid: str, *, open_session: bool = True) -> AsyncIterator[AsyncConversationSession | None]:
        """The session ``sid``, exclusively, for one request (None when ``open_session`` is
        False: the caller only needs nobody else in it, e.g. to delete it)."""
        slot = self._slots.get(sid)
        if slot is None:
            slot = self._slots[sid] = _Slot(sid)
        slot.users += 1
        deadline = time.monotonic() + self.config.lock_wait_s
        cancelled = False
        try:
            try:
                await asyncio.wait_for(slot.lock.acquire(), self.config.lock_wait_s)
            except asyncio.TimeoutError:
                raise Busy(f"session {sid} is busy with another request; retry later") from None
            close = False
            try:
                if open_session and slot.session is None:
                    slot.session = await self._open(sid, deadline)
                elif not open_session and slot.session is not None:
                    session, slot.session = slot.session, None  # the caller needs it closed (delete)
                    await self._close_session(session)
                yield slot.session
            except BaseException:
                close = True  # whatever went wrong, the next request starts from the store
                raise
            finally:
                slot.last_used = time.monotonic()
                close = close or not open_session or self.closing or self.config.keep_open <= 0
                # Closing flushes (blocking I/O, off the loop); it must finish and the lock be given
                # back even if this request is being cancelled: a task of its own, shielded.
                done = asyncio.ensure_future(self._release(slot, close))
                try:
                    await asyncio.shield(done)
                except asyncio.CancelledError:
                    cancelled = True  # the release goes on; the cancellation is raised below
        finally:
            slot.users -= 1
            if slot.users == 0 and slot.session is None and not slot.lock.locked():
                self._slots.pop(sid, None)
        if cancelled:
            raise asyncio.CancelledError

    async def _release(self, slot: _Slot, close: bool) -> None:
        try:
            if close and slot.session is not None:
                session, slot.session = slot.session, None
                await self._close_session(session)
        finally:
            slot.lock.release()

    async def _close_session(self, session: AsyncConversationSession) -> None:
        try:
            await session.aclose()
        except Exception:
            logger.exception("closing session %s failed", session.session_id)

    async def _open(self, sid: str, deadline: float) -> AsyncConversationSession:
        """Open ``sid``'s store session in this worker, waiting (bounded) while another worker
        has it; a session without a turn yet gets a fresh store session bound to it."""
        entry = await self._entry(sid)
        expected = entry["store_id"]
        persona = entry.get("system_prompt") or self.config.system
        spare: list[AsyncConversationSession] = []
        delay = 0.005
        try:
            while True:
                if expected is not None:
                    session = await self.io(self._new_session, self._loading_store, persona)
                    try:
                        loaded = await session.load_history(expected)
                    except SessionLockedError as exc:
                        await self._close_session(session)
                        pid = holder_pid(exc.holder)
                        if pid is not None:
                            ask_release(pid, expected)
                        if time.monotonic() + delay > deadline:
                            raise Busy(f"session {sid} is in use by {describe_holder(exc.holder)}; "
                                       "retry later") from exc
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 0.2)
                        expected = (await self._entry(sid))["store_id"]
                        continue
                    except BaseException:
                        await self._close_session(session)
                        raise
                    if loaded:
                        return session
                    await self._close_session(session)
                # No turn saved yet (new, or its first turn never completed): a new store session,
                # named after the service's id (one id in the API, the folder and the chat), bound.
                session = await self.io(self._new_session, _NamedStore(self.store, sid), persona)
                outcome = await self.io(self.owners.bind, sid, expected, session.session_id)
                if outcome == "ok":
                    logger.debug("session %s: history in store session %s", sid, session.session_id)
                    return session
                if outcome == "taken":
                    spare.append(session)  # kept open so that the store hands out another id
                    continue
                await self._close_session(session)
                if outcome == "gone":
                    raise Gone(sid)
                expected = (await self._entry(sid))["store_id"]  # "changed": another worker bound one
        finally:
            for extra in spare:
                await self._close_session(extra)

    async def _entry(self, sid: str) -> OwnerEntry:
        entry = await self.io(self.owners.get, sid)
        if entry is None:
            raise Gone(sid)
        return entry

    def _new_session(self, store: Any, system_prompt: str | None) -> AsyncConversationSession:
        cfg = self.config
        return AsyncConversationSession(backend=self.backend, store=store, timeout=cfg.timeout,
                                        max_tokens=cfg.max_tokens, system_prompt=system_prompt,
                                        tts_wait_timeout=None, memory=cfg.memory, durability=cfg.durability,
                                        tools=self.tools)

    # -- housekeeping ---------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Close sessions idle longer than ``keep_open``, and the least recently used beyond
        ``max_open``, so other workers can take them."""
        while True:
            await asyncio.sleep(min(max(self.config.keep_open / 4, 0.1), 1.0))
            try:
                now = time.monotonic()
                idle = sorted((s for s in self._slots.values() if s.session is not None and not s.lock.locked()),
                              key=lambda s: s.last_used)
                excess = max(self.open_count - self.config.max_open, 0)
                for i, slot in enumerate(idle):
                    if i >= excess and now - slot.last_used < self.config.keep_open:
                        continue
                    await self._close_idle(slot)
            except Exception:
                logger.exception("closing idle sessions failed")

    async def _retain(self) -> None:
        """``--retention``: prune sessions idle that long, at start and then every hour.  Every
        worker does it; each deletion is checked where no writer can start (the store's
        ``delete(idle_before=...)``), so a session in use, here or elsewhere, is never taken."""
        while True:
            try:
                gone = await self.io(self.prune_idle)
                if gone:
                    logger.info("retention: deleted %d session(s) not updated for %g s", len(gone),
                                self.config.retention_s)
            except Exception:
                logger.exception("retention: pruning failed")
            await asyncio.sleep(RETENTION_EVERY_S)

    def prune_idle(self) -> list[str]:
        """Delete the store's sessions not updated for ``retention_s``, and their KV files."""
        assert self.config.retention_s
        gone = prune(self.store, older_than=timedelta(seconds=self.config.retention_s))
        for sid in gone:
            remove_kv_file(self.store, sid)
        return gone

    async def close(self, grace: float) -> None:
        """Shutdown: wait up to ``grace`` for running requests, then close every session (a
        final snapshot each; a turn still running was cancelled by the server and keeps nothing)."""
        self.closing = True
        self._handoff.close()
        if self._retainer is not None:
            self._retainer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        end = time.monotonic() + grace
        for slot in list(self._slots.values()):
            got = False
            with contextlib.suppress(asyncio.TimeoutError):
                got = await asyncio.wait_for(slot.lock.acquire(), max(end - time.monotonic(), 0.05))
            try:
                session, slot.session = slot.session, None
                if session is not None:
                    await self._close_session(session)
            finally:
                if got:
                    slot.lock.release()
        self._slots.clear()
        self._pool.shutdown(wait=True)

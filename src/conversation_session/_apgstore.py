"""The PostgreSQL store for asyncio: ``AsyncPostgresStore``, the async mirror of ``PostgresStore``.

Same schema, same statements, same lease and fencing (see ``_pgstore``); every method has the
same name and is awaited.  Connections come from a psycopg ``AsyncConnectionPool``; the lease
heartbeat is one deadline on the shared scheduler per store that hands the renewal to the
store's event loop, so no thread and no task per writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._exceptions import (
    SessionError,
    SessionFormatError,
    SessionLockedError,
    SessionNotFoundError,
    StoreUnavailableError,
)
from ._format import MessageDict, SessionRecord, now_iso
from ._pgstore import (
    _ID_RE,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_LEASE_TTL_S,
    DEFAULT_POOL_SIZE,
    DEFAULT_SCHEMA,
    DEFAULT_STATEMENT_TIMEOUT_S,
    MIGRATIONS,
    PostgresStore,
    RewindPlan,
    Sql,
    _first_line,
    _is_broken,
    _LeaseLost,
    adopt_rewind,
    build_append,
    check_messages,
    check_meta,
    check_rewind_state,
    check_title,
    create_candidates,
    import_candidates,
    import_params,
    locked_error,
    message_size,
    new_holder,
    parse_load,
    plan_rewind,
    reconcile,
    search_hits,
    search_params,
)
from ._runtime import Deadline, schedule
from ._store import validate_session_id
from ._store_api import SearchHit, SessionInfo

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = ["AsyncPostgresStore", "AsyncPostgresWriter"]

logger = logging.getLogger("conversation_session.pgstore")


async def _migrate(conn: Any, sql: Sql) -> None:
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (sql.lock_key,))
        await conn.execute(sql.bootstrap)
        applied = {r[0] for r in await (await conn.execute(sql.applied)).fetchall()}
        unknown = sorted(applied - {name for name, _ in MIGRATIONS})
        if unknown:
            raise StoreUnavailableError(
                f"the database schema {sql.schema!r} has steps this release does not know ({', '.join(unknown)}): "
                "it was written by a newer conversation_session; upgrade this one")
        for name, ddl in MIGRATIONS:
            if name not in applied:
                await conn.execute(ddl.format(s=sql.quoted))
                await conn.execute(sql.mark_applied, (name,))


class AsyncPostgresStore:
    """Sessions in PostgreSQL for asyncio code; arguments as ``PostgresStore``.  Use it from one
    event loop (the one that first uses it)."""

    def __init__(self, url: str, *, pool_size: int = DEFAULT_POOL_SIZE, lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
                 statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, schema: str = DEFAULT_SCHEMA):
        # The sync store does the argument checks and error wording; it never connects.
        self._sync = PostgresStore(url, pool_size=pool_size, lease_ttl_s=lease_ttl_s,
                                   statement_timeout_s=statement_timeout_s, connect_timeout_s=connect_timeout_s,
                                   schema=schema)
        self.url = url
        self.lease_ttl_s = self._sync.lease_ttl_s
        self.sql = self._sync.sql
        self._pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
        self._pool_lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writers: weakref.WeakSet[AsyncPostgresWriter] = weakref.WeakSet()
        self._beat: Deadline | None = None
        self._suspect = False
        self._closed = False
        self._search_sql: str | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncPostgresStore:
        return cls(url, **options)

    @property
    def description(self) -> str:
        return self._sync.description

    def __repr__(self) -> str:
        return f"AsyncPostgresStore({self.description!r})"

    # -- connections ---------------------------------------------------------------------------
    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(f"SET statement_timeout = {int(self._sync.statement_timeout_s * 1000)}")

    def _new_pool(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        from psycopg_pool import AsyncConnectionPool

        return AsyncConnectionPool(
            self.url, kwargs=self._sync._connect_kwargs(), min_size=1, max_size=self._sync.pool_size,
            configure=self._configure, timeout=self._sync.connect_timeout_s, name="conversation_session_async",
            reconnect_timeout=max(60.0, self._sync.connect_timeout_s), open=False,
        )

    async def _probe(self, action: str, *, migrate: bool = False) -> None:
        import psycopg

        try:
            conn = await psycopg.AsyncConnection.connect(self.url, **self._sync._connect_kwargs())
            try:
                if migrate:
                    await self._configure(conn)
                    await _migrate(conn, self.sql)
            finally:
                await conn.close()
        except psycopg.Error as exc:
            self._suspect = True
            raise self._sync.unavailable(exc, action) from exc

    async def _ready(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        if self._pool is not None:
            return self._pool
        if self._closed:
            raise StoreUnavailableError(f"the store {self.description} is closed")
        if self._pool_lock is None:
            self._pool_lock = asyncio.Lock()
        async with self._pool_lock:
            if self._pool is None:
                await self._probe("open the session store", migrate=True)
                pool = self._new_pool()
                await pool.open()
                self._pool = pool
                self._loop = asyncio.get_running_loop()
        return self._pool

    async def _recover(self, action: str, stale: psycopg_pool.AsyncConnectionPool[Any]) -> None:
        await self._probe(action)  # raises StoreUnavailableError at once if the server is gone
        if self._pool is stale:
            pool = self._new_pool()
            await pool.open()
            self._pool = pool
            asyncio.get_running_loop().create_task(stale.close())
        self._suspect = False

    async def _run(self, action: str, fn: Callable[[psycopg.AsyncConnection[Any]], Awaitable[Any]]) -> Any:
        import psycopg
        from psycopg_pool import PoolTimeout

        pool = await self._ready()
        if self._suspect:
            await self._recover(action, pool)
            pool = await self._ready()
        for attempt in (1, 2):
            conn = None
            try:
                async with pool.connection() as conn:
                    return await fn(conn)
            except (psycopg.OperationalError, PoolTimeout) as exc:
                lost = conn is None or _is_broken(exc, conn)
                if attempt == 2 or not lost:
                    self._suspect = lost
                    raise self._sync.unavailable(exc, action) from exc
                logger.info("PostgreSQL connection lost (%s); retrying on a fresh one", _first_line(exc))
                await self._recover(action, pool)
                pool = await self._ready()
            except psycopg.Error as exc:
                raise self._sync.unavailable(exc, action) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _one(self, action: str, query: str, params: Any = None) -> Any:
        async def run(conn: psycopg.AsyncConnection[Any]) -> Any:
            return await (await conn.execute(query, params)).fetchone()

        return await self._run(action, run)

    async def _all(self, action: str, query: str, params: Any = None) -> list[Any]:
        async def run(conn: psycopg.AsyncConnection[Any]) -> Any:
            return await (await conn.execute(query, params)).fetchall()

        rows: list[Any] = await self._run(action, run)
        return rows

    # -- the store -----------------------------------------------------------------------------
    async def create(self, llm_model: str, *, session_id: str | None = None) -> AsyncPostgresWriter:
        holder = new_holder()
        base = f"session_{int(time.time())}"
        record = SessionRecord(session_id=base, llm_model=llm_model)
        preferred = None if session_id is None else validate_session_id(session_id)

        async def run(conn: psycopg.AsyncConnection[Any]) -> str:
            rows = await (await conn.execute(self.sql.ids_like, (base, base.replace("_", r"\_") + r"\_%"))).fetchall()
            for session_id in create_candidates({r[0] for r in rows}, base, preferred):
                cur = await conn.execute(self.sql.create, {"id": session_id, "created_at": record.created_at,
                                                           "llm_model": llm_model, "holder": holder,
                                                           "ttl": self.lease_ttl_s})
                if await cur.fetchone():
                    return session_id
            raise SessionError("no free session id")  # pragma: no cover

        record.session_id = await self._run("create a session", run)
        return AsyncPostgresWriter(self, record, holder, gen=1, durable=0, persisted=False)

    async def open(self, session_id: str) -> tuple[AsyncPostgresWriter, SessionRecord]:
        validate_session_id(session_id)
        holder = new_holder()

        async def run(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
            async with conn.transaction():
                cur = await conn.execute(self.sql.take, {"id": session_id, "holder": holder, "ttl": self.lease_ttl_s})
                row = await cur.fetchone()
                if row is None:
                    state = await (await conn.execute(self.sql.lease_state, (session_id,))).fetchone()
                    if state is None:
                        raise SessionNotFoundError(f"no session {session_id} in {self.description}",
                                                   session_id=session_id)
                    raise locked_error(session_id, state[0], state[3])
                rows = await (await conn.execute(self.sql.load, {"id": session_id})).fetchall()
            return row[0], row[1], rows

        gen, count, rows = await self._run("open a session", run)
        record = parse_load(session_id, rows)
        if record is None or len(record.messages) != count:  # pragma: no cover - one transaction
            raise SessionFormatError(f"session {session_id}: changed while it was opened")
        writer = AsyncPostgresWriter(self, record, holder, gen=gen, durable=count, persisted=True)
        return writer, record

    async def load(self, session_id: str) -> SessionRecord:
        validate_session_id(session_id)
        rows = await self._all("load a session", self.sql.load, {"id": session_id})
        record = parse_load(session_id, rows)
        if record is None:
            raise SessionNotFoundError(f"no session {session_id} in {self.description}", session_id=session_id)
        return record

    async def load_newest(self, exclude: Iterable[str] = ()) -> SessionRecord | None:
        skip = list(exclude)
        for _ in range(100):
            row = await self._one("find the newest session", self.sql.newest_with_turns, (skip,))
            if row is None:
                return None
            try:
                return await self.load(row[0])
            except SessionNotFoundError:
                skip.append(row[0])
        return None

    async def newest_first(self) -> list[str]:
        return [r[0] for r in await self._all("list sessions", self.sql.newest_first)]

    async def list_sessions(self) -> list[SessionInfo]:
        rows = await self._all("list sessions", self.sql.list)
        return [SessionInfo(session_id=r[0], location=f"{self.description}#{r[0]}", created_at=r[1],
                            updated_at=r[2] or r[1], llm_model=r[3], turns=r[4], total_messages=r[5],
                            size_bytes=r[6], first_user_line=r[7], title=r[8]) for r in rows]

    async def delete(self, session_id: str) -> bool:
        validate_session_id(session_id)

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool | tuple[Any, ...]:
            async with conn.transaction():
                if await (await conn.execute(self.sql.delete, (session_id,))).fetchone():
                    return True
                state = await (await conn.execute(self.sql.lease_state, (session_id,))).fetchone()
                return False if state is None else tuple(state)

        outcome = await self._run("delete a session", run)
        if isinstance(outcome, bool):
            return outcome
        raise locked_error(session_id, outcome[0], outcome[3])

    async def import_record(self, record: SessionRecord) -> str:
        session, rows, undone = import_params(record)
        preferred = record.session_id if _ID_RE.fullmatch(record.session_id) else None

        async def run(conn: psycopg.AsyncConnection[Any]) -> str:
            async with conn.transaction():
                for session_id in import_candidates(preferred):
                    if await (await conn.execute(self.sql.import_session, {**session, "id": session_id})).fetchone():
                        await conn.execute(self.sql.insert_messages, {**rows, "id": session_id})
                        if undone is not None:
                            await conn.execute(self.sql.import_undone, {**undone, "id": session_id})
                        return session_id
            raise SessionError(f"no free id for {record.session_id}")  # pragma: no cover

        session_id: str = await self._run("import a session", run)
        return session_id

    async def set_title(self, session_id: str, title: str | None) -> None:
        validate_session_id(session_id)
        clean = check_title(title)

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                params = {"title": clean, "id": session_id, "now": now_iso()}
                if await (await conn.execute(self.sql.set_title, params)).fetchone():
                    return
                state = await (await conn.execute(self.sql.lease_state, (session_id,))).fetchone()
            if state is None:
                raise SessionNotFoundError(f"no session {session_id} in {self.description}", session_id=session_id)
            raise locked_error(session_id, state[0], state[3])

        await self._run("rename a session", run)

    async def search(self, text: str, *, limit: int = 50) -> list[SearchHit]:
        params, needle = search_params(text, limit)
        if params is None:
            return []

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[tuple[Any, ...]]:
            if self._search_sql is None:
                icu = await (await conn.execute(self.sql.has_icu)).fetchone()
                self._search_sql = self.sql.search_icu if icu else self.sql.search
            return await (await conn.execute(self._search_sql, params)).fetchall()

        rows: list[tuple[Any, ...]] = await self._run("search sessions", run)
        return search_hits(rows, needle, limit)

    async def is_locked(self, session_id: str) -> bool:
        validate_session_id(session_id)
        row = await self._one("read a session's lease", self.sql.is_locked, (session_id,))
        return bool(row and row[0])

    async def close(self) -> None:
        self._closed = True
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def __aenter__(self) -> AsyncPostgresStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- writers and the heartbeat -------------------------------------------------------------
    def _register(self, writer: AsyncPostgresWriter) -> None:
        self._writers.add(writer)
        if self._beat is None:
            self._beat = schedule(self.lease_ttl_s / 3, self._beat_due)

    def _beat_due(self) -> None:
        # On the shared deadline thread: hand the work to the store's loop and return at once.
        loop = self._loop
        self._beat = None
        if loop is None or loop.is_closed() or self._closed:
            return
        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(self.renew_leases()))
        except RuntimeError:  # the loop closed meanwhile
            pass

    async def renew_leases(self) -> None:
        writers = [w for w in self._writers if not w.closed and not w.lost]
        try:
            if writers:
                rows = await self._all("renew leases", self.sql.renew, (
                    self.lease_ttl_s, [w.session_id for w in writers], [w.holder for w in writers],
                    [w.gen for w in writers]))
                kept = {(r[0], r[1]) for r in rows}
                for w in writers:
                    if (w.session_id, w.gen) not in kept:
                        w.mark_lost("the heartbeat found it")
        except StoreUnavailableError as exc:
            logger.debug("lease heartbeat failed: %s", exc)
        finally:
            if not self._closed and self._beat is None and any(not w.closed for w in self._writers):
                self._beat = schedule(self.lease_ttl_s / 3, self._beat_due)

    async def append_batch(self, writer: AsyncPostgresWriter, batch_for: Callable[[int], Any]) -> int:
        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            durable = writer.durable
            for _ in range(3):
                batch = batch_for(durable)
                row = await (await conn.execute(self.sql.append, batch.params)).fetchone()
                if row and row[0]:
                    return int(batch.end)
                state = await (await conn.execute(self.sql.lease_state, (writer.session_id,))).fetchone()
                durable = reconcile(writer, state, durable, batch.end)
            raise StoreUnavailableError(f"session {writer.session_id}: the stored count keeps changing")

        result: int = await self._run("save the turn", run)
        return result

    async def rewind_batch(self, writer: AsyncPostgresWriter, plan: RewindPlan) -> None:
        """As ``PostgresStore.rewind_batch``."""
        sql = self.sql

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                state = await (await conn.execute(sql.lock_session, (writer.session_id,))).fetchone()
                count = check_rewind_state(writer, state, plan)
                if count is None:
                    return
                if count < len(plan.old):
                    await conn.execute(sql.insert_messages, plan.pending_rows(count))
                await conn.execute(sql.withdraw, plan.withdraw())
                await conn.execute(sql.delete_from, (writer.session_id, plan.start))
                if plan.new_end > plan.start:
                    await conn.execute(sql.insert_messages, plan.insert())
                await conn.execute(sql.rewound, plan.session)

        await self._run("undo a turn", run)


class AsyncPostgresWriter:
    """The one writer of an open session (async); holds its lease until ``await close()``.

    Dropped without ``close()``, its lease is not released (that needs the event loop): it ends
    by itself within ``lease_ttl_s``."""

    def __init__(self, store: AsyncPostgresStore, record: SessionRecord, holder: str, *, gen: int, durable: int,
                 persisted: bool):
        self.store = store
        self._record = record
        self.holder = holder
        self.gen = gen
        self.durable = durable
        self._persisted = persisted
        self.title_dirty = False
        self._lock = asyncio.Lock()
        self._sizes: list[int] = []
        self._closed = False
        self._lost: str | None = None
        self._pid = os.getpid()
        self.last_error: BaseException | None = None
        store._register(self)

    @property
    def session_id(self) -> str:
        return self._record.session_id

    @property
    def record(self) -> SessionRecord:
        return self._record

    @property
    def persisted(self) -> bool:
        return self._persisted

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def pending(self) -> int:
        return len(self._record.messages) - self.durable

    def mark_lost(self, how: str) -> None:
        if self._lost is None:
            self._lost = f"session {self.session_id} was opened by another writer after this one's lease expired"
            logger.warning("%s (%s): this writer can no longer save", self._lost, how)

    async def append(self, start: int, messages: list[MessageDict], meta: dict[str, Any] | None = None) -> bool:
        async with self._lock:
            if self._closed:
                raise SessionError(f"session {self.session_id} is closed")
            if start != len(self._record.messages):
                raise ValueError(f"append at {start}, but session {self.session_id} has "
                                 f"{len(self._record.messages)} messages")
            new = check_messages(messages)
            meta = check_meta(meta)
            self._record.messages.extend(new)
            if meta:
                self._record.apply_meta(meta)
                self.title_dirty = self.title_dirty or "title" in meta
            self._record.updated_at = now_iso()
            return await self._write()

    async def rewind(self, start: int, messages: list[MessageDict] | None = None,
                     meta: dict[str, Any] | None = None) -> bool:
        async with self._lock:
            if self._closed:
                raise SessionError(f"session {self.session_id} is closed")
            plan, after, sizes = plan_rewind(self, start, messages, meta)
            if self._lost is not None:
                return self._refuse("the undo is not applied")
            try:
                await self.store.rewind_batch(self, plan)
            except _LeaseLost as exc:
                self._lost = str(exc)
                return self._refuse("the undo is not applied")
            except StoreUnavailableError as exc:
                self.last_error = exc
                logger.warning("%s; the undo is not applied (nothing changed)", exc)
                return False
            adopt_rewind(self._record, after)
            self._sizes = sizes
            self.durable = plan.new_end
            self.title_dirty = False
            self._persisted = True
            self.last_error = None
            return True

    def sizes(self) -> list[int]:
        messages, sizes = self._record.messages, self._sizes
        while len(sizes) < len(messages):
            sizes.append(message_size(messages[len(sizes)]))
        return sizes

    def _refuse(self, what: str) -> bool:
        self.last_error = SessionLockedError(f"{self._lost}; {what}", session_id=self.session_id)
        logger.warning("not saved: %s", self.last_error)
        return False

    async def _write(self) -> bool:
        if self._lost is not None:
            return self._refuse("the turn is kept in memory only")
        sizes = self.sizes()
        set_title = self.title_dirty
        try:
            self.durable = await self.store.append_batch(self, lambda start: build_append(
                self.session_id, self.holder, self.gen, self.store.lease_ttl_s, self._record, set_title,
                start, sizes))
        except _LeaseLost as exc:
            self._lost = str(exc)
            return await self._write()
        except StoreUnavailableError as exc:
            self.last_error = exc
            logger.warning("%s; the turn is kept in memory and will be saved with the next one", exc)
            return False
        self._persisted = True
        self.title_dirty = False
        self.last_error = None
        return True

    async def flush(self, timeout: float | None = 30.0) -> bool:
        return True

    async def close(self) -> None:
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:
                return
            if self.pending and self._lost is None:
                await self._write()
        self.store._writers.discard(self)
        if self._lost is not None:
            return
        sql = self.store.sql

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                await conn.execute(sql.drop_empty, (self.session_id, self.holder, self.gen))
                await conn.execute(sql.release, (self.session_id, self.holder, self.gen))

        try:
            await self.store._run("release the session", run)
        except StoreUnavailableError as exc:
            logger.warning("could not release session %s (%s); its lease expires by itself within %g s",
                           self.session_id, exc, self.store.lease_ttl_s)

    async def __aenter__(self) -> AsyncPostgresWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

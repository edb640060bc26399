"""The ownership table: which caller owns which service session, and where its history lives.

Why a table of its own rather than something derived from ids: store ids are guessable
(``session_<unix seconds>``), so "the caller knows the id" proves nothing.  Every service
session has an unguessable id of its own (``c`` + 24 hex digits) and one row here::

    sid -> {owner, store_id, created_at, alias, system_prompt}

``store_id`` is the session in the store holding the history, or None until the first turn.
The indirection exists because stores drop sessions that never got a message (a file session
with no turn leaves no file; a PostgreSQL row is deleted on release), so an empty session
created by ``POST /v1/sessions`` cannot keep a store id of its own; its store session is made
at its first turn and bound here (``bind``), before the turn is acknowledged.

Binding is a compare-and-set under the table's lock, and refuses a store id that another row
already names (an id the store handed out again after the previous holder's empty session
vanished), so no two service sessions ever share a history.

The same two places keep the per-token rate limit's buckets (``take_rate``), so it holds across
workers: beside the table, ``.service-rate`` (read and rewritten under its own ``flock``; the
clock is the host's monotonic clock, which every process on the host shares), and a table
``rate`` in PostgreSQL updated in one statement (the database's clock, so hosts agree).

Two implementations, picked by the store: a JSON file in the file store's folder
(``.service-owners.json``, replaced atomically under a ``flock``, so several worker processes
on one host agree), and a table in the PostgreSQL database of the PostgreSQL store (several
hosts).  Every method blocks: the service calls them off the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

from .._exceptions import StoreUnavailableError
from ..stores._fileio import atomic_write_bytes
from ..stores._record import now_iso
from ._auth import take_from_bucket

if TYPE_CHECKING:  # Python 3.10 has no typing.NotRequired; annotations are strings at run time
    from typing_extensions import NotRequired

__all__ = ["BindOutcome", "FileOwners", "OwnerEntry", "OwnerTable", "PostgresOwners", "new_sid"]

BindOutcome = Literal["ok", "changed", "taken", "gone"]
"""``ok``: bound; ``changed``: another worker bound a store id first (use that one); ``taken``:
another session already names that store id (make another); ``gone``: the session was deleted."""


class OwnerEntry(TypedDict):
    owner: str
    store_id: str | None
    created_at: str
    alias: str | None
    system_prompt: NotRequired[str | None]   # the session's own persona (POST /v1/sessions)


class OwnersFileDict(TypedDict):
    """``.service-owners.json``."""
    version: int
    sessions: dict[str, OwnerEntry]


def new_sid() -> str:
    """An unguessable service session id (96 random bits), valid as a store id too."""
    return "c" + secrets.token_hex(12)


class OwnerTable(Protocol):
    def get(self, sid: str) -> OwnerEntry | None: ...
    def list(self, owner: str) -> list[tuple[str, OwnerEntry]]: ...
    def create(self, owner: str, alias: str | None = None, system_prompt: str | None = None,
               sid: str | None = None) -> tuple[str, OwnerEntry]: ...
    def find_alias(self, owner: str, alias: str) -> str | None: ...
    def bind(self, sid: str, expected: str | None, store_id: str) -> BindOutcome: ...
    def remove(self, sid: str) -> bool: ...
    def take_rate(self, owner: str, rate: float, burst: float, cost: float = 1.0) -> float: ...
    def check(self) -> None: ...
    def close(self) -> None: ...


class FileOwners:
    """The table as one JSON file beside the sessions (see the module docstring)."""

    VERSION = 1

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.path = self.directory / ".service-owners.json"
        self._lock_path = self.directory / ".service-owners.lock"
        self._rate_path = self.directory / ".service-rate"
        self._cache: tuple[tuple[int, int, int], dict[str, OwnerEntry]] | None = None

    # -- reading: lock-free (writers replace the file atomically), cached by file identity --
    def _load(self) -> dict[str, OwnerEntry]:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise StoreUnavailableError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        try:
            st = os.fstat(fd)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._cache
            if cached is not None and cached[0] == key:
                return cached[1]
            with os.fdopen(os.dup(fd), "rb") as fh:
                raw = fh.read()
        finally:
            os.close(fd)
        try:
            data = json.loads(raw)
            sessions = data["sessions"]
            if not isinstance(sessions, dict):
                raise TypeError("sessions is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            # Never guess ownership: refuse to serve rather than hand sessions to the wrong caller.
            raise StoreUnavailableError(f"{self.path} is damaged ({exc}); restore it from a backup") from exc
        self._cache = (key, sessions)
        return sessions

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, OwnerEntry]]:
        """The table under the exclusive lock, freshly read; changes are written on exit."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot lock {self._lock_path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            sessions = dict(self._load())
            before = json.dumps(sessions, sort_keys=True)
            yield sessions
            if json.dumps(sessions, sort_keys=True) != before:
                data: OwnersFileDict = {"version": self.VERSION, "sessions": sessions}
                try:
                    atomic_write_bytes(self.path, json.dumps(data, ensure_ascii=False, indent=0).encode())
                except OSError as exc:
                    raise StoreUnavailableError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
                self._cache = None
        finally:
            os.close(fd)  # releases the lock

    # -- the table -----------------------------------------------------------------------------
    def get(self, sid: str) -> OwnerEntry | None:
        return self._load().get(sid)

    def list(self, owner: str) -> list[tuple[str, OwnerEntry]]:
        return [(sid, e) for sid, e in self._load().items() if e.get("owner") == owner]

    def find_alias(self, owner: str, alias: str) -> str | None:
        for sid, e in self._load().items():
            if e.get("owner") == owner and e.get("alias") == alias:
                return sid
        return None

    def create(self, owner: str, alias: str | None = None, system_prompt: str | None = None,
               sid: str | None = None) -> tuple[str, OwnerEntry]:
        """A new session of ``owner`` (or the one named ``alias``).  ``sid``: the id it must have
        (an id derived from the owner, see ``_compat``); an existing row of that id is returned."""
        with self._locked() as sessions:
            if sid is not None and sid in sessions:
                return sid, sessions[sid]
            if alias is not None:
                for other, e in sessions.items():
                    if e.get("owner") == owner and e.get("alias") == alias:
                        return other, e
            if sid is None:
                sid = new_sid()
                while sid in sessions:  # pragma: no cover - 96 random bits
                    sid = new_sid()
            entry: OwnerEntry = {"owner": owner, "store_id": None, "created_at": now_iso(), "alias": alias,
                                 "system_prompt": system_prompt}
            sessions[sid] = entry
            return sid, entry

    def bind(self, sid: str, expected: str | None, store_id: str) -> BindOutcome:
        with self._locked() as sessions:
            entry = sessions.get(sid)
            if entry is None:
                return "gone"
            if entry.get("store_id") != expected:
                return "changed"
            if any(e.get("store_id") == store_id for other, e in sessions.items() if other != sid):
                return "taken"
            sessions[sid] = {**entry, "store_id": store_id}
            return "ok"

    def remove(self, sid: str) -> bool:
        with self._locked() as sessions:
            return sessions.pop(sid, None) is not None

    def take_rate(self, owner: str, rate: float, burst: float, cost: float = 1.0) -> float:
        """Take ``cost`` from ``owner``'s bucket, shared by the workers on this host: 0.0, or the
        seconds to wait.  The file is rate state, not data: no fsync, and a damaged one (a crash
        mid-write) starts every bucket full again."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._rate_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise StoreUnavailableError(f"cannot open {self._rate_path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            raw = os.pread(fd, size, 0) if size else b""
            try:
                buckets = json.loads(raw) if raw else {}
                if not isinstance(buckets, dict):
                    raise ValueError
            except ValueError:
                buckets = {}
            now = time.monotonic()
            level, at = buckets.get(owner) or (burst, now)
            level, wait = take_from_bucket(float(level), float(at), now, rate, burst, cost)
            buckets[owner] = [level, now]
            # Full buckets say nothing: dropped, so the file holds only tokens in use lately.
            buckets = {o: b for o, b in buckets.items()
                       if isinstance(b, list) and len(b) == 2 and b[0] + (now - b[1]) * rate < burst}
            data = json.dumps(buckets, separators=(",", ":")).encode()
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
            return wait
        except OSError as exc:
            raise StoreUnavailableError(f"cannot update {self._rate_path}: {exc.strerror or exc}") from exc
        finally:
            os.close(fd)  # releases the lock

    def check(self) -> None:
        self._load()

    def close(self) -> None:
        pass


class PostgresOwners:
    """The table in PostgreSQL, beside the store's own schema (see the module docstring)."""

    SCHEMA = "conversation_session_service"

    def __init__(self, url: str, *, description: str = "PostgreSQL"):
        from psycopg_pool import ConnectionPool

        self.url = url
        self.description = description
        s = self.SCHEMA
        self._pool: Any = ConnectionPool(url, min_size=1, max_size=4, kwargs={"autocommit": True},
                                         timeout=5.0, name="conversation_session_service", open=True)
        self._sql_get = f"SELECT owner, store_id, created_at, alias, system_prompt FROM {s}.owners WHERE sid = %s"
        # One statement, so concurrent requests from any worker or host serialise on the row;
        # a refusal changes nothing (no row returned).  The database's clock: hosts agree.
        self._sql_take = f"""
            INSERT INTO {s}.rate AS r (owner, level, at)
            VALUES (%(owner)s, %(burst)s - %(cost)s, extract(epoch FROM clock_timestamp()))
            ON CONFLICT (owner) DO UPDATE
            SET level = least(%(burst)s, r.level + greatest(EXCLUDED.at - r.at, 0) * %(rate)s) - %(cost)s,
                at = greatest(r.at, EXCLUDED.at)
            WHERE least(%(burst)s, r.level + greatest(EXCLUDED.at - r.at, 0) * %(rate)s) >= %(cost)s
            RETURNING level"""
        self._sql_wait = f"""
            SELECT (%(cost)s - least(%(burst)s, level + greatest(extract(epoch FROM clock_timestamp()) - at, 0)
                    * %(rate)s)) / %(rate)s
            FROM {s}.rate WHERE owner = %(owner)s"""
        self._run(self._migrate)

    def _migrate(self, conn: Any) -> None:
        s = self.SCHEMA
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(727172)")  # workers racing to create the table
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            conn.execute(f"""CREATE TABLE IF NOT EXISTS {s}.owners (
                sid text PRIMARY KEY, owner text NOT NULL, store_id text UNIQUE, created_at text NOT NULL,
                alias text, system_prompt text, UNIQUE (owner, alias))""")
            # Per-token rate buckets (level, and when it was last set, in the database's epoch seconds).
            conn.execute(f"""CREATE TABLE IF NOT EXISTS {s}.rate (
                owner text PRIMARY KEY, level double precision NOT NULL, at double precision NOT NULL)""")

    def _run(self, fn: Any) -> Any:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            with self._pool.connection() as conn:
                return fn(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            raise StoreUnavailableError(f"the ownership table in {self.description} is unavailable: "
                                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc

    @staticmethod
    def _entry(row: Any) -> OwnerEntry:
        return {"owner": row[0], "store_id": row[1], "created_at": row[2], "alias": row[3], "system_prompt": row[4]}

    def get(self, sid: str) -> OwnerEntry | None:
        row = self._run(lambda c: c.execute(self._sql_get, (sid,)).fetchone())
        return None if row is None else self._entry(row)

    def list(self, owner: str) -> list[tuple[str, OwnerEntry]]:
        rows = self._run(lambda c: c.execute(
            f"SELECT sid, owner, store_id, created_at, alias, system_prompt FROM {self.SCHEMA}.owners WHERE owner = %s",
            (owner,)).fetchall())
        return [(r[0], self._entry(r[1:])) for r in rows]

    def find_alias(self, owner: str, alias: str) -> str | None:
        row = self._run(lambda c: c.execute(
            f"SELECT sid FROM {self.SCHEMA}.owners WHERE owner = %s AND alias = %s", (owner, alias)).fetchone())
        return None if row is None else str(row[0])

    def create(self, owner: str, alias: str | None = None, system_prompt: str | None = None,
               sid: str | None = None) -> tuple[str, OwnerEntry]:
        entry: OwnerEntry = {"owner": owner, "store_id": None, "created_at": now_iso(), "alias": alias,
                             "system_prompt": system_prompt}

        given = sid

        def run(conn: Any) -> str:
            while True:
                sid = given or new_sid()
                row = conn.execute(
                    f"INSERT INTO {self.SCHEMA}.owners (sid, owner, created_at, alias, system_prompt) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING sid",
                    (sid, owner, entry["created_at"], alias, system_prompt)).fetchone()
                if row is not None or given is not None:
                    return sid
                if alias is not None:
                    found = conn.execute(f"SELECT sid FROM {self.SCHEMA}.owners WHERE owner = %s AND alias = %s",
                                         (owner, alias)).fetchone()
                    if found is not None:
                        return str(found[0])

        made: str = self._run(run)
        return made, self.get(made) or entry

    def bind(self, sid: str, expected: str | None, store_id: str) -> BindOutcome:
        import psycopg

        def run(conn: Any) -> BindOutcome:
            try:
                row = conn.execute(
                    f"UPDATE {self.SCHEMA}.owners SET store_id = %s WHERE sid = %s "
                    "AND store_id IS NOT DISTINCT FROM %s RETURNING sid", (store_id, sid, expected)).fetchone()
            except psycopg.errors.UniqueViolation:
                return "taken"
            if row is not None:
                return "ok"
            exists = conn.execute(f"SELECT 1 FROM {self.SCHEMA}.owners WHERE sid = %s", (sid,)).fetchone()
            return "changed" if exists else "gone"

        outcome: BindOutcome = self._run(run)
        return outcome

    def remove(self, sid: str) -> bool:
        row = self._run(lambda c: c.execute(f"DELETE FROM {self.SCHEMA}.owners WHERE sid = %s RETURNING sid",
                                            (sid,)).fetchone())
        return row is not None

    def take_rate(self, owner: str, rate: float, burst: float, cost: float = 1.0) -> float:
        """Take ``cost`` from ``owner``'s bucket, shared by every worker on the database: 0.0, or
        the seconds to wait."""
        args = {"owner": owner, "rate": float(rate), "burst": float(max(burst, cost)), "cost": float(cost)}

        def run(conn: Any) -> float:
            if conn.execute(self._sql_take, args).fetchone() is not None:
                return 0.0
            row = conn.execute(self._sql_wait, args).fetchone()
            return max(float(row[0]), 0.0) if row is not None and row[0] is not None else 1.0 / rate

        wait: float = self._run(run)
        return wait

    def check(self) -> None:
        self._run(lambda c: c.execute("SELECT 1").fetchone())

    def close(self) -> None:
        self._pool.close()

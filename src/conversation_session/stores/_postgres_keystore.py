"""The PostgreSQL store's keystore: its sessions' wrapped data keys in another database
(docs/encryption.md, "PostgreSQL").

Without it (the default), a PostgreSQL session's data key, wrapped by the user's key, lives in
its own row (``sessions.data_key``), so a backup of the database taken before a session was
deleted keeps the key next to the sealed rows: readable with the user's key for ever.  With a
keystore (``PostgresStore(url, keystore="postgresql://.../keys")``), the row holds a reference
instead, ``keystore:<key id>.<entry id>`` (ASCII bytes), and the wrapped key is a row of::

    conversation_session_keys.data_keys (store, session_id, entry_id, wrapped, created_at)

in the keystore's database; deleting the session deletes that row, and the backup's copy of
the session becomes unreadable.  ``store`` is the session database's own identity (a random
name made by its migration ``0006_keystore``, so every host, and a restored copy, agree), which
tells apart several session databases sharing one keystore.  A folder keystore would not do:
the hosts sharing one session database each have their own disk.

Order of writes (nothing is lost at a crash or ``kill -9`` anywhere):

* create, import, rekey: the entry is committed in the keystore before the session's row
  names it.  A crash in between leaves an entry no row names (it sealed nothing).
* delete (and an empty session's release, and the old key of a rekey): the session database's
  transaction that drops the row (or changes its reference) also records the dropped reference
  in ``dropped_keys``; the keystore entry is removed after the commit, then that record.  A
  crash in between leaves the record, and the next deletion (or ``doctor --fix``) finishes it.

Only this module knows the keystore's table; ``_postgres.py`` calls it at create, load, list,
delete and rekey.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import Any

from .._exceptions import EncryptionKeyError, SessionError, StoreUnavailableError
from ._addresses import is_postgres_url, password_of, redact_url
from ._crypto import KEYSTORE_REF, Keyring, SessionCipher
from ._pg_schema import Schema, first_line, migrate

__all__ = ["KEYSTORE_SCHEMA", "ORPHAN_AGE_S", "PgKeystore", "entry_of", "is_reference", "row_key"]

logger = logging.getLogger("conversation_session.pgstore")

KEYSTORE_SCHEMA = "conversation_session_keys"
ORPHAN_AGE_S = 3600.0
"""``doctor --fix`` removes an entry no session row names only once it is this old: younger, the
session that wrote it may still be about to insert its row (create, import, rekey)."""
_REF = KEYSTORE_REF.encode()
_REF_RE = re.compile(rb"keystore:[0-9a-f]{16}\.([0-9a-f]{16})")
_CACHE_MAX = 4096

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_data_keys", """
CREATE TABLE {s}.data_keys (
    store       text NOT NULL,          -- the session database's identity (its store_identity)
    session_id  text NOT NULL,
    entry_id    text NOT NULL,          -- random: a session's old and new keys side by side (rekey)
    wrapped     bytea NOT NULL,         -- the data key wrapped by the user's key (AES-GCM, bound to the id)
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store, session_id, entry_id)
);
"""),
]


def is_reference(data_key: bytes | None) -> bool:
    """True for a ``sessions.data_key`` that names a keystore entry (not a wrapped key inline)."""
    return data_key is not None and bytes(data_key[:len(_REF)]) == _REF


def entry_of(data_key: bytes) -> str | None:
    """The entry id a reference names (None: not a well-formed reference)."""
    m = _REF_RE.fullmatch(bytes(data_key))
    return m.group(1).decode() if m else None


def row_key(cipher: SessionCipher | None) -> bytes | None:
    """What a session's row holds in ``data_key``: the reference, or the wrapped key inline."""
    if cipher is None:
        return None
    return cipher.field.encode() if cipher.field.startswith(KEYSTORE_REF) else cipher.wrapped


class PgKeystore:
    """One keystore database, as used by one PostgreSQL session store.

    It plugs into the store's ``Keyring`` (as a folder's ``Keystore`` does): ``new_cipher``
    gives a new session's cipher naming a fresh entry (written by ``put``), ``cipher`` opens a
    reference.  Wrapped keys fetched are kept per store object (and the keyring keeps them
    unwrapped)."""

    def __init__(self, url: str, store_name: Callable[[], str], *, connect_kwargs: dict[str, Any],
                 statement_timeout_s: float, connect_timeout_s: float, pool_size: int = 4):

        self.url = url
        self.description = redact_url(url)
        self.sql = Schema(KEYSTORE_SCHEMA)  # its bootstrap, migrations table and advisory lock key
        self._store_name = store_name
        self._name: str | None = None
        self._connect_kwargs = connect_kwargs
        self._statement_timeout_s = statement_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._pool_size = pool_size
        self._pool: Any = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, str], bytes] = {}
        s = f'"{KEYSTORE_SCHEMA}"'
        self._insert = f"INSERT INTO {s}.data_keys (store, session_id, entry_id, wrapped) VALUES (%s, %s, %s, %s)"
        self._select = (f"SELECT session_id, entry_id, wrapped FROM {s}.data_keys WHERE store = %s AND "
                        "(session_id, entry_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))")
        self._delete = (f"DELETE FROM {s}.data_keys WHERE store = %s AND "
                        "(session_id, entry_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))")
        self._old = (f"SELECT session_id, entry_id FROM {s}.data_keys WHERE store = %s "
                     "AND created_at < now() - make_interval(secs => %s::float8)")

    def __repr__(self) -> str:
        return f"PgKeystore({self.description!r})"

    @property
    def name(self) -> str:
        """The session database's identity, the ``store`` column of its entries."""
        if self._name is None:
            self._name = self._store_name()
        return self._name

    # -- connections ---------------------------------------------------------------------------
    def _configure(self, conn: Any) -> None:
        conn.execute(f"SET statement_timeout = {int(self._statement_timeout_s * 1000)}")

    def _ready(self) -> Any:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                return self._pool
            import psycopg
            from psycopg_pool import ConnectionPool


            self._pid = os.getpid()  # a forked child: a pool of its own
            try:
                with psycopg.connect(self.url, **self._connect_kwargs) as conn:
                    self._configure(conn)
                    migrate(conn, self.sql, MIGRATIONS)
            except psycopg.Error as exc:
                raise self._unavailable(exc, "open the keystore") from exc
            # check: a connection the server dropped (restart, idle timeout) is replaced before use.
            self._pool = ConnectionPool(self.url, kwargs=self._connect_kwargs, min_size=0, max_size=self._pool_size,
                                        configure=self._configure, timeout=self._connect_timeout_s,
                                        check=ConnectionPool.check_connection, name="conversation_session_keys",
                                        open=True)
            return self._pool

    def _unavailable(self, exc: BaseException, action: str) -> StoreUnavailableError:

        msg = f"cannot {action}: the keystore PostgreSQL at {self.description} ({first_line(exc)})"
        password = password_of(self.url)
        return StoreUnavailableError(msg.replace(password, "***") if password else msg)

    def _run(self, action: str, fn: Callable[[Any], Any]) -> Any:
        import psycopg
        from psycopg_pool import PoolTimeout

        pool = self._ready()
        try:
            with pool.connection() as conn:
                return fn(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            raise self._unavailable(exc, action) from exc

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.close()

    # -- the Keyring's keystore interface --------------------------------------------------------
    def new_cipher(self, session_id: str, data_key: bytes, wrapped: bytes) -> SessionCipher:
        """A new session's cipher; its entry is written by ``put`` before any row names it."""
        entry_id = os.urandom(8).hex()
        return SessionCipher(session_id, data_key, wrapped, field=f"{KEYSTORE_REF}{wrapped[:8].hex()}.{entry_id}")

    def cipher(self, keyring: Keyring, ref: str, session_id: str, where: str) -> SessionCipher:
        """The cipher of a row naming ``keystore:<ref>`` (``<key id>.<entry id>``)."""
        key_id, entry_id = bytes.fromhex(ref[:16]), ref[17:]
        if not keyring.reads(key_id):
            raise EncryptionKeyError(f"{where} is encrypted with another key (key id {key_id.hex()}, this key's "
                                     f"is {keyring.key_id.hex()}); give the key it was written with")
        wrapped = self._cache.get((session_id, entry_id))
        if wrapped is None:
            wrapped = self.fetch([(session_id, entry_id)]).get((session_id, entry_id))
        if wrapped is None:
            raise EncryptionKeyError(f"{where}: its data key is not in the keystore {self.description}: the session "
                                     "was deleted, or this is another keystore (--keystore URL)")
        return SessionCipher(session_id, keyring.unwrap(wrapped, session_id, where), wrapped,
                             field=f"{KEYSTORE_REF}{ref}")

    def kv_cipher(self, keyring: Keyring, stem: str) -> SessionCipher | None:
        return None  # this host's KV files carry a data key of their own (the keystore is not local)

    # -- entries -------------------------------------------------------------------------------
    def put(self, cipher: SessionCipher) -> None:
        """Commit ``cipher``'s entry (before the session's row names it)."""
        entry_id = cipher.field.rsplit(".", 1)[1]
        self._run("store a data key", lambda conn: conn.execute(
            self._insert, (self.name, cipher.session_id, entry_id, cipher.wrapped)))
        self._remember(cipher.session_id, entry_id, cipher.wrapped)

    def fetch(self, refs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """The wrapped keys of ``(session id, entry id)`` pairs, those not known yet fetched in
        one query; those not in the keystore are left out."""
        found = {}
        wanted = []
        for ref in dict.fromkeys(refs):
            known = self._cache.get(ref)
            if known is None:
                wanted.append(ref)
            else:
                found[ref] = known
        if not wanted:
            return found
        rows = self._run("read data keys", lambda conn: conn.execute(
            self._select, (self.name, [r[0] for r in wanted], [r[1] for r in wanted])).fetchall())
        for sid, entry, wrapped in rows:
            found[(sid, entry)] = bytes(wrapped)
            self._remember(sid, entry, bytes(wrapped))
        return found

    def drop(self, refs: Iterable[tuple[str, str]]) -> int:
        """Remove entries (a deleted session's, a rekeyed session's old one); how many were there."""
        doomed = list(dict.fromkeys(refs))
        if not doomed:
            return 0
        for ref in doomed:
            self._cache.pop(ref, None)
        count: int = self._run("remove data keys", lambda conn: conn.execute(
            self._delete, (self.name, [r[0] for r in doomed], [r[1] for r in doomed])).rowcount)
        return count

    def older_than(self, seconds: float) -> list[tuple[str, str]]:
        """This store's entries older than ``seconds``: (session id, entry id)."""
        rows = self._run("list data keys", lambda conn: conn.execute(self._old, (self.name, seconds)).fetchall())
        return [(r[0], r[1]) for r in rows]

    def _remember(self, session_id: str, entry_id: str, wrapped: bytes) -> None:
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[(session_id, entry_id)] = wrapped


def check_keystore_url(keystore: object) -> str:
    """A PostgreSQL store's ``keystore=``: a ``postgresql://`` URL (a folder keeps the keys of a
    sessions folder; the hosts sharing a database do not share a disk)."""

    if not is_postgres_url(keystore):
        raise SessionError(f"the PostgreSQL store's keystore is a PostgreSQL database (keystore=postgresql://..., "
                           f"--keystore URL), not {keystore!r}: the hosts sharing the sessions do not share a folder")
    return keystore

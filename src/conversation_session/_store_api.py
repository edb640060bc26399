"""The store interface: what a session needs from wherever its history lives.

Two implementations: the file store (``_store.HistoryStore``: a snapshot plus a journal per
session in one folder, one host) and the PostgreSQL store (``_pgstore``: one system of record
for several hosts).  The session, the chat app and the housekeeping commands talk to this
interface only; nothing outside a store knows how it keeps its data.

The contract every store keeps (and ``tests/test_store_conformance.py`` checks on each):

Durability
    ``SessionWriter.append()`` returning True means the appended messages are durable: they
    survive ``kill -9`` of this process from that moment (the file store: one ``write`` to the
    journal; PostgreSQL: a committed transaction).  False means they are not (disk full, folder
    removed, database down, lease lost): the writer logs why, the caller keeps the messages in
    memory, and the next successful ``append()`` writes everything not yet durable first, so
    nothing is lost or reordered.  An append costs the same whatever the history's length
    (history is never rewritten to add a turn).

Single writer (the lease)
    At most one writer per session at a time, across processes and (PostgreSQL) hosts.
    ``open()`` of a session that has a live writer raises ``SessionLockedError`` naming the
    holder.  A writer whose process dies loses its lease: at once for the file store (``flock``
    dies with the process), within ``lease_ttl_s`` for PostgreSQL.  A writer that has lost its
    lease (a paused process, a network partition) can never append again: the check is inside
    the append itself (fencing), not a separate step that could race.

Consistent reads
    ``load()``, ``list_sessions()`` and exports see every append acknowledged before they
    started, and never half of one, while a writer is active elsewhere.

Ids
    Session ids match ``[A-Za-z0-9_-]{1,128}``; anything else is a ``ValueError`` before the
    store is touched.  New ids are ``session_<unix seconds>`` (``_2``, ``_3``, ... on a clash).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._format import MessageDict, SessionRecord

__all__ = ["SessionInfo", "SessionWriterAPI", "StoreAPI"]


@dataclass(frozen=True)
class SessionInfo:
    """One row of a listing: what ``sessions list`` shows, read without loading the history.

    ``location`` says where it lives, for people (a file path, or ``postgresql://host/db``);
    ``size_bytes`` is the stored size of the history (its JSON encoding)."""

    session_id: str
    location: str
    created_at: str
    updated_at: str
    llm_model: str
    turns: int
    total_messages: int
    size_bytes: int
    first_user_line: str
    title: str | None = None


@runtime_checkable
class SessionWriterAPI(Protocol):
    """The one writer of an open session; holds the session's lease until ``close()``."""

    @property
    def session_id(self) -> str: ...

    @property
    def record(self) -> SessionRecord:
        """The session as written so far (metadata and every appended message)."""

    @property
    def persisted(self) -> bool:
        """True once the session exists in the store (it has been written at least once)."""

    @property
    def last_error(self) -> BaseException | None:
        """Why the last append or save was not durable, or None."""

    def append(self, start: int, messages: list[MessageDict], meta: dict[str, Any] | None = None) -> bool:
        """Append ``messages`` at index ``start`` (which must equal the number of messages
        appended so far, else ``ValueError``); ``meta`` updates record-level fields such as
        ``system_prompt``.  Returns True when durable (see the module docstring)."""

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Finish background work (a snapshot); False if it did not finish in time."""

    def close(self) -> None:
        """Flush and release the lease.  Idempotent.  Also done when the writer is garbage
        collected without ``close()``, and never by a forked child for its parent."""


@runtime_checkable
class StoreAPI(Protocol):
    """Where sessions live."""

    @property
    def description(self) -> str:
        """For messages: the folder, or the URL without its password."""

    def create(self, llm_model: str) -> SessionWriterAPI:
        """A new, empty session with a fresh id, open for writing."""

    def open(self, session_id: str) -> tuple[SessionWriterAPI, SessionRecord]:
        """Open an existing session for writing: its writer (holding the lease) and its record.

        Raises ``SessionNotFoundError``, ``SessionLockedError``, ``SessionFormatError``."""

    def load(self, session_id: str) -> SessionRecord:
        """Read a session without taking its lease (works while another writer has it)."""

    def load_newest(self, exclude: Iterable[str] = ()) -> SessionRecord | None:
        """The most recently updated readable session with at least one turn, or None."""

    def newest_first(self) -> list[str]:
        """Session ids, most recently updated first (cheap: no history is read)."""

    def list_sessions(self) -> list[SessionInfo]:
        """Every readable session, most recently updated first."""

    def delete(self, session_id: str) -> bool:
        """Remove a session; False if it did not exist.  Raises ``SessionLockedError`` while a
        writer holds it."""

    def import_record(self, record: SessionRecord) -> str:
        """Store a whole session (``sessions import``, moving between stores); keeps its id when
        free, else gives it a new one; returns the id.  Validated like a load."""

    def is_locked(self, session_id: str) -> bool:
        """True while some writer holds the session's lease."""

    def close(self) -> None:
        """Release connections (a no-op for the file store)."""

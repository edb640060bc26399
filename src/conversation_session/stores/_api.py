"""The store interface: what a session needs from wherever its history lives.

Two implementations: the file store (``_file.HistoryStore``: a snapshot plus a journal per
session in one folder, one host) and the PostgreSQL store (``_postgres``: one system of record
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

Undo (rewind)
    ``SessionWriter.rewind(start, messages)`` withdraws the messages from ``start`` on and
    appends ``messages`` in their place, in one durable write that also records what was
    withdrawn (``record.undone``; exports carry it): ``undo()`` and ``retry()`` are never a
    silent rewrite.  All or nothing: True means applied and durable; False (``last_error``
    says why) means nothing changed, in memory or in the store.  Earlier appends that are not
    yet durable are written first; if they cannot be, the rewind returns False.

Titles and search
    ``record.title`` is set through ``append(meta={"title": ...})`` by the writer, or
    ``set_title()`` on a session nobody has open.  ``search()`` finds text in titles and in the
    messages of the history (not in ``undone``), case-insensitively, newest session first.

Ids
    Session ids match ``[A-Za-z0-9_-]{1,128}``; anything else is a ``ValueError`` before the
    store is touched.  New ids are ``session_<unix seconds>`` (``_2``, ``_3``, ... on a clash).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ._record import MessageDict, SessionRecord

__all__ = ["SearchHit", "SessionInfo", "SessionWriterAPI", "StoreAPI", "make_snippet"]

SNIPPET_CHARS = 80


@dataclass(frozen=True)
class SearchHit:
    """One match of ``search()``: a message (``index`` >= 0, ``role`` its role) or the session's
    title (``index`` -1, ``role`` ``"title"``), with ``snippet``: about ``SNIPPET_CHARS``
    characters around the match on one line, ``…`` where cut."""

    session_id: str
    title: str | None
    updated_at: str
    index: int
    role: str
    snippet: str


def make_snippet(text: str, needle: str, width: int = SNIPPET_CHARS) -> str | None:
    """The part of ``text`` around the first case-insensitive occurrence of ``needle``, on one
    line, or None if it does not occur.  The one rule both stores use."""
    flat = " ".join(text.split())
    folded, key = flat.casefold(), " ".join(needle.split()).casefold()
    at = folded.find(key)
    if at < 0 or not key:
        return None
    # casefold() can change lengths (ß -> ss): map back approximately, never out of range.
    at = min(at, len(flat))
    room = max(width - len(key), 0)
    begin = max(at - room // 2, 0)
    end = min(begin + max(width, len(key)), len(flat))
    begin = max(min(begin, end - width), 0)
    return ("…" if begin > 0 else "") + flat[begin:end] + ("…" if end < len(flat) else "")


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
    encrypted: bool = False
    """Stored encrypted (docs/encryption.md).  Listed without its key, such a session shows only
    its id, dates and size; ``first_user_line`` is ``"(encrypted)"``, the counts are 0."""


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

    def rewind(self, start: int, messages: list[MessageDict] | None = None,
               meta: dict[str, Any] | None = None) -> bool:
        """Withdraw the messages from index ``start`` on (they join ``record.undone``, stamped
        with the time) and append ``messages`` at ``start``, in one durable write; a summary
        covering withdrawn messages is dropped.  ``start`` past the end is a ``ValueError``.
        All or nothing: True when applied and durable, False (``last_error``) when nothing
        changed (see the module docstring)."""

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

    def create(self, llm_model: str, *, session_id: str | None = None) -> SessionWriterAPI:
        """A new, empty session open for writing: named ``session_id`` when that id is free
        (the service names sessions after its own ids), else with a fresh id."""

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

    def delete(self, session_id: str, *, idle_before: float | None = None) -> bool:
        """Remove a session; False if it did not exist.  Raises ``SessionLockedError`` while a
        writer holds it.  With ``idle_before`` (a Unix time), only if the session was last
        updated before then, checked while no writer can start (False if it was not)."""

    def import_record(self, record: SessionRecord) -> str:
        """Store a whole session (``sessions import``, moving between stores); keeps its id when
        free, else gives it a new one; returns the id.  Validated like a load."""

    def set_title(self, session_id: str, title: str | None) -> None:
        """Name a session nobody has open (``sessions rename``); None or blank removes the name.
        Raises ``SessionNotFoundError``, ``SessionLockedError`` (its writer sets it instead, with
        ``append(meta={"title": ...})``).  The title is cleaned by ``clean_title()``."""

    def search(self, text: str, *, limit: int = 50, only: Collection[str] | None = None) -> list[SearchHit]:
        """Where ``text`` occurs (case-insensitively; whitespace runs match any whitespace) in
        titles and messages, newest session first, in message order within a session, at most
        ``limit`` hits.  ``only``: search these sessions alone (the service: a caller's own).
        Blank text is a ``ValueError``.  Reads each session at most once."""

    def is_locked(self, session_id: str) -> bool:
        """True while some writer holds the session's lease."""

    def close(self) -> None:
        """Release connections (a no-op for the file store)."""

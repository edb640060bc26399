"""The PostgreSQL store: one system of record for sessions shared by several hosts.

Tables (in their own schema, ``conversation_session`` unless told otherwise)::

    sessions  one row per session: metadata, counts (turns, messages, bytes), the first user
              line for listings, and the lease (holder, lease_gen, lease_expires)
    messages  one row per message, primary key (session_id, idx); never updated, never
              rewritten: a turn only ever inserts its own rows
    migrations  the named schema steps applied so far
    store_identity, dropped_keys  the keystore's bookkeeping (_postgres_keystore.py)

Each completed turn is **one statement** (so one transaction and one round trip): an ``UPDATE``
of the session row guarded by the writer's lease and the expected message count, and an
``INSERT`` of the new messages that only happens if that update matched.  Its cost depends on
the size of the turn, never on the length of the history.  When ``append()`` returns True the
transaction has committed.

The lease (one writer per session, across hosts).  ``open()``/``create()`` take the session by
setting ``holder`` (``host:pid:random``), bumping ``lease_gen`` (the fencing token) and setting
``lease_expires = now() + lease_ttl_s``; it succeeds only when nobody holds the session or the
holder's lease has expired.  Appends renew it, and so does one heartbeat per store (a single
``UPDATE`` for all its writers, every ``lease_ttl_s / 3`` on the shared deadline thread), so a
live but idle writer keeps its sessions.  A crashed host stops renewing: its sessions can be
opened elsewhere ``lease_ttl_s`` seconds later at most.  A writer that lost its lease (paused
past the TTL, cut off by a partition, and someone else opened the session) can never append
again: the append's ``UPDATE`` requires ``holder`` and ``lease_gen`` to still be its own, inside
the same statement as the insert, so there is no window between check and write.  A writer
whose lease expired but was *not* taken over simply renews it on its next append.

Failures: a lost connection, a restarted server, a statement timeout make ``append()`` return
False with ``last_error`` a ``StoreUnavailableError``; the messages stay in memory and the next
append writes all of them.  An append whose commit may have happened before the connection
died is reconciled against the row's message count, so nothing is written twice.

Undo/retry (``rewind``) is one transaction: it locks the session row (``FOR UPDATE``) and checks
the lease there (fencing), writes any appends not yet durable, moves the withdrawn rows of
``messages`` into ``undone`` (one row per rewind, numbered per session from 1, the messages as
one ``json`` value: ``json`` keeps a NUL's ``\u0000`` escape, ``jsonb`` would refuse it), inserts
the replacement and updates the counts.  The rewind number also tells a retried transaction
whose first attempt did commit (its reply lost) that there is nothing left to do.

Durability (docs/durability.md): a writer at the ``power`` level commits with
``synchronous_commit = on`` (the commit returns once the WAL is flushed to the server's disk,
and to a synchronous standby when one is configured); at the ``process`` level with
``synchronous_commit = off``: the commit returns before the WAL flush, which the server makes
within ``3 x wal_writer_delay`` (600 ms by default).  Either way the turn survives this
process dying (the server has it); at ``process`` a crash of the *server* (or its machine)
within that window can lose the last turns, never corrupt the database.  The level is set on a
pooled connection only when it differs from the one the connection last ran with, so it costs
one round trip per change, not per turn.

Loads are one statement (one snapshot): the session row's fields as one small JSON text in a
first row, then one plain row per message, in order.  Plain rows cost the server nothing to
build and the client little to read (psycopg's C row loader); building the whole history as
one JSON text on the server (the first version) took twice as long at 5,000 messages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import operator
import os
import secrets
import socket
import string
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import (
    EncryptionKeyError,
    SessionError,
    SessionFormatError,
    SessionLockedError,
    SessionNotFoundError,
    StoreUnavailableError,
)
from .._runtime import Deadline, run_in_background, schedule
from ._addresses import is_postgres_url, password_of, redact_url
from ._api import SNIPPET_CHARS, SearchHit, SessionInfo, make_snippet
from ._crypto import KEYSTORE_REF, Keyring, SessionCipher, load_key, register_directory
from ._durability import resolve_durability
from ._file import encode_json, search_record
from ._ids import SESSION_ID_RE, validate_session_id
from ._kvpaths import host_kv_dir
from ._pg_schema import Schema, first_line, migrate
from ._postgres_keystore import (
    ORPHAN_AGE_S,
    PgKeystore,
    check_keystore_url,
    entry_of,
    is_reference,
    row_key,
)
from ._postgres_sealing import open_field, open_messages, open_summary, seal_field, seal_message, seal_summary
from ._record import (
    ROLES,
    MessageDict,
    SessionRecord,
    UndoneDict,
    clean_title,
    count_turns,
    is_utf8_text,
    now_iso,
    validate_messages,
    validate_summary,
    validate_undone,
)

if TYPE_CHECKING:
    import psycopg
    import psycopg_pool

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_SCHEMA",
    "MIGRATIONS",
    "PostgresStore",
    "PostgresWriter",
    "redact_url",
]

logger = logging.getLogger("conversation_session.pgstore")

DEFAULT_SCHEMA = "conversation_session"
DEFAULT_LEASE_TTL_S = 15.0
DEFAULT_POOL_SIZE = 10
DEFAULT_STATEMENT_TIMEOUT_S = 10.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0

# Named, ordered schema steps.  Never edit a released step: add a new one.  ``{s}`` is the
# quoted schema name.
MIGRATIONS: list[tuple[str, str]] = [
    ("0001_sessions_and_messages", """
CREATE TABLE {s}.sessions (
    id              text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{{1,128}}$'),
    created_at      text NOT NULL,            -- as in the session file (local time, ISO 8601)
    updated_at      text NOT NULL,
    updated_ts      timestamptz NOT NULL DEFAULT now(),   -- for ordering: newest first
    llm_model       text NOT NULL,
    system_prompt   text,
    title           text,
    turns           integer NOT NULL DEFAULT 0,
    message_count   integer NOT NULL DEFAULT 0,
    bytes           bigint NOT NULL DEFAULT 0,             -- JSON size of the history
    first_user_line text NOT NULL DEFAULT '',
    holder          text,                                  -- host:pid:random of the writer
    lease_gen       bigint NOT NULL DEFAULT 0,             -- fencing token, +1 per open
    lease_expires   timestamptz
);
CREATE INDEX sessions_updated_ts ON {s}.sessions (updated_ts DESC, id DESC);
CREATE TABLE {s}.messages (
    session_id      text NOT NULL REFERENCES {s}.sessions (id) ON DELETE CASCADE,
    idx             integer NOT NULL CHECK (idx >= 0),
    role            text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content         text NOT NULL,
    -- PostgreSQL text cannot hold NUL; such a content is stored as its JSON string literal.
    content_is_json boolean NOT NULL DEFAULT false,
    interrupted     boolean NOT NULL DEFAULT false,
    PRIMARY KEY (session_id, idx)
);
"""),
    # memory="summary": the running summary ({"text", "covers", "model"}), never the history.
    ("0002_summary", """
ALTER TABLE {s}.sessions ADD COLUMN summary jsonb;
"""),
    # Schema 4: what undo()/retry() withdrew (the title column is there since 0001, unused
    # until now).  One row per rewind; ``messages`` is json, not jsonb, so a NUL's escape stays.
    ("0003_title_undone", """
CREATE TABLE {s}.undone (
    session_id      text NOT NULL REFERENCES {s}.sessions (id) ON DELETE CASCADE,
    seq             integer NOT NULL CHECK (seq >= 1),      -- the session's rewinds, from 1
    at              text NOT NULL,                          -- when (local time, as updated_at)
    start           integer NOT NULL CHECK (start >= 0),    -- the index they were withdrawn from
    messages        json NOT NULL,                          -- [{{"role", "content"[, "interrupted"]}}]
    PRIMARY KEY (session_id, seq)
);
"""),
    # Schema 5: tool calls.  A "tool" message, and the fields beyond role/content/interrupted
    # ({"tool_calls": [...]} of an assistant, {"tool_call_id", "name"} of a tool message) as
    # one JSON object (json, not jsonb: a NUL's escape stays, as in undone); NULL for the rest.
    ("0004_tool_calls", """
ALTER TABLE {s}.messages DROP CONSTRAINT IF EXISTS messages_role_check;
ALTER TABLE {s}.messages ADD CONSTRAINT messages_role_check
    CHECK (role IN ('system', 'user', 'assistant', 'tool'));
ALTER TABLE {s}.messages ADD COLUMN extra json;
"""),
    # Encryption at rest (docs/encryption.md, _postgres_sealing.py): the session's data key,
    # wrapped by the user's key; NULL for a plain session.
    ("0005_encryption", """
ALTER TABLE {s}.sessions ADD COLUMN data_key bytea;
"""),
    # The keystore (_postgres_keystore.py): this database's identity (the ``store`` of its
    # entries in a keystore database), and the references dropped (a session deleted, a key
    # rekeyed) whose keystore entries are still to be removed after the commit.
    ("0006_keystore", """
CREATE TABLE {s}.store_identity (id text PRIMARY KEY);
INSERT INTO {s}.store_identity SELECT md5(random()::text || clock_timestamp()::text || txid_current()::text);
CREATE TABLE {s}.dropped_keys (
    session_id  text NOT NULL,
    ref         bytea NOT NULL,                         -- keystore:<key id>.<entry id>
    dropped_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, ref)
);
"""),
]

_BY_INDEX = operator.itemgetter(0)
# Bits of the per-message flag a load returns.
_AS_JSON = 1
_INTERRUPTED = 2


def _import_psycopg() -> Any:
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise StoreUnavailableError(
            "the PostgreSQL store needs psycopg 3 and psycopg-pool: "
            "pip install 'conversation-session[postgres]'"
        ) from exc
    return psycopg


def _parse_local_iso(text: str) -> float | None:
    """Seconds since the epoch of a record's local-time ISO string, or None."""
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def _first_user_line(messages: Iterable[MessageDict]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    stripped = first.replace("\x00", "").strip()
    return stripped.splitlines()[0] if stripped else ""


def check_messages(messages: list[MessageDict]) -> list[MessageDict]:
    """The messages an ``append`` takes, checked (``ValueError``); ``interrupted`` is kept."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] is {type(m).__name__}, not a dict")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}, not one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content is {type(content).__name__}, not a string")
        if not is_utf8_text(content):
            raise ValueError(f"messages[{i}].content holds a lone surrogate: not text")
        if "tool_calls" in m or role == "tool":
            try:
                validate_messages([m], where=f"messages[{i}]")
            except SessionFormatError as exc:
                raise ValueError(str(exc)) from None
    return [dict(m) for m in messages]  # type: ignore[misc]  # a copy: the caller's dicts stay theirs


def check_meta(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """Record-level fields, checked: storable as PostgreSQL text (no NUL); a title is cleaned by
    ``clean_title()`` (so memory holds what the store holds).  Returns the meta to apply."""
    if not meta:
        return meta
    for key in ("system_prompt", "title"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, str) or "\x00" in value or not is_utf8_text(value)):
            raise ValueError(f"meta[{key!r}] must be text without NUL characters, not {value!r:.40}")
    if "summary" in meta:
        summary = validate_summary(meta["summary"])
        if summary is not None and ("\x00" in summary["text"] or not is_utf8_text(summary["text"])):
            raise ValueError("meta['summary'] must be text without NUL characters")
    if "title" in meta:
        meta = {**meta, "title": clean_title(meta["title"])}
    return meta


def message_rows(messages: list[MessageDict], cipher: SessionCipher | None = None,
                 base: int = 0) -> dict[str, list[Any]]:
    """The column arrays of an insert of ``messages``, the first at index ``base`` (PostgreSQL
    text cannot hold NUL: such a content is stored as its JSON string literal, flagged).  In an
    encrypted session each message is sealed whole into ``content`` (_postgres_sealing.py)."""
    if cipher is not None:
        n = len(messages)
        return {"roles": [m["role"] for m in messages],
                "contents": [seal_message(cipher, base + i, m, encode_json) for i, m in enumerate(messages)],
                "as_json": [False] * n, "interrupted": [False] * n, "extra": [None] * n}
    roles: list[str] = []
    contents: list[str] = []
    as_json: list[bool] = []
    interrupted: list[bool] = []
    extra: list[str | None] = []
    for m in messages:
        content = m["content"]
        roles.append(m["role"])
        if "\x00" in content:
            contents.append(encode_json(content))
            as_json.append(True)
        else:
            contents.append(content)
            as_json.append(False)
        interrupted.append(bool(m.get("interrupted")))
        extra.append(message_extra(m))
    return {"roles": roles, "contents": contents, "as_json": as_json, "interrupted": interrupted,
            "extra": extra}


def message_extra(m: MessageDict) -> str | None:
    """The ``extra`` column of a message (schema 5): its tool fields as one JSON object, or None."""
    if "tool_calls" in m:
        return encode_json({"tool_calls": m["tool_calls"]})
    if m["role"] == "tool":
        return encode_json({"tool_call_id": m.get("tool_call_id", ""), "name": m.get("name", "")})
    return None


def history_bytes(sizes: list[int]) -> int:
    """The stored size of a history whose messages encode to ``sizes`` bytes: one JSON array,
    "[" + ", ".join(messages) + "]", so each message adds its size plus 2 (a separator, or the
    brackets for the first); an empty history counts 0 (nothing is stored)."""
    return sum(sizes) + 2 * len(sizes)


def message_size(m: MessageDict) -> int:
    return len(encode_json(m).encode())


@dataclasses.dataclass
class AppendBatch:
    """The parameters of one append statement (shared by the sync and async stores)."""

    params: dict[str, Any]
    end: int


def build_append(session_id: str, holder: str, gen: int, ttl: float, record: SessionRecord,
                 set_title: bool, start: int, encoded_sizes: list[int],
                 cipher: SessionCipher | None = None) -> AppendBatch:
    """Parameters of the append statement for ``record.messages[start:]``; ``set_title``: the
    title was given since the last durable write (else the stored one is kept: a rename made
    while this writer's lease had lapsed is not undone by it)."""
    new = record.messages[start:]
    params = {
        "id": session_id, "holder": holder, "gen": gen, "ttl": ttl, "start": start,
        "end": start + len(new), "turns": count_turns(new),
        "bytes": history_bytes(encoded_sizes[start:start + len(new)]),
        "updated_at": record.updated_at or now_iso(), "llm_model": record.llm_model,
        "system_prompt": seal_field(cipher, "system_prompt", record.system_prompt), "set_title": set_title,
        "title": seal_field(cipher, "title", record.title),
        "first": seal_field(cipher, "first_user_line", _first_user_line(new)),
        "summary": seal_summary(cipher, record.summary),
        **message_rows(new, cipher, start),
    }
    return AppendBatch(params, start + len(new))


@dataclasses.dataclass
class RewindPlan:
    """One rewind, computed before anything changes (shared by the sync and async stores)."""

    seq: int                    # this rewind's number in the session (its undone entries + 1)
    start: int
    at: str
    old: list[MessageDict]      # the history in memory before the rewind (maybe not all durable)
    durable: int                # what the writer knew to be committed
    new_rows: dict[str, Any]    # message_rows() of the replacement
    new_end: int
    session: dict[str, Any]     # the parameters of Sql.rewound
    cipher: SessionCipher | None = None

    def pending_rows(self, count: int) -> dict[str, Any]:
        """The insert of ``old[count:]``: appends not yet durable, written first."""
        return {"id": self.session["id"], "base": count, **message_rows(self.old[count:], self.cipher, count)}

    def withdraw(self) -> dict[str, Any]:
        return {"id": self.session["id"], "seq": self.seq, "at": self.at, "start": self.start}

    def insert(self) -> dict[str, Any]:
        return {"id": self.session["id"], "base": self.start, **self.new_rows}


def plan_rewind(writer: Any, start: int, messages: list[MessageDict] | None,
                meta: dict[str, Any] | None) -> tuple[RewindPlan, SessionRecord, list[int]]:
    """Check a rewind's arguments and work out its outcome on a copy of the writer's record:
    the plan, the record as it will be, the message sizes after it.  ``ValueError`` on bad
    arguments; nothing of the writer changes here."""
    record: SessionRecord = writer.record
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(record.messages):
        raise ValueError(f"rewind at {start!r}, but session {record.session_id} has {len(record.messages)} messages")
    new = check_messages([] if messages is None else messages)
    meta = check_meta(meta)
    after = dataclasses.replace(record, messages=list(record.messages), undone=list(record.undone))
    at = now_iso()
    after.withdraw(start, at)
    after.messages.extend(new)
    after.apply_meta(meta)
    after.updated_at = at
    sizes = writer.sizes()[:start] + [message_size(m) for m in new]
    set_title = writer.title_dirty or bool(meta and "title" in meta)
    cipher: SessionCipher | None = writer.cipher
    session = {
        "id": record.session_id, "end": len(after.messages), "turns": count_turns(after.messages),
        "bytes": history_bytes(sizes), "updated_at": at, "llm_model": after.llm_model,
        "system_prompt": seal_field(cipher, "system_prompt", after.system_prompt), "set_title": set_title,
        "title": seal_field(cipher, "title", after.title), "summary": seal_summary(cipher, after.summary),
        "first": seal_field(cipher, "first_user_line", _first_user_line(after.messages)),
        "ttl": writer.store.lease_ttl_s,
    }
    plan = RewindPlan(seq=len(record.undone) + 1, start=start, at=at, old=list(record.messages),
                      durable=writer.durable, new_rows=message_rows(new, cipher, start), new_end=len(after.messages),
                      session=session, cipher=cipher)
    return plan, after, sizes


def adopt_rewind(record: SessionRecord, after: SessionRecord) -> None:
    """Make ``record`` what ``plan_rewind`` computed, in place (callers hold the record and its
    messages list)."""
    record.messages[:] = after.messages
    record.undone[:] = after.undone
    record.summary = after.summary
    record.system_prompt = after.system_prompt
    record.title = after.title
    record.llm_model = after.llm_model
    record.updated_at = after.updated_at


def check_rewind_state(writer: Any, state: tuple[Any, ...] | None, plan: RewindPlan) -> int | None:
    """The locked session row against the plan: raises ``_LeaseLost`` (fencing: the lease is not
    ours), returns None when this very rewind is already committed (an earlier attempt's reply
    was lost), else the stored message count to go on from."""
    if state is None:
        raise _LeaseLost(f"session {writer.session_id} no longer exists in the store (deleted)")
    holder, gen, count, seq = state
    if holder != writer.holder or gen != writer.gen:
        raise _LeaseLost(f"session {writer.session_id} was taken over by {holder or 'another writer'} "
                         f"(lease {gen}, ours was {writer.gen}): this writer's lease had expired")
    if seq == plan.seq and count == plan.new_end:
        return None
    if seq != plan.seq - 1 or not plan.durable <= count <= len(plan.old):
        raise _LeaseLost(f"session {writer.session_id} holds {count} messages and {seq} rewinds where this "
                         f"writer expected {plan.durable} and {plan.seq - 1}")
    return int(count)


def like_pattern(text: str) -> tuple[str, str | None, str]:
    """For ``search()``: the ILIKE pattern (``%``, ``_`` and ``\\`` escaped), a regular
    expression when the text has several words (whitespace runs match any whitespace run, as
    ``make_snippet`` does), and the needle.  Blank text is a ``ValueError``."""
    if not isinstance(text, str):
        raise TypeError(f"search text must be a str, not {type(text).__name__}")
    words = text.split()
    if not words:
        raise ValueError("search text is blank")
    if any("\x00" in w or not is_utf8_text(w) for w in words):
        raise ValueError("search text must be text without NUL characters")

    def like(word: str) -> str:
        return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    def regex(word: str) -> str:  # ARE: a backslash before a punctuation character makes it literal
        return "".join("\\" + c if c in string.punctuation else c for c in word)

    pattern = "%" + "%".join(like(w) for w in words) + "%"
    return pattern, (r"\s+".join(regex(w) for w in words) if len(words) > 1 else None), " ".join(words)


def search_hits(rows: Iterable[tuple[Any, ...]], needle: str, limit: int) -> list[tuple[float, SearchHit]]:
    """``SearchHit``s of the search statement's rows (id, title, updated_at, idx, role, text,
    as_json, updated_ts), each with its session's ``updated_ts`` (to merge with the hits in
    encrypted sessions, found by the client)."""
    hits: list[tuple[float, SearchHit]] = []
    for session_id, title, updated_at, idx, role, text, as_json, ts in rows:
        if as_json:
            text = json.loads(text)
        snippet = make_snippet(text, needle)
        if snippet is None:
            if as_json:
                continue  # the match was in the stored escape of a NUL, not in the text
            # PostgreSQL's ILIKE folds case by its own rules (ß, final sigma): the text's start.
            flat = " ".join(text.split())
            snippet = flat[:SNIPPET_CHARS] + ("…" if len(flat) > SNIPPET_CHARS else "")
        hits.append((ts, SearchHit(session_id=session_id, title=title, updated_at=updated_at, index=idx, role=role,
                                   snippet=snippet)))
        if len(hits) >= limit:
            break
    return hits


class Sql(Schema):
    """Every statement of the store, for one schema (built once per store)."""

    def __init__(self, schema: str):
        super().__init__(schema)
        s = self.quoted
        # The hot path: one statement.  The INSERT reads from the UPDATE's RETURNING, so it
        # inserts nothing unless the lease (holder, lease_gen) and the count are still ours.
        self.append = f"""
WITH s AS (
    UPDATE {s}.sessions SET
        message_count = %(end)s::int, turns = turns + %(turns)s::int, bytes = bytes + %(bytes)s::bigint,
        updated_at = %(updated_at)s, updated_ts = now(), llm_model = %(llm_model)s,
        system_prompt = %(system_prompt)s,
        title = CASE WHEN %(set_title)s::bool THEN %(title)s ELSE title END,
        summary = coalesce(%(summary)s::jsonb, summary),
        first_user_line = CASE WHEN first_user_line = '' THEN %(first)s ELSE first_user_line END,
        lease_expires = now() + make_interval(secs => %(ttl)s::float8)
    WHERE id = %(id)s AND holder = %(holder)s AND lease_gen = %(gen)s::bigint
      AND message_count = %(start)s::int
    RETURNING id
), m AS (
    INSERT INTO {s}.messages (session_id, idx, role, content, content_is_json, interrupted, extra)
    SELECT s.id, %(start)s::int + t.ord::int - 1, t.role, t.content, t.as_json, t.interrupted, t.extra
    FROM s, unnest(%(roles)s::text[], %(contents)s::text[], %(as_json)s::bool[], %(interrupted)s::bool[],
                   %(extra)s::text[]::json[])
         WITH ORDINALITY AS t(role, content, as_json, interrupted, extra, ord)
    RETURNING 1
)
SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM m)"""
        self.lease_state = (f"SELECT holder, lease_gen, message_count, "
                            f"extract(epoch FROM lease_expires - now())::float8 FROM {s}.sessions WHERE id = %s")
        self.take = (f"UPDATE {s}.sessions SET holder = %(holder)s, lease_gen = lease_gen + 1, "
                     "lease_expires = now() + make_interval(secs => %(ttl)s::float8) "
                     "WHERE id = %(id)s AND (holder IS NULL OR lease_expires <= now()) "
                     "RETURNING lease_gen, message_count")
        self.create = (f"INSERT INTO {s}.sessions (id, created_at, updated_at, llm_model, holder, lease_gen, "
                       "lease_expires, data_key) VALUES (%(id)s, %(created_at)s, %(created_at)s, %(llm_model)s, "
                       "%(holder)s, 1, now() + make_interval(secs => %(ttl)s::float8), %(data_key)s) "
                       "ON CONFLICT (id) DO NOTHING RETURNING id")
        self.ids_like = f"SELECT id FROM {s}.sessions WHERE id = %s OR id LIKE %s"
        # Release: a session closed without a single message leaves nothing behind (as a file
        # session does); otherwise only the lease is cleared.
        self._drop_refs = (f"INSERT INTO {s}.dropped_keys (session_id, ref) SELECT id, data_key FROM d "
                           "WHERE substring(data_key FROM 1 FOR 9) = 'keystore:'::bytea ON CONFLICT DO NOTHING")
        self.drop_empty = (f"WITH d AS (DELETE FROM {s}.sessions x WHERE id = %s AND holder = %s AND lease_gen = %s "
                           f"AND message_count = 0 "
                           f"AND NOT EXISTS (SELECT 1 FROM {s}.undone u WHERE u.session_id = x.id) "
                           f"RETURNING id, data_key), t AS ({self._drop_refs}) SELECT id, data_key FROM d")
        self.release = (f"UPDATE {s}.sessions SET holder = NULL, lease_expires = NULL "
                        "WHERE id = %s AND holder = %s AND lease_gen = %s")
        self.renew = (f"UPDATE {s}.sessions AS x SET lease_expires = now() + make_interval(secs => %s::float8) "
                      "FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS w(id, holder, gen) "
                      "WHERE x.id = w.id AND x.holder = w.holder AND x.lease_gen = w.gen RETURNING x.id, x.lease_gen")
        # A message as the JSON the file format has (what a rewind moves into undone).
        self.message_json = (
            "'{\"role\":\"' || m.role || '\",\"content\":' || "
            "CASE WHEN m.content_is_json THEN m.content ELSE to_json(m.content)::text END || "
            "CASE WHEN m.interrupted THEN ',\"interrupted\":true' ELSE '' END || "
            # schema 5: the extra object's members, spliced in (it is always a JSON object)
            "CASE WHEN m.extra IS NULL THEN '' ELSE ',' || "
            "substr(btrim(m.extra::text), 2, length(btrim(m.extra::text)) - 2) END || '}'")
        # One statement, so one snapshot: the history and the metadata always agree.  One row
        # (idx -1) carries the session's fields as JSON, then one row per message.  No ORDER BY:
        # the client sorts the rows (already nearly in order: timsort's best case), which costs
        # less than the server's sort of the whole result (13 % of a 5,000-message load).
        self.load = f"""
WITH x AS (SELECT * FROM {s}.sessions WHERE id = %(id)s)
SELECT -1 AS idx, NULL::text, json_build_array(
    x.created_at, x.updated_at, x.llm_model, x.system_prompt, x.title, x.summary, x.message_count,
    (SELECT coalesce(json_agg(json_build_object('at', u.at, 'start', u.start, 'messages', u.messages)
                              ORDER BY u.seq), '[]'::json)
     FROM {s}.undone u WHERE u.session_id = x.id), encode(x.data_key, 'hex'))::text, 0, NULL::text
FROM x
UNION ALL
SELECT m.idx, m.role, m.content, m.content_is_json::int * {_AS_JSON} + m.interrupted::int * {_INTERRUPTED},
       m.extra::text
FROM {s}.messages m WHERE m.session_id = %(id)s"""
        # undo/retry: the session row locked (fencing and the counts checked with it held).
        self.lock_session = (f"SELECT holder, lease_gen, message_count, (SELECT coalesce(max(u.seq), 0) FROM "
                             f"{s}.undone u WHERE u.session_id = x.id) FROM {s}.sessions x WHERE id = %s FOR UPDATE")
        self.insert_messages = (
            f"INSERT INTO {s}.messages (session_id, idx, role, content, content_is_json, interrupted, extra) "
            "SELECT %(id)s, %(base)s::int + t.ord::int - 1, t.role, t.content, t.as_json, t.interrupted, t.extra "
            "FROM unnest(%(roles)s::text[], %(contents)s::text[], %(as_json)s::bool[], %(interrupted)s::bool[], "
            "%(extra)s::text[]::json[]) "
            "WITH ORDINALITY AS t(role, content, as_json, interrupted, extra, ord)")
        self.withdraw = (f"INSERT INTO {s}.undone (session_id, seq, at, start, messages) "
                         f"SELECT %(id)s, %(seq)s, %(at)s, %(start)s, "
                         f"('[' || coalesce(string_agg({self.message_json}, ',' ORDER BY m.idx), '') || ']')::json "
                         f"FROM {s}.messages m WHERE m.session_id = %(id)s AND m.idx >= %(start)s")
        self.delete_from = f"DELETE FROM {s}.messages WHERE session_id = %s AND idx >= %s"
        self.rewound = f"""
UPDATE {s}.sessions SET
    message_count = %(end)s::int, turns = %(turns)s::int, bytes = %(bytes)s::bigint,
    updated_at = %(updated_at)s, updated_ts = now(), llm_model = %(llm_model)s,
    system_prompt = %(system_prompt)s,
    title = CASE WHEN %(set_title)s::bool THEN %(title)s ELSE title END,
    summary = %(summary)s::jsonb, first_user_line = %(first)s,
    lease_expires = now() + make_interval(secs => %(ttl)s::float8)
WHERE id = %(id)s"""
        # A rename is a change like a turn (as in the file store, where it is a journal line):
        # the session becomes the newest, unless the title was already that.
        self.set_title = (f"UPDATE {s}.sessions SET title = %(title)s, "
                          "updated_at = CASE WHEN title IS DISTINCT FROM %(title)s THEN %(now)s ELSE updated_at END, "
                          "updated_ts = CASE WHEN title IS DISTINCT FROM %(title)s THEN now() ELSE updated_ts END "
                          "WHERE id = %(id)s AND (holder IS NULL OR lease_expires <= now()) RETURNING id")
        # Titles and the history's messages (never undone), newest session first, then the
        # title, then message order.  ILIKE finds the rows; a regex, when the text has several
        # words, makes their whitespace match any whitespace run.  Case folding follows the
        # collation: a database made with the C locale folds only ASCII, so the ICU root
        # collation is used where the server has it (Debian's does): É matches é everywhere.
        self.has_icu = "SELECT 1 FROM pg_catalog.pg_collation WHERE collname = 'und-x-icu'"
        self.search = self._search("")
        self.search_icu = self._search(' COLLATE "und-x-icu"')
        self.newest_first = f"SELECT id FROM {s}.sessions ORDER BY updated_ts DESC, id DESC"
        self.newest_with_turns = (f"SELECT id FROM {s}.sessions WHERE turns > 0 AND NOT (id = ANY(%s::text[])) "
                                  "ORDER BY updated_ts DESC, id DESC LIMIT 1")
        self.list = (f"SELECT id, created_at, updated_at, llm_model, turns, message_count, bytes, first_user_line, "
                     f"title, data_key FROM {s}.sessions WHERE message_count > 0 ORDER BY updated_ts DESC, id DESC")
        # Encrypted sessions are searched by the client (the server cannot read them).
        self.encrypted_ids = (f"SELECT id, extract(epoch FROM updated_ts)::float8, data_key FROM {s}.sessions "
                              "WHERE data_key IS NOT NULL AND message_count > 0 "
                              "AND (%(only)s::text[] IS NULL OR id = ANY(%(only)s::text[])) "
                              "ORDER BY updated_ts DESC, id DESC")
        self.title_state = f"SELECT data_key, title FROM {s}.sessions WHERE id = %s"
        # rekey: the row locked, only when nobody holds the session; then every sealed value anew.
        self.lock_idle = (f"SELECT data_key FROM {s}.sessions WHERE id = %s "
                          "AND (holder IS NULL OR lease_expires <= now()) FOR UPDATE")
        self.reseal_messages = (
            f"UPDATE {s}.messages m SET content = t.content, content_is_json = false, interrupted = false, "
            "extra = NULL FROM unnest(%(idx)s::int[], %(contents)s::text[]) AS t(idx, content) "
            "WHERE m.session_id = %(id)s AND m.idx = t.idx")
        self.reseal_undone = (f"UPDATE {s}.undone u SET messages = t.messages FROM unnest(%(seq)s::int[], "
                              "%(messages)s::json[]) AS t(seq, messages) WHERE u.session_id = %(id)s AND u.seq = t.seq")
        self.reseal_session = (f"UPDATE {s}.sessions SET data_key = %(data_key)s, system_prompt = %(system_prompt)s, "
                               "title = %(title)s, summary = %(summary)s::jsonb, first_user_line = %(first)s "
                               "WHERE id = %(id)s")
        # A deleted session's keystore reference is recorded in the same transaction, so its
        # entry is removed even if this process dies before it gets to the keystore.
        self.delete = (f"WITH d AS (DELETE FROM {s}.sessions WHERE id = %s AND (holder IS NULL OR lease_expires "
                       "<= now()) AND (%s::float8 IS NULL OR updated_ts < to_timestamp(%s::float8)) "
                       f"RETURNING id, data_key), t AS ({self._drop_refs}) SELECT id, data_key FROM d")
        # The keystore's bookkeeping (_postgres_keystore.py).
        self.store_identity = f"SELECT id FROM {s}.store_identity"
        self.drop_ref = (f"INSERT INTO {s}.dropped_keys (session_id, ref) VALUES (%s, %s) ON CONFLICT DO NOTHING")
        self.dropped = f"SELECT session_id, ref FROM {s}.dropped_keys ORDER BY dropped_at LIMIT 1000"
        self.forget_dropped = (f"DELETE FROM {s}.dropped_keys WHERE (session_id, ref) IN "
                               "(SELECT * FROM unnest(%s::text[], %s::bytea[]))")
        self.keys_of = f"SELECT id, data_key FROM {s}.sessions WHERE id = ANY(%s::text[])"
        self.is_locked = (f"SELECT holder IS NOT NULL AND lease_expires > now() FROM {s}.sessions WHERE id = %s")
        self.import_session = (
            f"INSERT INTO {s}.sessions (id, created_at, updated_at, updated_ts, llm_model, system_prompt, summary, "
            "title, turns, message_count, bytes, first_user_line, data_key) VALUES (%(id)s, %(created_at)s, "
            "%(updated_at)s, coalesce(to_timestamp(%(updated_epoch)s::float8), now()), %(llm_model)s, "
            "%(system_prompt)s, %(summary)s::jsonb, %(title)s, %(turns)s, %(count)s, %(bytes)s, %(first)s, "
            "%(data_key)s) "
            "ON CONFLICT (id) DO NOTHING RETURNING id")
        self.import_undone = (
            f"INSERT INTO {s}.undone (session_id, seq, at, start, messages) "
            "SELECT %(id)s, t.ord::int, t.at, t.start, t.messages "
            "FROM unnest(%(at)s::text[], %(start)s::int[], %(messages)s::json[]) "
            "WITH ORDINALITY AS t(at, start, messages, ord)")

    def _search(self, collate: str) -> str:
        return _search_statement(self.quoted, collate)


def _search_statement(s: str, collate: str) -> str:
    return f"""
SELECT h.id, h.title, h.updated_at, h.idx, h.role, h.text, h.as_json, extract(epoch FROM h.updated_ts)::float8
FROM (
    SELECT x.id, x.title, x.updated_at, x.updated_ts, -1 AS idx, 'title' AS role, x.title AS text, false AS as_json
    FROM {s}.sessions x
    WHERE x.message_count > 0 AND x.data_key IS NULL AND x.title{collate} ILIKE %(like)s
      AND (%(only)s::text[] IS NULL OR x.id = ANY(%(only)s::text[]))
      AND (%(re)s::text IS NULL OR x.title{collate} ~* %(re)s::text)
    UNION ALL
    SELECT x.id, x.title, x.updated_at, x.updated_ts, m.idx, m.role, m.content, m.content_is_json
    FROM {s}.messages m JOIN {s}.sessions x ON x.id = m.session_id AND x.data_key IS NULL
    WHERE m.content{collate} ILIKE %(like)s AND (%(re)s::text IS NULL OR m.content{collate} ~* %(re)s::text)
      AND (%(only)s::text[] IS NULL OR m.session_id = ANY(%(only)s::text[]))
) h
ORDER BY h.updated_ts DESC, h.id DESC, h.idx
LIMIT %(limit)s"""


def _odd_message(role: str, content: str, flags: int, extra: str | None) -> MessageDict:
    m: MessageDict = {"role": role, "content": json.loads(content) if flags & _AS_JSON else content}
    if flags & _INTERRUPTED:
        m["interrupted"] = True
    if extra is not None:
        m.update(json.loads(extra))
    return m


def parse_load(session_id: str, rows: list[tuple[Any, ...]], keyring: Keyring | None = None,
               where: str = "") -> tuple[SessionRecord, SessionCipher | None] | None:
    """The record of a ``Sql.load`` result (sorted here, in place) and, for an encrypted
    session, its cipher; None when there is no such session.  An encrypted session without its
    key is an ``EncryptionKeyError``; a sealed value that fails authentication a
    ``SessionFormatError``: nothing altered is ever returned."""
    rows.sort(key=_BY_INDEX)
    if not rows or rows[0][0] != -1:
        return None
    where = where or f"session {session_id}"
    try:
        fields = json.loads(rows[0][2])
        created_at, updated_at, llm_model, system_prompt, title, summary, count, undone, data_key = fields
    except (ValueError, TypeError) as exc:  # pragma: no cover - the server builds the row
        raise SessionFormatError(f"{where}: stored session is not readable ({exc})") from exc
    cipher = None if data_key is None else _cipher(keyring, bytes.fromhex(data_key), session_id, where)
    try:
        if cipher is None:
            # Most messages are plain {role, content}: built in one comprehension, the rest aside.
            messages: list[MessageDict] = [
                {"role": role, "content": content} if not flags and extra is None
                else _odd_message(role, content, flags, extra)
                for _, role, content, flags, extra in rows[1:]
            ]
        else:
            messages = open_messages(cipher, ((idx, role, content) for idx, role, content, _f, _e in rows[1:]), where)
            system_prompt = open_field(cipher, "system_prompt", system_prompt)
            title = open_field(cipher, "title", title)
            summary = open_summary(cipher, summary)
            undone = [{**u, "messages": open_messages(cipher, ((u["start"] + i, m.get("role"), m.get("content"))
                                                               for i, m in enumerate(u["messages"])), where)}
                      for u in undone]
        record = SessionRecord(session_id=session_id, llm_model=llm_model, created_at=created_at,
                               updated_at=updated_at or created_at, messages=messages, system_prompt=system_prompt,
                               summary=validate_summary(summary), title=title, undone=validate_undone(undone))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SessionFormatError(f"{where}: stored session is not readable ({exc})") from exc
    if len(messages) != count or [r[0] for r in rows[1:]] != list(range(count)):
        raise SessionFormatError(f"{where}: {count} messages counted, {len(messages)} stored")
    return record, cipher


def _cipher(keyring: Keyring | None, wrapped: bytes, session_id: str, where: str) -> SessionCipher:
    """An encrypted session's cipher, from its row's ``data_key`` (the wrapped key inline, or a
    keystore reference: _postgres_keystore.py); ``EncryptionKeyError`` without its key, or
    when its keystore entry is gone."""
    if keyring is None:
        raise EncryptionKeyError(f"{where} is encrypted; give its key (encryption_key=..., --key-file PATH or "
                                 "$CONVERSATION_SESSION_KEY_FILE)")
    if is_reference(wrapped):
        if entry_of(wrapped) is None:
            raise SessionFormatError(f"{where}: its data key reference is damaged; refused")
        return keyring.cipher_for(bytes(wrapped).decode("ascii"), session_id, where)
    return keyring.cipher(wrapped, session_id, where)


def new_holder() -> str:
    """Who holds a lease, for people reading a ``SessionLockedError``: host, pid, a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def locked_error(session_id: str, holder: str | None, remaining: float | None) -> SessionLockedError:
    wait = f"; if that process is gone its lease ends within {max(remaining or 0.0, 0.0):.0f} s" if remaining else ""
    return SessionLockedError(
        f"session {session_id} is open for writing by {holder or 'another process'}{wait}; close it there "
        "first, or start a new session",
        session_id=session_id, holder=holder,
    )


def import_params(record: SessionRecord, cipher: SessionCipher | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """The statements' parameters for storing a whole record (the id filled in later, except in
    an encrypted session, whose values are sealed for ``cipher.session_id``): the session row,
    its messages, its undone entries (None if it has none)."""
    try:
        checked = SessionRecord.from_dict(json.loads(encode_json(record.to_dict())))  # validated like a load
    except (ValueError, UnicodeEncodeError) as exc:
        raise SessionFormatError(f"not a valid session: {exc}") from exc
    if not checked.messages:
        raise SessionFormatError("it has no messages")
    for name in ("session_id", "created_at", "updated_at", "llm_model", "system_prompt"):
        value = getattr(checked, name)
        if isinstance(value, str) and "\x00" in value:
            raise SessionFormatError(f"{name} contains a NUL character, which PostgreSQL cannot store")
    msgs = checked.messages
    title = clean_title(checked.title)
    if title is not None and "\x00" in title:
        raise SessionFormatError("title contains a NUL character, which PostgreSQL cannot store")
    session = {
        "created_at": checked.created_at, "updated_at": checked.updated_at or checked.created_at,
        "updated_epoch": _parse_local_iso(checked.updated_at or checked.created_at),
        "llm_model": checked.llm_model, "system_prompt": seal_field(cipher, "system_prompt", checked.system_prompt),
        "turns": count_turns(msgs), "summary": seal_summary(cipher, checked.summary),
        "title": seal_field(cipher, "title", title), "count": len(msgs),
        "bytes": history_bytes([message_size(m) for m in msgs]),
        "first": seal_field(cipher, "first_user_line", _first_user_line(msgs)),
        "data_key": row_key(cipher),
    }
    rows = {"base": 0, **message_rows(msgs, cipher)}
    return session, rows, undone_rows(checked.undone, cipher)


def undone_rows(undone: list[UndoneDict], cipher: SessionCipher | None = None) -> dict[str, list[Any]] | None:
    """The column arrays of the ``undone`` rows of an import (numbered from 1), or None.  In an
    encrypted session each withdrawn message is sealed at the index it had, as the server's
    copy of a sealed row would be."""
    if not undone:
        return None
    return {"at": [u["at"] for u in undone], "start": [u["start"] for u in undone],
            "messages": [encode_json(sealed_undone(u, cipher)) for u in undone]}


def sealed_undone(entry: UndoneDict, cipher: SessionCipher | None) -> list[Any]:
    """An undone entry's messages as stored: as they are, or (encrypted) each one's role and
    sealed whole at its index."""
    if cipher is None:
        return list(entry["messages"])
    return [{"role": m["role"], "content": seal_message(cipher, entry["start"] + i, m, encode_json)}
            for i, m in enumerate(entry["messages"])]


def import_candidates(preferred: str | None) -> Iterator[str]:
    """The record's own id when it is a valid one, then fresh ``session_<unix seconds>`` names
    (as the file store does)."""
    if preferred is not None:
        yield preferred
    base = f"session_{int(time.time())}"
    for n in range(1, 100_000):
        yield base if n == 1 else f"{base}_{n}"


def create_candidates(taken: set[str], base: str, preferred: str | None = None) -> Iterator[str]:
    """The ids ``create`` tries in turn: ``preferred`` first (an insert that conflicts moves
    on), then ``base``, ``base_2``, ..."""
    if preferred is not None:
        yield preferred
    for n in range(1, 100_000):
        session_id = base if n == 1 else f"{base}_{n}"
        if session_id not in taken:
            yield session_id


class _LeaseLost(Exception):
    pass


class PostgresStore:
    """Sessions in PostgreSQL (psycopg 3, a connection pool); see the module docstring.

    Args:
        url: ``postgresql://user:password@host:port/dbname`` (or a libpq conninfo string).
        pool_size: the most connections this store opens.
        lease_ttl_s: how long a writer's lease lasts without renewal; a crashed host's sessions
            can be opened elsewhere at most this long after it died.
        statement_timeout_s: a statement running longer is cancelled (the append returns False).
        connect_timeout_s: how long to wait for a connection before giving up.
        schema: the schema holding the tables (created on first use).
        durability: ``"power"`` or ``"process"`` (docs/durability.md); default
            ``$CONVERSATION_SESSION_DURABILITY``, else ``"power"``.
        encryption_key: the 32 key bytes or a key file's path (default
            ``$CONVERSATION_SESSION_KEY_FILE``): new sessions are encrypted (docs/encryption.md).
        keystore: a ``postgresql://`` URL of the database keeping encrypted sessions' data keys
            (_postgres_keystore.py), so that deleting a session deletes its key and copies of it in
            backups of this database become unreadable; default ``$CONVERSATION_SESSION_KEYSTORE``
            when it holds such a URL, else none: each data key is kept, wrapped, in its session's row.
    """

    # Each append is a round trip to the server: the async session runs it off the event loop.
    blocking_appends = True

    def __init__(self, url: str, *, pool_size: int = DEFAULT_POOL_SIZE, lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
                 statement_timeout_s: float = DEFAULT_STATEMENT_TIMEOUT_S,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S, schema: str = DEFAULT_SCHEMA,
                 durability: str | None = None, encryption_key: bytes | str | os.PathLike[str] | None = None,
                 keystore: str | None = None):
        if lease_ttl_s <= 0 or statement_timeout_s <= 0 or connect_timeout_s <= 0 or pool_size < 1:
            raise ValueError("pool_size, lease_ttl_s, statement_timeout_s and connect_timeout_s must be positive")
        self.url = url
        self.pool_size = pool_size
        self.lease_ttl_s = float(lease_ttl_s)
        self.statement_timeout_s = float(statement_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.sql = Sql(schema)
        self._description = redact_url(url)
        self._lock = threading.Lock()
        self._pool: psycopg_pool.ConnectionPool[Any] | None = None
        self._pid = os.getpid()
        self._writers: weakref.WeakSet[PostgresWriter] = weakref.WeakSet()
        self._beat: Deadline | None = None
        self._closed = False
        self._suspect = False  # the last call lost the server: probe it before using the pool
        self._search_sql: str | None = None  # with ICU case folding when the server has it
        self.durability = resolve_durability(durability)  # its writers' level (each may change it)
        self._levels: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        key = load_key(encryption_key)
        self.keystore: PgKeystore | None = self._open_keystore(keystore)
        self.keyring: Keyring | None = Keyring(key, self.keystore) if key is not None else None
        if self.keyring is not None:
            register_directory(host_kv_dir(self._description), self.keyring)  # this host's KV files

    @property
    def encrypted(self) -> bool:
        """New sessions are encrypted (a key was given)."""
        return self.keyring is not None

    def _open_keystore(self, keystore: str | None) -> PgKeystore | None:
        if keystore is None:
            from ._keystore import KEYSTORE_ENV

            env = os.environ.get(KEYSTORE_ENV, "").strip()
            if not is_postgres_url(env):  # a folder there is a sessions folder's keystore
                return None
            keystore = env
        return PgKeystore(check_keystore_url(keystore), self._store_identity, connect_kwargs=self._connect_kwargs(),
                          statement_timeout_s=self.statement_timeout_s, connect_timeout_s=self.connect_timeout_s)

    def _store_identity(self) -> str:
        """This database's name in a keystore (made by the migration ``0006_keystore``)."""
        row = self._run("read the store's identity", lambda conn: conn.execute(self.sql.store_identity).fetchone())
        if row is None:  # pragma: no cover - the migration inserts it
            raise StoreUnavailableError(f"{self._description} has no store identity")
        return str(row[0])

    def _put_key(self, cipher: SessionCipher | None) -> bool:
        """Commit a new cipher's keystore entry (before any row names it); True if there is one."""
        if cipher is None or self.keystore is None or not cipher.field.startswith(KEYSTORE_REF):
            return False
        self.keystore.put(cipher)
        return True

    def _forget_key(self, cipher: SessionCipher) -> None:
        """Remove an entry ``_put_key`` wrote that no row came to name (best effort: else
        ``doctor --fix`` removes it once it is old)."""
        assert self.keystore is not None
        try:
            self.keystore.drop([(cipher.session_id, cipher.field.rsplit(".", 1)[1])])
        except StoreUnavailableError as exc:
            logger.warning("could not remove an unused data key of %s from the keystore (%s); `doctor --fix` "
                           "removes it later", cipher.session_id, exc)

    def settle_dropped_keys(self) -> int:
        """Remove from the keystore the entries of deleted sessions (and of rekeyed sessions'
        old keys) recorded in ``dropped_keys``, then the records; how many entries went.  A
        failure is logged: the records stay, for the next deletion or ``doctor --fix``."""
        keys = self.keystore
        if keys is None:
            return 0
        try:
            pending = self._run("read dropped keys", lambda conn: conn.execute(self.sql.dropped).fetchall())
            if not pending:
                return 0
            refs = [(sid, entry_of(bytes(ref))) for sid, ref in pending]
            removed = keys.drop([(sid, entry) for sid, entry in refs if entry is not None])
            self._run("forget dropped keys", lambda conn: conn.execute(
                self.sql.forget_dropped, ([r[0] for r in pending], [bytes(r[1]) for r in pending])))
        except StoreUnavailableError as exc:
            logger.warning("the data keys of deleted sessions are still in the keystore (%s); the next deletion or "
                           "`doctor --fix` removes them", exc)
            return 0
        return removed

    def orphan_keys(self, *, fix: bool = False, min_age_s: float = ORPHAN_AGE_S) -> list[tuple[str, str, bool]]:
        """Keystore entries of this store that no session row names and that are older than
        ``min_age_s`` (a crash between writing a new entry and its row: create, import, rekey),
        as (session id, entry id, removed); ``fix`` removes them.  Deleted sessions' entries
        still in the keystore (``dropped_keys``) are removed first when ``fix``."""
        keys = self.keystore
        if keys is None:
            return []
        if fix:
            self.settle_dropped_keys()
        old = keys.older_than(min_age_s)
        if not old:
            return []
        rows = self._run("read data key references", lambda conn: conn.execute(
            self.sql.keys_of, (sorted({sid for sid, _ in old}),)).fetchall())
        named = {(sid, entry_of(bytes(k))) for sid, k in rows if k is not None and is_reference(bytes(k))}
        orphans = [ref for ref in old if ref not in named]
        removed = keys.drop(orphans) if fix and orphans else 0
        return [(sid, entry, removed > 0) for sid, entry in orphans]

    def kv_path(self, session_id: str) -> Path:
        """Where this host keeps a session's KV cache file (the history is in the database)."""
        return host_kv_dir(self._description) / f"{validate_session_id(session_id)}.kv"

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        """The store for a ``postgresql://`` URL (what ``--store URL`` hands over)."""
        return cls(url, **options)

    @property
    def description(self) -> str:
        return self._description

    def __repr__(self) -> str:
        return f"PostgresStore({self._description!r})"

    # -- connections ---------------------------------------------------------------------------
    def _connect_kwargs(self) -> dict[str, Any]:
        return {
            "autocommit": True,
            "application_name": "conversation_session",
            "connect_timeout": max(2, round(self.connect_timeout_s)),
            # A peer that vanished (a partition) is noticed in ~20 s instead of hours.
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 2,
        }

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"SET statement_timeout = {int(self.statement_timeout_s * 1000)}")

    def unavailable(self, exc: BaseException, action: str) -> StoreUnavailableError:
        """A psycopg / pool error as the one error callers handle, naming the store and the remedy."""
        psycopg = _import_psycopg()
        from psycopg_pool import PoolTimeout

        where = self._description
        if isinstance(exc, PoolTimeout):
            msg = (f"cannot {action}: no connection to PostgreSQL at {where} within {self.connect_timeout_s:g} s; "
                   "check that the server is running and reachable")
        elif isinstance(exc, psycopg.errors.QueryCanceled):
            msg = (f"cannot {action}: PostgreSQL at {where} did not finish within statement_timeout_s="
                   f"{self.statement_timeout_s:g} s (server overloaded, or a lock held elsewhere)")
        elif isinstance(exc, psycopg.OperationalError):
            msg = (f"cannot {action}: PostgreSQL at {where} is unreachable ({first_line(exc)}); check that the "
                   "server is running and that the URL (--store, $CONVERSATION_SESSIONS_STORE) is right")
        else:
            msg = f"cannot {action} in PostgreSQL at {where}: {first_line(exc)}"
        password = password_of(self.url)
        if password:
            msg = msg.replace(password, "***")
        return StoreUnavailableError(msg)

    def _ready(self) -> psycopg_pool.ConnectionPool[Any]:
        """The pool; on first use, check the server answers and migrate the schema."""
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._closed:
                raise StoreUnavailableError(f"the store {self._description} is closed")
            if self._pool is not None and self._pid == os.getpid():
                return self._pool
            # A forked child must not touch the parent's sockets: new pool, old one abandoned.
            self._pid = os.getpid()
            psycopg = _import_psycopg()

            try:
                with psycopg.connect(self.url, **self._connect_kwargs()) as conn:
                    self._configure(conn)
                    migrate(conn, self.sql, MIGRATIONS)
            except psycopg.Error as exc:
                raise self.unavailable(exc, "open the session store") from exc
            self._pool = self._new_pool()
            return self._pool

    def _new_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        from psycopg_pool import ConnectionPool

        return ConnectionPool(
            self.url, kwargs=self._connect_kwargs(), min_size=1, max_size=self.pool_size,
            configure=self._configure, timeout=self.connect_timeout_s, name="conversation_session",
            reconnect_timeout=max(60.0, self.connect_timeout_s), open=True,
        )

    def _recover(self, action: str, stale: psycopg_pool.ConnectionPool[Any]) -> None:
        """After a lost connection or no connection at all: is the server there?  A direct
        connection answers at once (refused, or made); if it is there, the pool's connections
        died with the old server (or the pool is backing off its reconnect attempts), so a fresh
        pool replaces it.  If not, ``StoreUnavailableError`` now, not after a pool timeout."""
        psycopg = _import_psycopg()
        try:
            psycopg.connect(self.url, **self._connect_kwargs()).close()
        except psycopg.Error as exc:
            self._suspect = True
            raise self.unavailable(exc, action) from exc
        with self._lock:
            if self._closed:
                raise StoreUnavailableError(f"the store {self._description} is closed")
            if self._pool is stale:
                self._pool = self._new_pool()
                run_in_background(stale.close, "closing a stale connection pool")
            self._suspect = False

    def _run(self, action: str, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """``fn(conn)`` on a pooled connection; once more on a fresh one if that one had died (the
        server restarted, the connection was terminated).  Errors leave as ``StoreUnavailableError``."""
        psycopg = _import_psycopg()
        from psycopg_pool import PoolTimeout

        pool = self._ready()
        if self._suspect:  # the last call found the server gone: look before waiting on the pool
            self._recover(action, pool)
            pool = self._ready()
        for attempt in (1, 2):
            conn = None
            try:
                with pool.connection() as conn:
                    return fn(conn)
            except (psycopg.OperationalError, PoolTimeout) as exc:
                lost = conn is None or _is_broken(exc, conn)
                if attempt == 2 or not lost:
                    self._suspect = lost
                    raise self.unavailable(exc, action) from exc
                logger.info("PostgreSQL connection lost (%s); retrying on a fresh one", first_line(exc))
                self._recover(action, pool)
                pool = self._ready()
            except psycopg.Error as exc:
                raise self.unavailable(exc, action) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- StoreAPI ------------------------------------------------------------------------------
    def create(self, llm_model: str, *, session_id: str | None = None) -> PostgresWriter:
        holder = new_holder()
        base = f"session_{int(time.time())}"
        record = SessionRecord(session_id=base, llm_model=llm_model)
        preferred = None if session_id is None else validate_session_id(session_id)

        def run(conn: psycopg.Connection[Any]) -> tuple[str, SessionCipher | None]:
            taken = {r[0] for r in conn.execute(self.sql.ids_like, (base, base.replace("_", r"\_") + r"\_%"))}
            for session_id in create_candidates(taken, base, preferred):
                # The data key is bound to the id: one per candidate.
                cipher = None if self.keyring is None else self.keyring.new_cipher(session_id)
                stored = self._put_key(cipher)  # committed before the row names it
                try:
                    row = conn.execute(self.sql.create, {"id": session_id, "created_at": record.created_at,
                                                         "llm_model": llm_model, "holder": holder,
                                                         "ttl": self.lease_ttl_s,
                                                         "data_key": row_key(cipher)}).fetchone()
                except BaseException:
                    if stored:
                        self._forget_key(cipher)  # type: ignore[arg-type]
                    raise
                if row:
                    return session_id, cipher
                if stored:
                    self._forget_key(cipher)  # type: ignore[arg-type]  # the id is taken
            raise SessionError("no free session id")  # pragma: no cover

        record.session_id, cipher = self._run("create a session", run)
        return PostgresWriter(self, record, holder, gen=1, durable=0, persisted=False, cipher=cipher)

    def open(self, session_id: str) -> tuple[PostgresWriter, SessionRecord]:
        validate_session_id(session_id)
        holder = new_holder()

        def run(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
            with conn.transaction():
                row = conn.execute(self.sql.take, {"id": session_id, "holder": holder,
                                                   "ttl": self.lease_ttl_s}).fetchone()
                if row is None:
                    state = conn.execute(self.sql.lease_state, (session_id,)).fetchone()
                    if state is None:
                        raise SessionNotFoundError(f"no session {session_id} in {self._description}",
                                                   session_id=session_id)
                    raise locked_error(session_id, state[0], state[3])
                rows = conn.execute(self.sql.load, {"id": session_id}).fetchall()
            return row[0], row[1], rows

        gen, count, rows = self._run("open a session", run)
        try:
            loaded = parse_load(session_id, rows, self.keyring)
        except BaseException:
            _release(self, session_id, holder, gen, os.getpid())  # unreadable here: not held either
            raise
        if loaded is None or len(loaded[0].messages) != count:  # pragma: no cover - one transaction
            raise SessionFormatError(f"session {session_id}: changed while it was opened")
        record, cipher = loaded
        writer = PostgresWriter(self, record, holder, gen=gen, durable=count, persisted=True, cipher=cipher)
        return writer, record

    def load(self, session_id: str) -> SessionRecord:
        validate_session_id(session_id)
        rows = self._run("load a session", lambda conn: conn.execute(self.sql.load, {"id": session_id}).fetchall())
        loaded = parse_load(session_id, rows, self.keyring)
        if loaded is None:
            raise SessionNotFoundError(f"no session {session_id} in {self._description}", session_id=session_id)
        return loaded[0]

    def load_newest(self, exclude: Iterable[str] = ()) -> SessionRecord | None:
        skip = list(exclude)
        for _ in range(100):
            row = self._run("find the newest session",
                            lambda conn: conn.execute(self.sql.newest_with_turns, (skip,)).fetchone())
            if row is None:
                return None
            try:
                return self.load(row[0])
            except SessionNotFoundError:  # deleted in between
                skip.append(row[0])
            except (EncryptionKeyError, SessionFormatError) as exc:  # as the file store: skip what cannot be read
                logger.warning("skipping session %s: %s", row[0], exc)
                skip.append(row[0])
        return None

    def newest_first(self) -> list[str]:
        return self._run("list sessions", lambda conn: [r[0] for r in conn.execute(self.sql.newest_first)])

    def list_sessions(self) -> list[SessionInfo]:
        rows = self._run("list sessions", lambda conn: conn.execute(self.sql.list).fetchall())
        missing = self._prefetch_keys((r[0], r[9]) for r in rows)
        return [self._info(r, missing) for r in rows]

    def _prefetch_keys(self, keys: Iterable[tuple[str, Any]]) -> set[str]:
        """The keystore entries the rows name, fetched in one query (not one per session); the
        sessions whose entry is not there (or the keystore cannot be reached)."""
        if self.keystore is None or self.keyring is None:
            return set()
        refs = [(sid, entry_of(bytes(k))) for sid, k in keys if k is not None and is_reference(bytes(k))]
        wanted = [(sid, entry) for sid, entry in refs if entry is not None]
        try:
            found = self.keystore.fetch(wanted)
        except StoreUnavailableError as exc:
            logger.warning("%s; encrypted sessions are listed without their text", exc)
            found = {}
        return {sid for sid, entry in wanted if (sid, entry) not in found}

    def _info(self, r: tuple[Any, ...], missing: Collection[str] = ()) -> SessionInfo:
        first, title, sealed = r[7], r[8], r[9] is not None
        if sealed and r[0] in missing:
            first, title = "(encrypted)", None  # its data key is not in the keystore
        elif sealed:  # readable with the key; without it (or with another), a row that says so
            try:
                cipher = _cipher(self.keyring, bytes(r[9]), r[0], f"session {r[0]}")
                first, title = open_field(cipher, "first_user_line", first), open_field(cipher, "title", title)
            except (EncryptionKeyError, SessionFormatError, StoreUnavailableError) as exc:
                logger.debug("listing %s without its text: %s", r[0], exc)
                first, title = "(encrypted)", None
        return SessionInfo(session_id=r[0], location=f"{self._description}#{r[0]}", created_at=r[1],
                           updated_at=r[2] or r[1], llm_model=r[3], turns=r[4], total_messages=r[5],
                           size_bytes=r[6], first_user_line=first or "", title=title, encrypted=sealed)

    def delete(self, session_id: str, *, idle_before: float | None = None) -> bool:
        """``StoreAPI.delete``; ``idle_before`` is checked in the same statement as the lease."""
        validate_session_id(session_id)

        def run(conn: psycopg.Connection[Any]) -> bool | tuple[Any, ...]:
            """True: deleted; False: no such session, or updated since ``idle_before``; else the
            lease state of its holder."""
            with conn.transaction():
                gone = conn.execute(self.sql.delete, (session_id, idle_before, idle_before)).fetchone()
                if gone:
                    return True if gone[1] is None or not is_reference(bytes(gone[1])) else (gone[1],)
                state: tuple[Any, ...] | None = conn.execute(self.sql.lease_state, (session_id,)).fetchone()
                if state is None:
                    return False
                held = state[0] is not None and (state[3] or 0.0) > 0
                return state if held else False  # not held: it was updated since idle_before

        outcome = self._run("delete a session", run)
        if outcome is False:
            return False
        if outcome is not True and len(outcome) != 1:
            raise locked_error(session_id, outcome[0], outcome[3])
        if outcome is not True:  # its data key is in the keystore: removed now
            self.settle_dropped_keys()
        self._drop_kv_file(session_id)
        return True

    def _drop_kv_file(self, session_id: str) -> None:
        """This host's KV file of a deleted session goes with it (as a folder's ``<id>.kv``
        does), whoever deletes: the commands, the service, retention or a library caller."""
        try:
            self.kv_path(session_id).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # the history is gone either way; the cache cap evicts the file later
            logger.warning("could not remove the KV file of deleted session %s: %s", session_id, exc)

    def import_record(self, record: SessionRecord) -> str:
        """``StoreAPI.import_record``; with a key, the session is stored encrypted."""
        session, rows, undone = import_params(record)  # validated before anything is written
        preferred = record.session_id if SESSION_ID_RE.fullmatch(record.session_id) else None

        def run(conn: psycopg.Connection[Any]) -> str:
            nonlocal session, rows, undone
            with conn.transaction():
                for session_id in import_candidates(preferred):
                    cipher = None
                    if self.keyring is not None:  # sealed for this very id
                        cipher = self.keyring.new_cipher(session_id)
                        session, rows, undone = import_params(record, cipher)
                    stored = self._put_key(cipher)  # committed before the row names it
                    if not conn.execute(self.sql.import_session, {**session, "id": session_id}).fetchone():
                        if stored:
                            self._forget_key(cipher)  # type: ignore[arg-type]  # the id is taken
                    else:
                        conn.execute(self.sql.insert_messages, {**rows, "id": session_id})
                        if undone is not None:
                            conn.execute(self.sql.import_undone, {**undone, "id": session_id})
                        return session_id
            raise SessionError(f"no free id for {record.session_id}")  # pragma: no cover

        session_id: str = self._run("import a session", run)
        return session_id

    def set_title(self, session_id: str, title: str | None) -> None:
        validate_session_id(session_id)
        clean = check_title(title)

        def run(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                stored: str | None = clean
                row = conn.execute(self.sql.title_state, (session_id,)).fetchone()
                if row is not None and row[0] is not None:  # encrypted: sealed (the same title stays as stored)
                    cipher = _cipher(self.keyring, bytes(row[0]), session_id, f"session {session_id}")
                    same = open_field(cipher, "title", row[1]) == clean
                    stored = row[1] if same else seal_field(cipher, "title", clean)
                if conn.execute(self.sql.set_title, {"title": stored, "id": session_id, "now": now_iso()}).fetchone():
                    return
                state = conn.execute(self.sql.lease_state, (session_id,)).fetchone()
            if state is None:
                raise SessionNotFoundError(f"no session {session_id} in {self._description}", session_id=session_id)
            raise locked_error(session_id, state[0], state[3])

        self._run("rename a session", run)

    def search(self, text: str, *, limit: int = 50, only: Collection[str] | None = None) -> list[SearchHit]:
        """``StoreAPI.search``: the server searches plain sessions; encrypted ones (with the key)
        are loaded and searched here, since the server cannot read them."""
        params, needle = search_params(text, limit)
        if params is None:
            return []
        params["only"] = None if only is None else list(only)

        def run(conn: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            if self._search_sql is None:
                self._search_sql = self.sql.search_icu if conn.execute(self.sql.has_icu).fetchone() else self.sql.search
            sealed = (conn.execute(self.sql.encrypted_ids, params).fetchall()
                      if self.keyring is not None else [])
            return conn.execute(self._search_sql, params).fetchall(), sealed

        rows, sealed = self._run("search sessions", run)
        found = search_hits(rows, needle, limit)
        missing = self._prefetch_keys((r[0], r[2]) for r in sealed)
        for session_id, ts, _key in sealed:
            if session_id in missing:
                logger.debug("search: skipping %s: its data key is not in the keystore", session_id)
                continue
            try:
                record = self.load(session_id)
            except (SessionNotFoundError, EncryptionKeyError, SessionFormatError) as exc:
                logger.debug("search: skipping %s: %s", session_id, exc)
                continue
            found.extend((ts, hit) for hit in search_record(record, needle, limit))
        # Newest session first, then the title, then message order (as the statement orders).
        found.sort(key=lambda p: (p[1].session_id, p[1].index))
        found.sort(key=lambda p: (p[0], p[1].session_id), reverse=True)
        return [hit for _, hit in found[:limit]]

    def rekey(self, session_id: str) -> bool:
        """Put a session under this store's key with a fresh data key (``sessions rekey``);
        False if it already is.  A plain session is encrypted.  The store must also read the old
        key (``keyring.also_read_with``).  ``SessionLockedError`` while someone has it open.

        One transaction re-seals every value: a crash, ``kill -9`` or a lost connection rolls it
        back, so the session is whole under the old key or the new one at every moment.  This
        host's KV file of the session (under the old key) goes.

        With a keystore, a session whose data key is inline in its row moves to the keystore:
        the new entry is committed first, the transaction then points the row at it and records
        the old reference (if any) as dropped, and the old entry is removed after the commit."""
        keyring = self.keyring
        if keyring is None:
            raise SessionError("rekey needs the new key")
        validate_session_id(session_id)
        sql = self.sql
        row = self._run("read a session's key", lambda conn: conn.execute(sql.title_state, (session_id,)).fetchone())
        if row is not None and self._is_current(row[0]):
            return False  # under this key, where this store keeps its keys: nothing to write
        new = keyring.new_cipher(session_id)
        stored = self._put_key(new)  # committed before the row names it

        def run(conn: psycopg.Connection[Any]) -> bool:
            with conn.transaction():
                if conn.execute(sql.lock_idle, (session_id,)).fetchone() is None:
                    state = conn.execute(sql.lease_state, (session_id,)).fetchone()
                    if state is None:
                        raise SessionNotFoundError(f"no session {session_id} in {self._description}",
                                                   session_id=session_id)
                    raise locked_error(session_id, state[0], state[3])
                loaded = parse_load(session_id, conn.execute(sql.load, {"id": session_id}).fetchall(), keyring)
                if loaded is None:  # pragma: no cover - the row is locked
                    raise SessionNotFoundError(f"no session {session_id}", session_id=session_id)
                record, old = loaded
                old_key = None if old is None else row_key(old)
                if self._is_current(old_key):
                    return False
                msgs = record.messages
                conn.execute(sql.reseal_messages, {"id": session_id, "idx": list(range(len(msgs))),
                                                   "contents": message_rows(msgs, new)["contents"]})
                if record.undone:
                    conn.execute(sql.reseal_undone, {
                        "id": session_id, "seq": list(range(1, len(record.undone) + 1)),
                        "messages": [encode_json(sealed_undone(u, new)) for u in record.undone]})
                if old_key is not None and is_reference(old_key):  # its entry goes after the commit
                    conn.execute(sql.drop_ref, (session_id, old_key))
                conn.execute(sql.reseal_session, {
                    "id": session_id, "data_key": row_key(new),
                    "system_prompt": seal_field(new, "system_prompt", record.system_prompt),
                    "title": seal_field(new, "title", record.title), "summary": seal_summary(new, record.summary),
                    "first": seal_field(new, "first_user_line", _first_user_line(msgs))})
                return True

        try:
            changed: bool = self._run("rekey a session", run)
        except BaseException:
            if stored:
                self._forget_key(new)  # rolled back (or never sent): no row names it
            raise
        if not changed and stored:
            self._forget_key(new)
        if changed:
            self._drop_kv_file(session_id)  # sealed under the old key
            self.settle_dropped_keys()
        return changed

    def _is_current(self, data_key: bytes | None) -> bool:
        """A row's ``data_key`` is under this store's key and kept where this store keeps new
        ones (its keystore, or inline without one): ``rekey`` has nothing to do."""
        if data_key is None or self.keyring is None:
            return False
        data_key = bytes(data_key)
        if is_reference(data_key):
            return self.keystore is not None and data_key[len(KEYSTORE_REF):][:16] == self.keyring.key_id.hex().encode()
        return self.keystore is None and data_key[:8] == self.keyring.key_id

    def is_locked(self, session_id: str) -> bool:
        validate_session_id(session_id)
        row = self._run("read a session's lease",
                        lambda conn: conn.execute(self.sql.is_locked, (session_id,)).fetchone())
        return bool(row and row[0])

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
            if self._beat is not None:
                self._beat.cancel()
                self._beat = None
        if pool is not None and self._pid == os.getpid():
            pool.close()
        if self.keystore is not None:
            self.keystore.close()

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writers -------------------------------------------------------------------------------
    def _register(self, writer: PostgresWriter) -> None:
        with self._lock:
            self._writers.add(writer)
            if self._beat is None:
                self._beat = schedule(self.lease_ttl_s / 3, self._beat_due)

    def _unregister(self, writer: PostgresWriter) -> None:
        with self._lock:
            self._writers.discard(writer)

    def _beat_due(self) -> None:
        # On the shared deadline thread: quick, so the database work goes to the pool.
        run_in_background(self.renew_leases, "lease heartbeat")

    def renew_leases(self) -> None:
        """Renew every open writer's lease in one statement; mark the ones found lost."""
        with self._lock:
            self._beat = None
            writers = [w for w in self._writers if not w.closed and not w.lost]
            if self._closed:
                return
        try:
            if writers:
                def run(conn: psycopg.Connection[Any]) -> set[tuple[str, int]]:
                    rows = conn.execute(self.sql.renew, (self.lease_ttl_s, [w.session_id for w in writers],
                                                         [w.holder for w in writers], [w.gen for w in writers]))
                    return {(r[0], r[1]) for r in rows}

                kept = self._run("renew leases", run)
                for w in writers:
                    if (w.session_id, w.gen) not in kept:
                        w.mark_lost("the heartbeat found it")
        except StoreUnavailableError as exc:
            logger.debug("lease heartbeat failed: %s", exc)
        finally:
            with self._lock:
                if not self._closed and self._beat is None and any(not w.closed for w in self._writers):
                    self._beat = schedule(self.lease_ttl_s / 3, self._beat_due)

    def _commit_level(self, conn: psycopg.Connection[Any], level: str) -> None:
        """Make ``conn`` commit as ``level`` asks (``synchronous_commit``), if it does not already."""
        if self._levels.get(conn) != level:
            conn.execute("SELECT set_config('synchronous_commit', %s, false)", ("on" if level == "power" else "off",))
            self._levels[conn] = level

    def append_batch(self, writer: PostgresWriter, batch_for: Callable[[int], AppendBatch]) -> int:
        """Run the append statement; returns the new durable count.  Raises ``_LeaseLost`` or
        ``StoreUnavailableError``."""

        def run(conn: psycopg.Connection[Any]) -> int:
            self._commit_level(conn, writer.durability)
            durable = writer.durable
            for _ in range(3):
                batch = batch_for(durable)
                matched, _inserted = conn.execute(self.sql.append, batch.params).fetchone()  # type: ignore[misc]
                if matched:
                    return batch.end
                state = conn.execute(self.sql.lease_state, (writer.session_id,)).fetchone()
                durable = reconcile(writer, state, durable, batch.end)
            raise StoreUnavailableError(f"session {writer.session_id}: the stored count keeps changing")

        result: int = self._run("save the turn", run)
        return result

    def rewind_batch(self, writer: PostgresWriter, plan: RewindPlan) -> None:
        """Run a rewind's transaction (see the module docstring).  Raises ``_LeaseLost`` or
        ``StoreUnavailableError``; on either, nothing of it was committed."""
        sql = self.sql

        def run(conn: psycopg.Connection[Any]) -> None:
            self._commit_level(conn, writer.durability)
            with conn.transaction():
                state = conn.execute(sql.lock_session, (writer.session_id,)).fetchone()
                count = check_rewind_state(writer, state, plan)
                if count is None:
                    return
                if count < len(plan.old):
                    conn.execute(sql.insert_messages, plan.pending_rows(count))
                conn.execute(sql.withdraw, plan.withdraw())
                conn.execute(sql.delete_from, (writer.session_id, plan.start))
                if plan.new_end > plan.start:
                    conn.execute(sql.insert_messages, plan.insert())
                conn.execute(sql.rewound, plan.session)

        self._run("undo a turn", run)


def check_title(title: str | None) -> str | None:
    """``set_title()``'s title, cleaned (``clean_title``) and storable (no NUL)."""
    clean = clean_title(title)
    if clean is not None and "\x00" in clean:
        raise ValueError("a title cannot contain NUL characters")
    return clean


def search_params(text: str, limit: int) -> tuple[dict[str, Any] | None, str]:
    """The search statement's parameters (None when ``limit`` asks for nothing) and the needle."""
    like, regex, needle = like_pattern(text)
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be a whole number, not {limit!r}")
    return ({"like": like, "re": regex, "limit": limit} if limit > 0 else None), needle


def reconcile(writer: PostgresWriter | Any, state: tuple[Any, ...] | None, durable: int, end: int) -> int:
    """After an append matched no row: the lease is gone (raise ``_LeaseLost``), or an earlier
    attempt did commit before its connection died (return the stored count to go on from)."""
    if state is None:
        raise _LeaseLost(f"session {writer.session_id} no longer exists in the store (deleted)")
    holder, gen, count = state[0], state[1], state[2]
    if holder != writer.holder or gen != writer.gen:
        raise _LeaseLost(f"session {writer.session_id} was taken over by {holder or 'another writer'} "
                         f"(lease {gen}, ours was {writer.gen}): this writer's lease had expired")
    if durable < count <= end:
        logger.info("session %s: %d message(s) were saved by an append whose reply was lost", writer.session_id,
                    count - durable)
        return int(count)
    raise _LeaseLost(f"session {writer.session_id} holds {count} messages where this writer expected {durable}")


def _is_broken(exc: BaseException, conn: Any) -> bool:
    return bool(getattr(conn, "broken", False) or getattr(conn, "closed", False)) or "terminat" in str(exc)


def _release(store: PostgresStore, session_id: str, holder: str, gen: int, pid: int) -> None:
    """Give a lease back (close, or a writer garbage-collected without close)."""
    if os.getpid() != pid:  # a forked child never releases its parent's lease
        return

    def run(conn: Any) -> bool:
        with conn.transaction():
            dropped = conn.execute(store.sql.drop_empty, (session_id, holder, gen)).fetchone()
            conn.execute(store.sql.release, (session_id, holder, gen))
        return dropped is not None and is_reference(dropped[1])

    try:
        if store._run("release the session", run):
            store.settle_dropped_keys()
    except (StoreUnavailableError, SessionError) as exc:
        logger.warning("could not release session %s (%s); its lease expires by itself within %g s",
                       session_id, exc, store.lease_ttl_s)


class PostgresWriter:
    """The one writer of an open session in PostgreSQL; holds its lease until ``close()``."""

    def __init__(self, store: PostgresStore, record: SessionRecord, holder: str, *, gen: int, durable: int,
                 persisted: bool, cipher: SessionCipher | None = None):
        self.store = store
        self.cipher = cipher                    # an encrypted session's data key (_postgres_sealing.py)
        self._record = record
        self.holder = holder
        self.gen = gen
        self.durable = durable                  # messages[:durable] are committed
        self._persisted = persisted
        self.title_dirty = False                # a title was given that is not committed yet
        self._lock = threading.Lock()
        self._sizes: list[int] = []             # JSON size of each message, filled lazily
        self._closed = False
        self._lost: str | None = None
        self._pid = os.getpid()
        self.last_error: BaseException | None = None
        self.durability = store.durability      # "power": synchronous_commit on (see the module docstring)
        self._finalizer = weakref.finalize(self, _release, store, record.session_id, holder, gen, os.getpid())
        store._register(self)

    # -- SessionWriterAPI ------------------------------------------------------------------------
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
        """Messages appended in memory but not yet committed."""
        return len(self._record.messages) - self.durable

    def mark_lost(self, how: str) -> None:
        if self._lost is None:
            self._lost = f"session {self.session_id} was opened by another writer after this one's lease expired"
            logger.warning("%s (%s): this writer can no longer save", self._lost, how)

    def append(self, start: int, messages: list[MessageDict], meta: dict[str, Any] | None = None) -> bool:
        with self._lock:
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
            return self._write()

    def rewind(self, start: int, messages: list[MessageDict] | None = None,
               meta: dict[str, Any] | None = None) -> bool:
        with self._lock:
            if self._closed:
                raise SessionError(f"session {self.session_id} is closed")
            plan, after, sizes = plan_rewind(self, start, messages, meta)
            if self._lost is not None:
                return self._refuse("the undo is not applied")
            try:
                self.store.rewind_batch(self, plan)
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
        """The JSON size of each message of the record (filled lazily, kept)."""
        messages, sizes = self._record.messages, self._sizes
        while len(sizes) < len(messages):
            sizes.append(message_size(messages[len(sizes)]))
        return sizes

    def _refuse(self, what: str) -> bool:
        self.last_error = SessionLockedError(f"{self._lost}; {what}", session_id=self.session_id)
        logger.warning("not saved: %s", self.last_error)
        return False

    def _write(self) -> bool:
        if self._lost is not None:
            return self._refuse("the turn is kept in memory only")
        sizes = self.sizes()
        set_title = self.title_dirty
        try:
            self.durable = self.store.append_batch(self, lambda start: build_append(
                self.session_id, self.holder, self.gen, self.store.lease_ttl_s, self._record, set_title,
                start, sizes, self.cipher))
        except _LeaseLost as exc:
            self._lost = str(exc)
            return self._write()
        except StoreUnavailableError as exc:
            self.last_error = exc
            logger.warning("%s; the turn is kept in memory and will be saved with the next one", exc)
            return False
        self._persisted = True
        self.title_dirty = False
        self.last_error = None
        return True

    def flush(self, timeout: float | None = 30.0) -> bool:
        return True  # nothing runs in the background: an append is complete when it returns

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._pid:  # a forked child: the lease is its parent's
                self._finalizer.detach()
                return
            if self.pending and self._lost is None:
                self._write()
        self.store._unregister(self)
        if self._lost is None:
            self._finalizer()  # releases the lease, once
        else:
            self._finalizer.detach()

    def __enter__(self) -> PostgresWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PostgresWriter({self.session_id!r}, holder={self.holder!r}, gen={self.gen})"

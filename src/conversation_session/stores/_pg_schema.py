"""A PostgreSQL schema of this project and its named, ordered migrations (the store's tables,
the keystore's): the statements that record which steps ran, and ``migrate``."""

from __future__ import annotations

import logging
import re
import zlib
from typing import Any

from .._exceptions import StoreUnavailableError

__all__ = ["Schema", "first_line", "migrate"]

logger = logging.getLogger("conversation_session.pgstore")

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class Schema:
    """A schema's name (checked, quoted), its advisory-lock key and its migrations table."""

    def __init__(self, schema: str):
        if not _SCHEMA_RE.fullmatch(schema):
            raise ValueError(f"invalid schema name {schema!r}: use lowercase letters, digits and '_'")
        s = f'"{schema}"'
        self.schema = schema
        self.quoted = s
        self.lock_key = zlib.crc32(f"conversation_session:{schema}".encode())
        self.bootstrap = (f"CREATE SCHEMA IF NOT EXISTS {s}; "
                          f"CREATE TABLE IF NOT EXISTS {s}.migrations "
                          "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        self.applied = f"SELECT name FROM {s}.migrations"
        self.mark_applied = f"INSERT INTO {s}.migrations (name) VALUES (%s)"


def first_line(exc: BaseException) -> str:
    """An error's first line (driver errors run on over several), or its type's name."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def migrate(conn: Any, sql: Schema, migrations: list[tuple[str, str]]) -> list[str]:
    """Apply the missing steps of ``migrations`` in order, under an
    advisory lock (so two processes starting at once do not both run them); returns the names
    applied."""
    done: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (sql.lock_key,))
        conn.execute(sql.bootstrap)
        applied = {r[0] for r in conn.execute(sql.applied)}
        known = {name for name, _ in migrations}
        unknown = sorted(applied - known)
        if unknown:
            raise StoreUnavailableError(
                f"the database schema {sql.schema!r} has steps this release does not know ({', '.join(unknown)}): "
                "it was written by a newer conversation_session; upgrade this one")
        for name, ddl in migrations:
            if name not in applied:
                conn.execute(ddl.format(s=sql.quoted))
                conn.execute(sql.mark_applied, (name,))
                done.append(name)
    if done:
        logger.info("PostgreSQL schema %s: applied %s", sql.schema, ", ".join(done))
    return done

"""Where sessions live: the store protocol and its contract, the one session-id rule, the
record format, the file store (snapshot + journal), the PostgreSQL store (loaded on first use:
it needs the ``[postgres]`` extra) and housekeeping (export, import, prune, doctor).

``open_store(address)`` is the only parser of a store address.
"""

from ._api import SearchHit, SessionInfo, SessionWriterAPI, StoreAPI
from ._file import HistoryStore
from ._ids import SESSION_ID_PATTERN, SESSION_ID_RE, is_session_id, validate_session_id
from ._open import SESSIONS_DIR_ENV, STORE_ENV, default_sessions_dir, is_postgres_url, open_store

__all__ = [
    "SESSIONS_DIR_ENV",
    "SESSION_ID_PATTERN",
    "SESSION_ID_RE",
    "STORE_ENV",
    "HistoryStore",
    "SearchHit",
    "SessionInfo",
    "SessionWriterAPI",
    "StoreAPI",
    "default_sessions_dir",
    "is_postgres_url",
    "is_session_id",
    "open_store",
    "validate_session_id",
]

"""``open_store``: the only place that turns a store address (a URL or a folder) into a store."""

from __future__ import annotations

import os
from typing import Any

from .._exceptions import SessionError
from ._addresses import STORE_ENV, is_postgres_url
from ._api import StoreAPI
from ._file import HistoryStore

__all__ = ["SESSIONS_DIR_ENV", "STORE_ENV", "default_sessions_dir", "is_postgres_url", "open_store"]

SESSIONS_DIR_ENV = "CONVERSATION_SESSIONS_DIR"


def default_sessions_dir() -> str:
    return os.environ.get(SESSIONS_DIR_ENV) or "sessions"


def open_store(store: StoreAPI | str | os.PathLike[str] | None = None,
               sessions_dir: str | os.PathLike[str] | None = None, **options: Any) -> StoreAPI:
    """A store object from what the caller gave: a store, a URL, or (default) a folder.

    ``store`` wins over ``sessions_dir``; with neither, ``$CONVERSATION_SESSIONS_STORE`` (a URL)
    and then ``$CONVERSATION_SESSIONS_DIR`` (a folder, default ``sessions``) are used.
    ``options`` go to the store's constructor (``lease_ttl_s=`` for PostgreSQL, ...).

    Raises:
        SessionError: PostgreSQL asked for without the ``[postgres]`` extra.
        ValueError: an address of an unknown kind (``redis://...``).
    """
    if options.get("encryption_key", 0) is None:
        del options["encryption_key"]  # not asked for: each store applies its own default
    if store is None and sessions_dir is None:
        store = os.environ.get(STORE_ENV) or None
    if store is None:
        return HistoryStore(sessions_dir if sessions_dir is not None else default_sessions_dir(), **options)
    if is_postgres_url(store):
        try:
            from ._postgres import PostgresStore
        except ImportError as exc:
            raise SessionError("the PostgreSQL store needs the postgres extra: "
                               "pip install 'conversation-session[postgres]'") from exc
        return PostgresStore(store, **options)
    if isinstance(store, (str, os.PathLike)):
        text = os.fspath(store)
        if "://" in text and not text.startswith("file://"):
            raise ValueError(f"unknown store URL {text.split('://')[0]}://...; use postgresql://... or a folder")
        return HistoryStore(text.removeprefix("file://"), **options)
    if "encryption_key" in options:
        raise ValueError("give the key to the store object itself (HistoryStore(folder, encryption_key=...)), "
                         "not beside it")
    return store

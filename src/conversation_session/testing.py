"""Helpers for tests and benchmarks (a deliberately shared seam, shipped with the package).

A benchmark or a test that needs a session with a long history should not build it by
reaching into a session's private state: that broke ``bench/`` at each refactor, unnoticed.
``seed_session`` writes it through the store's public interface instead, so every store
(the file store, PostgreSQL) can be seeded the same way, and a session resumes it with
``load_history()`` exactly as it would a session saved by ``chat()``::

    from conversation_session import ConversationSession, FakeBackend
    from conversation_session.testing import seed_session

    sid = seed_session(folder, [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}])
    with ConversationSession(backend=FakeBackend(), sessions_dir=folder) as s:
        s.load_history(sid)
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable

# The package's public names only: the private modules behind them move between releases.
from . import HistoryStore, MessageDict, SessionNotFoundError, SessionRecord, StoreAPI

__all__ = ["seed_session"]


def seed_session(store: StoreAPI | str | os.PathLike[str], messages: Iterable[MessageDict], *,
                 session_id: str | None = None, llm_model: str = "seeded", system_prompt: str | None = None,
                 title: str | None = None) -> str:
    """Save a session holding ``messages`` in ``store`` (a store object, or a folder for the
    file store) as if its turns had been chatted; return its id.

    Written with ``StoreAPI.import_record``: validated as a load would (a bad message is a
    ``SessionFormatError``), complete or not at all, and no writer left open, so the session
    can be resumed at once.  ``session_id`` (default: a new ``seeded_<hex>`` id) must not
    exist yet: ``ValueError`` if it does, rather than a silently different id.
    """
    target: StoreAPI = HistoryStore(store) if isinstance(store, (str, os.PathLike)) else store
    history = [dict(m) for m in messages]
    if not history:
        raise ValueError("a seeded session needs at least one message")
    if session_id is None:
        session_id = f"seeded_{secrets.token_hex(6)}"
    else:
        try:
            target.load(session_id)
        except SessionNotFoundError:
            pass
        else:
            raise ValueError(f"session {session_id} already exists in {target.description}")
    record = SessionRecord(session_id=session_id, llm_model=llm_model, messages=history,  # type: ignore[arg-type]
                           system_prompt=system_prompt, title=title)
    return target.import_record(record)

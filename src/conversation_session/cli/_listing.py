"""What the chat's `sessions`, `/search` and `/delete` and the `sessions list|search|delete`
subcommands show and do, written once: the table of sessions, the search hits, the delete step."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import Any

from ..memory._kvcache import kv_file_path, remove_kv_file
from ..stores import StoreAPI, validate_session_id
from ._text import format_bytes, printable

__all__ = ["NothingDeleted", "delete_saved", "kv_bytes", "one_line", "search_lines", "session_table"]


def kv_bytes(store: object, session_id: str) -> int | None:
    """Size of the session's saved KV cache file (embedded backend), None when it has none."""
    try:
        st = os.lstat(kv_file_path(store, session_id))
    except (OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def one_line(text: str, width: int) -> str:
    line = printable(text, keep_newlines=False)
    return line[:width] + ("…" if len(line) > width else "")


def session_table(store: StoreAPI, infos: Iterable[Any], *, current: str | None = None) -> list[str]:
    """A header and one row per session: id (``*`` marks ``current``), created, updated, turns,
    the history's size, the KV file's size beside it (often far larger), and the title (else
    the first line)."""
    lines = [f"  {'ID':<26} {'CREATED':<19}  {'UPDATED':<19}  {'TURNS':>5}  {'SIZE':>8}  {'KV':>8}  TITLE"]
    for i in infos:
        kv = kv_bytes(store, i.session_id)
        mark = "*" if i.session_id == current else " "
        lines.append(f"{mark} {i.session_id:<26} {i.created_at:<19}  {i.updated_at:<19}  {i.turns:>5}  "
                     f"{format_bytes(i.size_bytes):>8}  {'–' if kv is None else format_bytes(kv):>8}  "
                     f"{one_line(i.title or i.first_user_line, 60)}")
    return lines


def search_lines(hits: Iterable[Any], width: int = 100) -> list[str]:
    """One line per hit: session, updated, where (title or #index role), the snippet."""
    out = []
    for h in hits:
        where = "title" if h.index < 0 else f"#{h.index} {h.role}"
        out.append(f"{h.session_id:<26} {h.updated_at:<19}  {where:<14} {one_line(h.snippet, width)}")
    return out


class NothingDeleted(Exception):
    """Why a delete did not happen, as one line for the user."""


def delete_saved(store: StoreAPI, session_id: str, confirm: Callable[[str], bool], *,
                 current: str | None = None) -> str:
    """Delete a saved session after ``confirm`` said yes; the line to show.  Raises
    ``NothingDeleted`` (not confirmed, the open session, no such session) and ``ValueError``
    (not an id); a store error propagates."""
    sid = validate_session_id(session_id)
    if sid == current:
        raise NothingDeleted("that is the current session; `new` first, then delete it")
    if sid not in store.newest_first():  # damaged sessions too: they can be deleted
        raise NothingDeleted(f"no saved session {sid} in {store.description}; see `sessions list`")
    if not confirm(f"Delete {sid}? This cannot be undone."):
        raise NothingDeleted("not deleted")
    if not store.delete(sid):
        raise NothingDeleted(f"no saved session {sid} in {store.description}; see `sessions list`")
    remove_kv_file(store, sid)
    return f"deleted {sid}"

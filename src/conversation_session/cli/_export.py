"""Writing a session out of the sessions folder: a consistent copy, JSON or Markdown."""

from __future__ import annotations

from pathlib import Path

from .._fileio import atomic_write_bytes
from .._store import HistoryStore, encode_snapshot

__all__ = ["export_session", "render_markdown"]


def render_markdown(store: HistoryStore, session_id: str) -> str:
    record = store.load(session_id)
    lines = [f"# {record.session_id}", "",
             f"- model: {record.llm_model}", f"- created: {record.created_at}",
             f"- updated: {record.updated_at}", f"- turns: {record.turns}", ""]
    for m in record.messages:
        lines += [f"## {m['role']}", "", m["content"], ""]
    return "\n".join(lines)


def export_session(store: HistoryStore, session_id: str, dest: Path | None = None,
                   fmt: str | None = None) -> Path:
    """Write ``session_id`` (snapshot and journal merged) to ``dest``; returns the path.

    The copy is made from a full load, so it is complete even while the session is being
    written (copying the files could catch a snapshot mid-replace or miss the journal).
    """
    dest = dest or Path(f"{session_id}.json")
    fmt = fmt or ("md" if dest.suffix.lower() in (".md", ".markdown") else "json")
    if dest.is_dir():
        dest = dest / f"{session_id}.{fmt}"
    record = store.load(session_id)
    data = render_markdown(store, session_id).encode() if fmt == "md" else encode_snapshot(record, record.messages)
    atomic_write_bytes(dest, data, mode=0o600)
    return dest

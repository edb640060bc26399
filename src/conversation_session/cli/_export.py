"""Writing a session out of its store: a consistent copy, JSON or Markdown."""

from __future__ import annotations

from pathlib import Path

from ..stores._api import StoreAPI
from ..stores._file import encode_snapshot
from ..stores._fileio import atomic_write_bytes
from ..stores._record import SessionRecord

__all__ = ["encode_record", "export_session", "render_markdown"]


def render_markdown(record: SessionRecord) -> str:
    lines = [f"# {record.session_id}", "",
             f"- model: {record.llm_model}", f"- created: {record.created_at}",
             f"- updated: {record.updated_at}", f"- turns: {record.turns}", ""]
    for m in record.messages:
        heading = f"## {m['role']}" + (" (interrupted: kept as far as it was heard)" if m.get("interrupted") else "")
        lines += [heading, "", m["content"], ""]
    return "\n".join(lines)


def encode_record(record: SessionRecord, fmt: str) -> bytes:
    """A session as a file: the session JSON format, or Markdown (``fmt="md"``)."""
    return render_markdown(record).encode() if fmt == "md" else encode_snapshot(record, record.messages)


def export_session(store: StoreAPI, session_id: str, dest: Path | None = None,
                   fmt: str | None = None, record: SessionRecord | None = None) -> Path:
    """Write ``session_id`` (snapshot and journal merged) to ``dest``; returns the path.

    The copy is made from a full load (``record``, when the caller has loaded it already), so
    it is complete even while the session is being written (copying the files could catch a
    snapshot mid-replace or miss the journal).
    """
    dest = dest or Path(f"{session_id}.json")
    fmt = fmt or ("md" if dest.suffix.lower() in (".md", ".markdown") else "json")
    if dest.is_dir():
        dest = dest / f"{session_id}.{fmt}"
    atomic_write_bytes(dest, encode_record(record or store.load(session_id), fmt), mode=0o600)
    return dest

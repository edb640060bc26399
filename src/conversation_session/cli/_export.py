"""Writing a session out of its store: a consistent copy, JSON or Markdown."""

from __future__ import annotations

from pathlib import Path

from ..stores._api import StoreAPI
from ..stores._file import encode_snapshot
from ..stores._fileio import atomic_write_bytes
from ..stores._record import MessageDict, SessionRecord
from ..tools import readable

__all__ = ["encode_record", "export_session", "render_markdown"]


def _message_lines(m: MessageDict, level: str) -> list[str]:
    mark = " (interrupted: kept as far as it was heard)" if m.get("interrupted") else ""
    return [f"{level} {m['role']}{mark}", "", readable(m), ""]


def render_markdown(record: SessionRecord) -> str:
    """The whole session as Markdown: its title as the heading (else its id), the system
    prompt, the messages, the running summary and the turns withdrawn by undo/retry."""
    lines = [f"# {_one_line(record.title) if record.title else record.session_id}", ""]
    if record.title:
        lines.append(f"- session: {record.session_id}")
    lines += [f"- model: {record.llm_model}", f"- created: {record.created_at}",
              f"- updated: {record.updated_at}", f"- turns: {record.turns}", ""]
    if record.system_prompt is not None:
        lines += ["## system prompt", "", record.system_prompt, ""]
    for m in record.messages:
        lines += _message_lines(m, "##")
    if record.summary is not None:
        lines += [f"## running summary (of the first {record.summary['covers']} message(s))", "",
                  record.summary["text"], ""]
    if record.undone:
        lines += ["## withdrawn turns (undo, retry)", ""]
        for u in record.undone:
            lines += [f"### withdrawn {u['at']} (they were messages {u['start'] + 1}-"
                      f"{u['start'] + len(u['messages'])})", ""]
            for m in u["messages"]:
                lines += _message_lines(m, "####")
    return "\n".join(lines)


def _one_line(text: str) -> str:
    return " ".join(text.split())


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

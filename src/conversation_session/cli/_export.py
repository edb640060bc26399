"""Writing a session out of its store: a consistent copy, JSON or Markdown.

An encrypted session is written sealed (``stores/_sealed_export.py``) unless plaintext is asked
for; Markdown, being for reading, is plaintext only (docs/encryption.md).
"""

from __future__ import annotations

from pathlib import Path

from .._exceptions import SessionError
from ..stores._api import StoreAPI
from ..stores._file import encode_snapshot
from ..stores._fileio import atomic_write_bytes
from ..stores._record import MessageDict, SessionRecord
from ..stores._sealed_export import encrypted_map, needs_seal, seal_export, store_keyring
from ..tools import readable

__all__ = ["PlaintextNeeded", "encode_export", "encode_record", "export_session", "render_markdown", "write_export"]


class PlaintextNeeded(SessionError):
    """An encrypted session asked for as Markdown without asking for plaintext: Markdown is for
    reading, so it cannot be sealed; the caller says how to ask (``--plaintext``)."""


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


def encode_export(store: StoreAPI, record: SessionRecord, fmt: str, *, plaintext: bool = False) -> tuple[bytes, bool]:
    """The export's bytes and whether they are sealed: an encrypted session's JSON is sealed
    with the store's key unless ``plaintext``; a plain session's is the plain JSON, as always."""
    keyring = store_keyring(store)
    if plaintext or keyring is None or not needs_seal(record.session_id, encrypted_map(store)):
        return encode_record(record, fmt), False
    if fmt == "md":
        raise PlaintextNeeded(f"session {record.session_id} is encrypted and Markdown would write it out readable")
    return seal_export(encode_record(record, "json"), record.session_id, keyring), True


def write_export(store: StoreAPI, session_id: str, dest: Path | None = None, fmt: str | None = None,
                 record: SessionRecord | None = None, *, plaintext: bool = False) -> tuple[Path, bool]:
    """Write ``session_id`` (snapshot and journal merged) to ``dest``; returns the path, and
    whether the file is sealed (an encrypted session, without ``plaintext``: ``encode_export``).

    The copy is made from a full load (``record``, when the caller has loaded it already), so
    it is complete even while the session is being written (copying the files could catch a
    snapshot mid-replace or miss the journal).
    """
    dest = dest or Path(f"{session_id}.json")
    fmt = fmt or ("md" if dest.suffix.lower() in (".md", ".markdown") else "json")
    if dest.is_dir():
        dest = dest / f"{session_id}.{fmt}"
    data, sealed = encode_export(store, record or store.load(session_id), fmt, plaintext=plaintext)
    atomic_write_bytes(dest, data, mode=0o600)
    return dest, sealed


def export_session(store: StoreAPI, session_id: str, dest: Path | None = None,
                   fmt: str | None = None, record: SessionRecord | None = None, *,
                   plaintext: bool = False) -> Path:
    """``write_export``'s path: an encrypted session is written sealed unless ``plaintext``."""
    return write_export(store, session_id, dest, fmt, record, plaintext=plaintext)[0]

"""The file store: where sessions live on disk and how they get there safely.

Each session is two files in ``sessions_dir``:

* ``<id>.json``: a snapshot in the seed's format, only ever replaced atomically, so it is
  always a complete, parseable session.
* ``<id>.journal``: turns completed since that snapshot, one JSON line each (naming its
  session and its position), appended with a single ``write`` before ``chat()`` returns.
  This is what makes a turn survive ``kill -9`` the moment it is acknowledged, at a cost that
  does not grow with the history.  At the ``power`` durability level the line is also flushed to
  the disk (``fdatasync``, shared between sessions committing at once: ``_fileio.GroupSync``),
  and the folder once per new journal, before the append returns (docs/durability.md).

Background work on the shared pool (``_runtime``) folds the journal into a fresh snapshot
after each turn and empties the journal; when turns keep arriving meanwhile, the journal is
still cut down to the turns the snapshot lacks once it holds ``FOLD_LINES`` lines or
``FOLD_BYTES`` bytes, so resuming never replays an unbounded tail.  Loading reads the journal
and then the snapshot (see ``HistoryStore.read``: that order is what makes a read consistent
while a writer is active), and replays the one on the other.

While a session is open for writing, its journal carries an exclusive ``flock``: a second
writer gets ``SessionLockedError``; the lock dies with the process, so a crash never leaves
a session locked.

What is never done: follow a symlink, open anything but a regular file (a planted FIFO
cannot make anything hang), read a file larger than ``max_file_bytes``, or truncate or
remove a journal holding lines that could not be read without first keeping a copy of it
(``<name>.corrupt-<time>``, as ``doctor --fix`` does).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .._exceptions import (
    EncryptionKeyError,
    SessionError,
    SessionFormatError,
    SessionLockedError,
    SessionNotFoundError,
)
from .._runtime import run_in_background
from ._api import SearchHit, SessionInfo, make_snippet
from ._crypto import (
    Keyring,
    SessionCipher,
    is_encrypted_journal,
    is_encrypted_snapshot,
    load_key,
    open_journal,
    open_snapshot,
    register_directory,
)
from ._durability import resolve_durability
from ._fileio import (
    NotARegularFileError,
    atomic_write_bytes,
    dir_lock,
    flock_holder,
    fsync_dir,
    group_sync,
    open_regular,
    process_label,
    read_regular_file_stat,
)
from ._ids import SESSION_ID_RE, validate_session_id
from ._keystore import Keystore, KeystoreCipher, recorded_keystores, refs_in, resolve_keystore
from ._record import (
    META_FIELDS,
    UTF8_BOM,
    JournalRecordDict,
    MessageDict,
    SessionRecord,
    UndoneDict,
    clean_title,
    count_turns,
    now_iso,
    parse_journal_line,
)

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "FOLD_BYTES",
    "FOLD_LINES",
    "HistoryStore",
    "JournalReplay",
    "SessionInfo",
    "SessionWriter",
    "aside_path",
    "encode_json",
    "encode_snapshot",
    "parse_json_bytes",
    "replay_journal",
    "search_record",
]

logger = logging.getLogger("conversation_session.store")

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
FOLD_LINES = 64
"""A journal holding this many lines is cut down at the next snapshot even while turns keep
arriving (normally it is simply emptied when no turn arrived during the snapshot)."""
FOLD_BYTES = 1024 * 1024
"""... or this many bytes."""
ROOM_MARGIN = 64 * 1024
"""Head fields and per-line overhead: ``ensure_room`` keeps this much below the read limit."""

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CACHE_NAME = ".list-cache.json"
_CACHE_VERSION = 2  # 2: heads carry the title and the number of rewinds
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


# One encoder, built once: json.dumps(..., ensure_ascii=False) builds a new one per call.
encode_json = json.JSONEncoder(ensure_ascii=False).encode


def encode_snapshot(record: SessionRecord, messages: list[MessageDict], encoded: list[str] | None = None,
                    *, turns: int | None = None) -> bytes:
    """Serialise a snapshot like the seed shows it: one message per line, Chinese readable.

    Each message goes through the C JSON encoder on its own (``indent=`` would switch to the
    pure-Python one); ``encoded``, the messages already encoded, spares even that, and
    ``turns``, the count the caller keeps, spares a recount.
    """
    data = record.to_dict(messages, turns=turns)
    head = ",\n".join(
        f"  {json.dumps(k)}: {encode_json(v)}" for k, v in data.items() if k != "conversation_history"
    )
    if messages:
        lines = encoded if encoded is not None else [encode_json(m) for m in messages]
        body = ",\n    ".join(lines)
        history = f'  "conversation_history": [\n    {body}\n  ]'
    else:
        history = '  "conversation_history": []'
    return f"{{\n{head},\n{history}\n}}\n".encode()


def parse_json_bytes(raw: bytes | bytearray, label: str, path: Path | None = None) -> object:
    """``json.loads`` of a file's bytes; every failure is a ``SessionFormatError`` starting with ``label``.

    A UTF-8 byte order mark (an editor's) is accepted."""
    if raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SessionFormatError(f"{label}: not UTF-8 ({exc.reason})", path=path) from exc
    except RecursionError as exc:
        raise SessionFormatError(f"{label}: JSON nested too deeply", path=path) from exc
    except ValueError as exc:
        raise SessionFormatError(f"{label}: not valid JSON ({exc})", path=path) from exc


def _cache_label(session_id: str) -> bytes:
    return b"conversation-session list cache\0" + session_id.encode()


def aside_path(path: Path, stamp: str | None = None) -> Path:
    """A free ``<name>.corrupt-<YYYYmmddHHMMSS>[-n]`` beside ``path`` (where damaged files go)."""
    stamp = stamp or datetime.now().strftime("%Y%m%d%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 2
    while os.path.lexists(target):
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    return target


# -- journal replay: the one copy, used by loading, listing and doctor ------------------------
@dataclass
class JournalReplay:
    """What a journal does to a snapshot holding ``base`` messages.

    Without undo the journal only adds ``new_messages``; an undo/retry line (``rewind``) may also
    withdraw snapshot messages: the result is the snapshot's first ``keep`` messages followed by
    ``new_messages``, and ``undone`` lists what the journal's rewinds withdrew.  ``cut_turns`` is
    how many of the snapshot's replies were withdrawn (so a listing counts turns without the
    snapshot's messages at hand).

    ``problem`` is ``(kind, detail)`` for doctor: ``torn-journal`` (an unacknowledged write
    cut off by a crash: harmless), ``damaged-journal`` or ``foreign-journal``.  ``unread``
    is True when lines that may hold acknowledged turns were skipped: the journal must then
    be copied aside before it is ever truncated or removed.  ``clean`` is False when nothing
    may be appended to the journal (the new lines would hide behind the damage).
    """

    base: int
    keep: int = -1
    new_messages: list[MessageDict] = field(default_factory=list)
    undone: list[UndoneDict] = field(default_factory=list)
    cut_turns: int = 0
    updated_at: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    clean: bool = True
    unread: bool = False
    problem: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.keep < 0:
            self.keep = self.base

    @property
    def count(self) -> int:
        return self.keep + len(self.new_messages)

    def apply(self, record: SessionRecord) -> None:
        """Make ``record`` (the snapshot this replay was made over) the session as journaled."""
        if self.keep < len(record.messages):
            del record.messages[self.keep:]
        record.messages.extend(self.new_messages)
        record.undone.extend(self.undone)
        if self.updated_at is not None:
            record.updated_at = self.updated_at
        record.apply_meta(self.meta)


def replay_journal(raw: bytes | bytearray, session_id: str, base: int, folded: int = 0) -> JournalReplay:
    """Replay a journal's bytes over a snapshot of ``base`` messages (which need not be at hand)
    that already holds ``folded`` rewinds (``len(record.undone)``).

    Lines of another session are skipped (and make the journal ``unread``); the first line
    that is damaged, or starts past the messages known so far, ends the replay.  Lines up to the
    last rewind the snapshot already holds are skipped: the snapshot was written after them.
    """
    out = JournalReplay(base=base)
    body: bytes | bytearray = raw[len(UTF8_BOM):] if raw.startswith(UTF8_BOM) else raw
    if not body:
        return out
    lines: list[bytes] = bytes(body).split(b"\n")  # (one copy of a journal kept short by folding)
    entries: list[tuple[int, JournalRecordDict]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = parse_journal_line(line)
        except SessionFormatError as exc:
            out.clean = False
            if n == len(lines):  # the bytes after the last newline: a write cut off by a crash
                out.problem = ("torn-journal", f"line {n} is incomplete ({exc}), left by a write that was cut off")
            else:
                out.unread = True
                out.problem = ("damaged-journal", f"line {n} is damaged ({exc}); lines after it are not loaded")
            break
        owner = entry.get("session_id")
        if owner is not None and owner != session_id:
            out.unread = True
            out.clean = False
            if out.problem is None:
                out.problem = ("foreign-journal", f"line {n} belongs to session {owner!r}, not {session_id}; "
                                                  "such lines are not loaded")
            continue
        entries.append((n, entry))
    # The snapshot holds every line up to (and including) the last rewind it has folded.
    skip = max((i for i, (_n, e) in enumerate(entries) if e.get("rewind", folded + 1) <= folded), default=-1)
    rewinds = folded
    for n, entry in entries[skip + 1:]:
        start, msgs = entry["start"], entry["messages"]
        count = out.count
        if start > count:
            out.unread = True
            out.clean = False
            out.problem = ("damaged-journal", f"line {n} starts at message {start} but only {count} exist; "
                                              "lines from there are not loaded")
            return out
        if "rewind" in entry:
            if entry["rewind"] != rewinds + 1:
                out.unread = True
                out.clean = False
                out.problem = ("damaged-journal", f"line {n} is undo number {entry['rewind']} but {rewinds} are "
                                                  "known; lines from there are not loaded")
                return out
            rewinds += 1
            withdrawn = entry.get("undone", [])
            if start >= out.keep:
                del out.new_messages[start - out.keep:]
            else:
                out.cut_turns += count_turns(withdrawn[:out.keep - start])
                out.keep = start
                out.new_messages.clear()
            out.undone.append({"at": entry["updated_at"], "start": start, "messages": withdrawn})
            fresh = msgs
        else:
            # Lines already folded into the snapshot overlap it; take only what is new.
            fresh = msgs[count - start:]
        out.new_messages.extend(fresh)
        out.updated_at = entry["updated_at"]
        if "meta" in entry:
            out.meta.update(entry["meta"])
    return out


def _log_replay(name: str, replay: JournalReplay) -> None:
    if replay.problem is None:
        return
    kind, detail = replay.problem
    logger.log(logging.DEBUG if kind == "torn-journal" else logging.WARNING, "%s: %s", name, detail)


def _marks(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _first_line(messages: Iterable[MessageDict]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    stripped = first.strip()
    return stripped.splitlines()[0] if stripped else ""


class HistoryStore:
    """All sessions in one directory (the file implementation of ``StoreAPI``)."""

    def __init__(self, directory: str | os.PathLike[str], *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 durability: str | None = None,
                 encryption_key: bytes | str | os.PathLike[str] | None = None,
                 keystore: str | os.PathLike[str] | None = None):
        # Resolved once: a later os.chdir() must not send turns to another folder.
        self.directory = Path(os.path.abspath(os.fspath(directory)))
        self.max_file_bytes = max_file_bytes
        # The level of the writers it makes (each may be changed: ``SessionWriter.durability``).
        self.durability = resolve_durability(durability)
        # With a key, new sessions are encrypted (docs/encryption.md); plain ones stay plain.
        key = load_key(encryption_key)
        # Where the sessions' data keys are kept (docs/encryption.md): a folder named, or beside
        # the key file, must be usable now; the default inside the folder is made at first need.
        # Without a key it is still known, so that deleting a session deletes its key.
        where, named = resolve_keystore(keystore, encryption_key, self.directory)
        self.keystore: Keystore | None = None if where is None else Keystore(
            where, self.directory, create=named and key is not None)
        self.keyring: Keyring | None = Keyring(key, self.keystore) if key is not None else None
        if self.keyring is not None:
            register_directory(self.directory, self.keyring)  # the KV files beside the sessions

    @property
    def encrypted(self) -> bool:
        """True if this store has a key (its new sessions are encrypted)."""
        return self.keyring is not None

    def new_cipher(self, session_id: str) -> SessionCipher | None:
        return self.keyring.new_cipher(session_id) if self.keyring is not None else None

    def also_read_with(self, key: bytes | str | os.PathLike[str] | None,
                       keystore: str | os.PathLike[str] | None = None) -> None:
        """Also read sessions under another key (``rekey``: those not changed over yet), whose
        data keys are in ``keystore`` (default: where that key's would be); ``key`` None:
        ``$CONVERSATION_SESSION_KEY_FILE``'s, if set."""
        if self.keyring is None or self.keystore is None:
            raise SessionError("also_read_with needs a store with a key")
        old = load_key(key)
        if old is None:
            return
        self.keyring.also_read_with(old)
        where, _named = resolve_keystore(keystore, key, self.directory)
        if where is not None and where != self.keystore.directory:
            self.keystore.also_from.append(Keystore(where, self.directory, create=False))

    @property
    def description(self) -> str:
        return str(self.directory)

    def close(self) -> None:
        """Nothing to release: the file store holds no connection."""

    # -- paths ---------------------------------------------------------------------------
    def snapshot_path(self, session_id: str) -> Path:
        return self.directory / f"{validate_session_id(session_id)}.json"

    def journal_path(self, session_id: str) -> Path:
        return self.directory / f"{validate_session_id(session_id)}.journal"

    def kv_path(self, session_id: str) -> Path:
        """Where the session's saved KV cache lives (embedded backend only)."""
        return self.directory / f"{validate_session_id(session_id)}.kv"

    def ensure_dir(self) -> None:
        """Create ``sessions_dir`` private to the user (0700) if it does not exist."""
        if not self.directory.is_dir():
            try:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise SessionError(
                    f"cannot create the sessions folder {self.directory}: {exc.strerror or exc}; "
                    "choose another with sessions_dir=..."
                ) from exc

    def _exists(self, session_id: str) -> bool:
        return os.path.lexists(self.snapshot_path(session_id)) or os.path.lexists(self.journal_path(session_id))

    # -- reading: the one consistent-read rule ---------------------------------------------
    def _read_file(self, path: Path) -> tuple[bytearray, os.stat_result] | None:
        """The file's bytes and identity; None if there is no such file."""
        try:
            return read_regular_file_stat(path, self.max_file_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            hint = "; `doctor --fix` moves it aside" if isinstance(exc, NotARegularFileError) else ""
            raise SessionFormatError(f"{path.name}: cannot read ({exc.strerror or exc}){hint}", path=path) from exc

    def _parse_snapshot(self, session_id: str, raw: bytes | bytearray) -> SessionRecord:
        return self._open_snapshot(session_id, raw)[0]

    def _open_snapshot(self, session_id: str, raw: bytes | bytearray) -> tuple[SessionRecord, SessionCipher | None]:
        snap = self.snapshot_path(session_id)
        cipher = None
        if is_encrypted_snapshot(raw):
            raw, cipher = open_snapshot(raw, session_id, self.keyring, snap.name)
        data = parse_json_bytes(raw, snap.name, snap)
        try:
            record = SessionRecord.from_dict(data, raw=raw)
        except SessionFormatError as exc:
            raise SessionFormatError(f"{snap.name}: {exc}", path=snap) from None
        if record.session_id != session_id:
            logger.warning("%s says session_id=%r; using the file name", snap.name, record.session_id)
            record.session_id = session_id
        return record, cipher

    def _plain_journal(self, session_id: str, raw: bytes | bytearray, cipher: SessionCipher | None,
                       encrypted: bool = False) -> tuple[bytes | bytearray, SessionCipher | None]:
        """The journal's lines in plaintext (an encrypted session's are decrypted and checked)."""
        plain, found = open_journal(raw, session_id, self.keyring, self.journal_path(session_id).name,
                                    encrypted_session=encrypted or cipher is not None)
        return plain, cipher or found

    def read(self, session_id: str) -> tuple[SessionRecord, JournalReplay, bytearray | None]:
        """The consistent read every reader uses: the session as of one moment, with every
        append acknowledged before the call, while a writer may be active.

        The journal is read *before* the snapshot.  A writer only ever empties (or cuts down)
        the journal after the snapshot holding those turns is in place, so a snapshot read
        after the journal is at least as new as the journal's base: whatever the interleaving,
        journal + snapshot holds every turn either held when the read began.  (Reading the
        snapshot first can pair an old snapshot with a journal emptied meanwhile, and miss turns.)

        Returns the record, the journal's replay and the journal's bytes (None if none).
        """
        record, replay, raw, _cipher = self._read(session_id)
        return record, replay, raw

    def _read(self, session_id: str) -> tuple[SessionRecord, JournalReplay, bytearray | None, SessionCipher | None]:
        """``read``, and the session's cipher if it is encrypted."""
        validate_session_id(session_id)
        t0 = time.perf_counter()
        jpath, spath = self.journal_path(session_id), self.snapshot_path(session_id)
        journal = self._read_file(jpath)
        snapshot = self._read_file(spath)
        if snapshot is None and journal is None:
            raise SessionNotFoundError(f"no saved session {session_id} in {self.directory}", session_id=session_id)
        cipher = None
        if snapshot is not None:
            record, cipher = self._open_snapshot(session_id, snapshot[0])
        else:
            record = SessionRecord(session_id=session_id, llm_model="unknown", created_at="", updated_at="")
        raw = journal[0] if journal is not None else None
        plain, cipher = self._plain_journal(session_id, raw or b"", cipher)
        replay = replay_journal(plain, session_id, len(record.messages), len(record.undone))
        _log_replay(jpath.name, replay)
        replay.apply(record)
        if not record.created_at:
            # A session that crashed before its first snapshot: date it by its journal.
            record.created_at = record.updated_at or now_iso()
        if logger.isEnabledFor(logging.DEBUG):
            size = (len(snapshot[0]) if snapshot is not None else 0) + (len(raw) if raw else 0)
            logger.debug("loaded %s: %d messages, %d bytes in %.2f ms", spath, len(record.messages), size,
                         (time.perf_counter() - t0) * 1000)
        return record, replay, raw, cipher

    def load(self, session_id: str) -> SessionRecord:
        """Read a session (journal + snapshot, consistently) without taking its lock.

        Raises:
            ValueError: ``session_id`` is not a plain session name.
            SessionNotFoundError: there is no such session (a ``FileNotFoundError``).
            SessionFormatError: the session's files are unreadable or malformed.
        """
        return self.read(session_id)[0]

    def candidates(self) -> list[tuple[float, str]]:
        """Session ids in the folder with their last-modified time, newest first (no file is read)."""
        newest: dict[str, float] = {}
        try:
            entries = list(os.scandir(self.directory))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise SessionError(f"cannot read the sessions folder {self.directory}: {exc.strerror or exc}") from exc
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or ext not in ("json", "journal") or not SESSION_ID_RE.fullmatch(stem):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            newest[stem] = max(newest.get(stem, 0.0), st.st_mtime)
        return sorted(((m, s) for s, m in newest.items()), reverse=True)

    def newest_first(self) -> list[str]:
        """Session ids, most recently updated first (cheap: no history is read)."""
        return [sid for _mtime, sid in self.candidates()]

    def load_newest(self, exclude: Iterable[str] = ()) -> SessionRecord | None:
        """The most recently updated session that loads and has at least one message."""
        skip = set(exclude)
        for session_id in self.newest_first():
            if session_id in skip:
                continue
            try:
                record = self.load(session_id)
            except (SessionFormatError, EncryptionKeyError, OSError) as exc:
                logger.warning("skipping session %s: %s", session_id, exc)
                continue
            if record.messages:
                return record
        return None

    # -- listing, through a small cache ------------------------------------------------------
    def _read_cache(self) -> dict[str, Any]:
        try:
            raw = read_regular_file_stat(self.directory / _CACHE_NAME, 16 * 1024 * 1024)[0]
            data = json.loads(raw)
        except (OSError, ValueError, RecursionError):
            return {}
        if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION:
            return {}
        sessions = data.get("sessions")
        return sessions if isinstance(sessions, dict) else {}

    def _cached_head(self, session_id: str, entry: object, marks: list[int]) -> dict[str, Any] | None:
        """A cache entry's snapshot summary, if it describes exactly this snapshot file.

        An encrypted session's summary (its first line, its title) is kept sealed by the key."""
        if not isinstance(entry, dict) or entry.get("marks") != marks:
            return None
        head = entry.get("head")
        if isinstance(entry.get("sealed"), str):
            opened = None if self.keyring is None else self.keyring.unseal(entry["sealed"], _cache_label(session_id))
            try:
                head = json.loads(opened) if opened is not None else None
            except ValueError:
                head = None
            if isinstance(head, dict):
                head["encrypted"] = True
        types = {"created_at": str, "updated_at": str, "llm_model": str, "turns": int, "total": int, "first": str,
                 "rewinds": int}
        if not isinstance(head, dict) or any(type(head.get(k)) is not t for k, t in types.items()):
            return None
        return head

    def _info(self, session_id: str, cache: dict[str, Any], fresh: dict[str, Any]) -> SessionInfo | None:
        """One listing row: read the journal, then the snapshot only if the cache does not
        describe it (same inode, size, mtime and ctime).  The consistent-read order as ``read``."""
        jpath, spath = self.journal_path(session_id), self.snapshot_path(session_id)
        journal = self._read_file(jpath)
        head: dict[str, Any] | None = None
        size = 0
        try:
            st = os.stat(spath, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            marks = _marks(st)
            head = self._cached_head(session_id, cache.get(session_id), marks)
            if head is None:
                snapshot = self._read_file(spath)
                if snapshot is not None:
                    record = self._parse_snapshot(session_id, snapshot[0])
                    marks = _marks(snapshot[1])
                    head = {"created_at": record.created_at, "updated_at": record.updated_at,
                            "llm_model": record.llm_model, "turns": count_turns(record.messages),
                            "total": len(record.messages), "first": _first_line(record.messages),
                            "title": record.title, "rewinds": len(record.undone)}
                    if is_encrypted_snapshot(snapshot[0]):
                        head["encrypted"] = True
                    st = snapshot[1]
            if head is not None:
                if head.get("encrypted") and self.keyring is not None:
                    plain_head = {k: v for k, v in head.items() if k != "encrypted"}
                    fresh[session_id] = {"marks": marks, "sealed": self.keyring.seal(
                        json.dumps(plain_head, ensure_ascii=False).encode(), _cache_label(session_id))}
                else:
                    fresh[session_id] = {"marks": marks, "head": head}
                size += st.st_size
        if head is None:
            if journal is None:
                return None
            head = {"created_at": "", "updated_at": "", "llm_model": "unknown", "turns": 0, "total": 0, "first": "",
                    "title": None, "rewinds": 0}
        updated_at, turns, total, first = head["updated_at"], head["turns"], head["total"], head["first"]
        title = head.get("title") if isinstance(head.get("title"), str) else None
        if journal is not None:
            size += journal[1].st_size
            plain, cipher = self._plain_journal(session_id, journal[0], None, bool(head.get("encrypted")))
            if cipher is not None:
                head["encrypted"] = True
            replay = replay_journal(plain, session_id, total, head["rewinds"])
            _log_replay(jpath.name, replay)
            if replay.keep < total:
                # An undo withdrew messages of the snapshot: its first line may be among them.
                first = "" if replay.keep == 0 else first
                turns -= replay.cut_turns
            total = replay.count
            turns += count_turns(replay.new_messages)
            updated_at = replay.updated_at or updated_at
            first = first or _first_line(replay.new_messages)
            if "title" in replay.meta:
                title = replay.meta["title"]
        if not total:
            return None
        created_at = head["created_at"] or updated_at
        return SessionInfo(session_id=session_id, location=str(spath), created_at=created_at,
                           updated_at=updated_at or created_at, llm_model=head["llm_model"], turns=turns,
                           total_messages=total, size_bytes=size, first_user_line=first, title=title,
                           encrypted=bool(head.get("encrypted")))

    def _locked_info(self, session_id: str) -> SessionInfo:
        """The row of an encrypted session listed without its key: what the files' names and
        dates say, nothing of their content."""
        sts = []
        for path in (self.snapshot_path(session_id), self.journal_path(session_id)):
            with contextlib.suppress(FileNotFoundError):  # deleted meanwhile: then it is not listed
                sts.append(path.stat())
        if not sts:
            raise SessionNotFoundError(f"session {session_id} was deleted while it was listed")
        created = datetime.fromtimestamp(min(st.st_mtime for st in sts)).isoformat(timespec="seconds")
        updated = datetime.fromtimestamp(max(st.st_mtime for st in sts)).isoformat(timespec="seconds")
        return SessionInfo(session_id=session_id, location=str(self.snapshot_path(session_id)), created_at=created,
                           updated_at=updated, llm_model="", turns=0, total_messages=0,
                           size_bytes=sum(st.st_size for st in sts), first_user_line="(encrypted)", encrypted=True)

    def list_sessions(self) -> list[SessionInfo]:
        """Every readable session with at least one message, newest first; bad files are logged.

        A session's snapshot is parsed only when it changed since the last listing (a small
        cache, ``.list-cache.json``, keyed by each file's identity); its journal, short by
        construction, is always replayed.  So a listing of a folder that mostly sits still
        costs a stat and a small read per session, whatever the histories' length.
        """
        cache = self._read_cache()
        fresh: dict[str, Any] = {}
        out = []
        for session_id in self.newest_first():
            try:
                try:
                    info = self._info(session_id, cache, fresh)
                except EncryptionKeyError:
                    info = self._locked_info(session_id)
                    if session_id in cache:
                        fresh[session_id] = cache[session_id]  # another key's sealed entry: keep it
            except (SessionFormatError, OSError) as exc:
                logger.warning("skipping session %s: %s", session_id, exc)
                continue
            if info is not None:
                out.append(info)
        if fresh != cache:
            # Best effort: a read-only folder simply lists without a cache.
            with contextlib.suppress(OSError):
                data = json.dumps({"version": _CACHE_VERSION, "sessions": fresh}, ensure_ascii=False)
                # A cache: rebuilt from the sessions if lost, so no fsync (listing stays cheap).
                atomic_write_bytes(self.directory / _CACHE_NAME, data.encode(), durable=False)
        return out

    # -- locks ------------------------------------------------------------------------------
    def _lock_journal(self, session_id: str, *, create: bool) -> int | None:
        """Open the session's journal and take its exclusive lock; None if there is none.

        Raises ``SessionLockedError`` if a writer holds it and ``NotARegularFileError`` if
        something else than a regular file stands there.  Callers hold the folder lock.
        """
        path = self.journal_path(session_id)
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
        while True:
            try:
                fd = open_regular(path, flags)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = flock_holder(fd)
                os.close(fd)
                label = process_label(holder) if holder and holder != os.getpid() else None
                who = ("another session object in this process" if holder == os.getpid()
                       else f"process {holder}" + (f" ({label})" if label else "") if holder else "another process")
                raise SessionLockedError(
                    f"session {session_id} is open for writing by {who}; close it there first, "
                    "or start a new session",
                    session_id=session_id, holder=str(holder) if holder else None,
                ) from None
            # The previous holder may have removed or replaced the journal after we opened
            # it; a lock on that orphan would protect nothing, so start again on the live path.
            try:
                st_path = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                st_path = None
            st_fd = os.fstat(fd)
            if st_path is not None and (st_path.st_ino, st_path.st_dev) == (st_fd.st_ino, st_fd.st_dev):
                return fd
            os.close(fd)
            if not create and st_path is None:
                return None

    def is_locked(self, session_id: str) -> bool:
        """True if ``session_id`` is open for writing (its journal holds a ``flock``).

        The probe runs under the folder lock, which every writer takes while it acquires its
        own lock, so a writer starting at the same moment never sees the probe as a rival.
        """
        path = self.journal_path(session_id)
        if not self.directory.is_dir():
            return False
        with dir_lock(self.directory):
            try:
                fd = open_regular(path, os.O_RDONLY)
            except OSError:
                return False  # none, a symlink, a FIFO...: no writer can hold it
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(fd)  # also releases the probe's own lock
        return False

    # -- ids ---------------------------------------------------------------------------------
    def _names(self, preferred: str | None) -> Iterable[str]:
        if preferred is not None:
            yield preferred
        base = f"session_{int(time.time())}"
        for n in range(1, 100_000):
            yield base if n == 1 else f"{base}_{n}"

    def _claim_id(self, preferred: str | None = None) -> tuple[str, int]:
        """The one id allocation (``create``, ``import``): a free name, its new journal created
        and locked, under the folder lock, so no two processes ever get the same id."""
        with dir_lock(self.directory):
            for session_id in self._names(preferred):
                if os.path.lexists(self.snapshot_path(session_id)):
                    continue
                try:
                    fd = os.open(self.journal_path(session_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                                 | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
                except FileExistsError:
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
                return session_id, fd
        raise SessionError(f"no free session name in {self.directory}")  # pragma: no cover

    def _free_id(self) -> str:
        """A name free right now, for a session that cannot create its files yet."""
        for session_id in self._names(None):
            if not self._exists(session_id):
                return session_id
        raise SessionError(f"no free session name in {self.directory}")  # pragma: no cover

    def _folder_error(self, action: str, exc: OSError) -> SessionError:
        return SessionError(f"cannot {action} {self.directory}: {exc.strerror or exc}; check that the folder is "
                            "writable, or choose another with sessions_dir=... (--sessions-dir)")

    # -- writing -------------------------------------------------------------------------
    def create(self, llm_model: str, *, session_id: str | None = None) -> SessionWriter:
        """Start a new session named ``session_id`` when that name is free (the service names a
        session's file after its own id), else ``session_<unix seconds>``, with a suffix if that
        is taken.

        In a folder that cannot be written (a backup mounted read-only), this still returns a
        writer: it creates its files at its first append, which returns False (and logs why)
        while it cannot.
        """
        preferred = None if session_id is None else validate_session_id(session_id)
        try:
            self.ensure_dir()
            session_id, fd = self._claim_id(preferred)
        except (OSError, SessionError) as exc:
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            if not (isinstance(cause, OSError) and cause.errno in _READ_ONLY_ERRNOS):
                if isinstance(exc, SessionError):
                    raise
                raise self._folder_error("create a session in", exc) from exc
            session_id = preferred if preferred is not None and not self._exists(preferred) else self._free_id()
            logger.info("%s is not writable (%s); session %s will be created at its first save",
                        self.directory, cause.strerror or cause, session_id)
            record = SessionRecord(session_id=session_id, llm_model=llm_model)
            return SessionWriter(_Core(self, record, None, snapshot_upto=None, persisted=False,
                                       cipher=self.new_cipher(session_id)))
        record = SessionRecord(session_id=session_id, llm_model=llm_model)
        return SessionWriter(_Core(self, record, fd, snapshot_upto=None, persisted=False,
                                   cipher=self.new_cipher(session_id)))

    def open(self, session_id: str) -> tuple[SessionWriter, SessionRecord]:
        """Open an existing session for writing: lock it, then load it (so nothing is missed).

        A journal holding lines that cannot be read (damaged, or another session's) is first
        copied to ``<id>.journal.corrupt-<time>``; the log says where.

        Raises:
            SessionNotFoundError, SessionLockedError, SessionFormatError, SessionError.
        """
        validate_session_id(session_id)
        if not self._exists(session_id):
            raise SessionNotFoundError(f"no saved session {session_id} in {self.directory}", session_id=session_id)
        journal = self.journal_path(session_id)
        try:
            with dir_lock(self.directory):
                created = not os.path.lexists(journal)
                fd = self._lock_journal(session_id, create=True)
        except NotARegularFileError as exc:
            raise SessionFormatError(f"{journal.name}: {exc.strerror}; `doctor --fix` moves it aside",
                                     path=journal) from exc
        except OSError as exc:
            raise self._folder_error("open a session for writing in", exc) from exc
        assert fd is not None
        try:
            record, replay, raw, cipher = self._read(session_id)
            if (cipher is None and self.keyring is not None and not record.messages
                    and not os.path.exists(self.snapshot_path(session_id)) and b"\n" not in bytes(raw or b"")):
                # Nothing was saved yet but a torn first line (a crash while a new session with
                # a key wrote it): it is encrypted from its first turn, as any new session is.
                cipher = self.new_cipher(session_id)
            if replay.unread and raw:
                target = aside_path(journal)
                atomic_write_bytes(target, bytes(raw))
                logger.warning("%s holds lines that cannot be loaded (%s); a copy is kept as %s before the "
                               "journal is rewritten", journal.name, replay.problem[1] if replay.problem else "?",
                               target)
            persisted = True
            core = _Core(self, dataclasses.replace(record, messages=list(record.messages)), fd,
                         snapshot_upto=replay.base if not replay.undone and
                         os.path.exists(self.snapshot_path(session_id)) else None,
                         persisted=persisted, cipher=cipher)
        except BaseException:
            # Leave a damaged session as it was found: no empty journal beside it.
            if created:
                with contextlib.suppress(OSError):
                    journal.unlink()
            os.close(fd)
            raise
        # A journal that does not end cleanly is never appended to: the first save is a snapshot.
        core.journal_torn = not replay.clean
        core.journal_lines = raw.count(b"\n") if raw else 0
        return SessionWriter(core), record

    def delete(self, session_id: str, *, idle_before: float | None = None) -> bool:
        """Delete a session's files; refuses (``SessionLockedError``) while it is open for writing.

        ``idle_before`` (retention): only if its last update is older than that Unix time,
        checked under the folder lock and the journal's lock, so no writer can add a turn
        between the check and the removal (False, nothing removed, if it is newer)."""
        validate_session_id(session_id)
        if not self.directory.is_dir():
            return False
        removed = False
        with dir_lock(self.directory):
            try:
                fd = self._lock_journal(session_id, create=False)
            except NotARegularFileError:
                fd = None  # a planted FIFO or link: nobody can hold it, just remove the name
            try:
                if idle_before is not None and self._updated_since(session_id, idle_before):
                    return False
                refs = self._key_refs(session_id)
                for p in (self.snapshot_path(session_id), self.journal_path(session_id)):
                    try:
                        p.unlink()
                        removed = True
                    except FileNotFoundError:
                        pass
                    except IsADirectoryError:
                        logger.warning("not deleted: %s is a directory (doctor reports it)", p)
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    self.kv_path(session_id).unlink()
                # Only now that no file names them: a crash before this leaves keys whose session
                # is gone (``doctor --fix`` removes them), never a session without its key.  Every
                # keystore this folder ever wrote to, so that a deletion without the key (or with
                # another keystore) still destroys the session's data keys.
                for keystore in self._keystores():
                    keystore.remove_session(session_id, refs)
            finally:
                if fd is not None:
                    os.close(fd)
        return removed

    def _keystores(self) -> list[Keystore]:
        """This store's keystore and the others the folder's sessions used (``.keystores/``)."""
        own = [self.keystore] if self.keystore is not None else []
        known = {k.directory for k in own}
        others = [Keystore(p, self.directory, create=False) for p in recorded_keystores(self.directory)
                  if p not in known]
        return own + others

    def _key_refs(self, session_id: str) -> set[str]:
        """The keystore entries a session's files name (snapshot header, journal lines, KV header)."""
        refs: set[str] = set()
        for path, limit in ((self.snapshot_path(session_id), 4096), (self.journal_path(session_id), None),
                            (self.kv_path(session_id), 4096)):
            with contextlib.suppress(OSError):  # a planted FIFO or link names no key: never opened blocking
                with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
                    refs |= refs_in(f.read(limit if limit is not None else self.max_file_bytes))
        return refs

    def _updated_since(self, session_id: str, when: float) -> bool:
        """True if the session changed at or after Unix time ``when`` (its ``updated_at``, else
        its files' modification time); a session that cannot be read counts as recent: it is
        never removed by age (``doctor`` deals with it)."""
        try:
            record = self.load(session_id)
            updated = record.updated_at or record.created_at
        except SessionNotFoundError:
            return False
        except EncryptionKeyError:
            updated = ""  # encrypted, no key here: its files' dates say when it was last written
        except (SessionError, OSError):
            return True
        try:
            return datetime.fromisoformat(updated).timestamp() >= when
        except (TypeError, ValueError, OverflowError, OSError):
            mtimes = [p.stat().st_mtime for p in (self.snapshot_path(session_id), self.journal_path(session_id))
                      if p.exists()]
            return max(mtimes, default=0.0) >= when

    def import_record(self, record: SessionRecord) -> str:
        """Store a whole session; keeps its id when free, else a new one; returns the id.

        The record is validated as a load would (every message, every string), and must fit
        within the size the loader reads."""
        try:
            data = encode_snapshot(record, record.messages)
            again = SessionRecord.from_dict(json.loads(data), raw=data)
        except (ValueError, UnicodeEncodeError) as exc:
            raise SessionFormatError(f"not a valid session: {exc}") from exc
        if not again.messages:
            raise SessionFormatError("it has no messages")
        if len(data) > self.max_file_bytes:
            raise SessionFormatError(f"it is {len(data):,} bytes, over the {self.max_file_bytes:,}-byte limit")
        self.ensure_dir()
        wanted = record.session_id if SESSION_ID_RE.fullmatch(record.session_id) else None
        try:
            session_id, fd = self._claim_id(wanted)
        except OSError as exc:
            raise self._folder_error("import a session into", exc) from exc
        journal = self.journal_path(session_id)
        try:
            again.session_id = session_id
            data = encode_snapshot(again, again.messages)
            cipher = self.new_cipher(session_id)
            atomic_write_bytes(self.snapshot_path(session_id), cipher.seal_snapshot(data) if cipher else data)
        except BaseException:
            with dir_lock(self.directory):
                with contextlib.suppress(OSError):
                    journal.unlink()
            os.close(fd)
            raise
        with dir_lock(self.directory):
            with contextlib.suppress(OSError):
                journal.unlink()
        os.close(fd)
        return session_id

    def rekey(self, session_id: str) -> bool:
        """Put a session under this store's key with a fresh data key (``sessions rekey``);
        False if it already is.  A plain session is encrypted.  The store must also read the old
        key (``keyring.also_read_with``).

        Crash-safe at every step: the journal is first folded into a snapshot under the old data
        key (the journal is then empty), and only then is that snapshot replaced, atomically, by
        one under the new data key; so the session is always whole under one key or the other,
        and running rekey again finishes the job.  Its KV file (a cache, under the old key) goes.
        """
        if self.keyring is None or self.keystore is None:
            raise SessionError("rekey needs the new key")
        writer, _record = self.open(session_id)
        try:
            core = writer._core
            old = core.cipher
            if (isinstance(old, KeystoreCipher) and old.key_id == self.keyring.key_id
                    and old.keystore is self.keystore):
                # Already changed over; an interrupted run may have left the old data key behind.
                self.keystore.drop_others(session_id, keep=old.entry_id, refs=set())
                return False
            writer.write_snapshot()
            with core.snapshot_lock:
                if core.journal_size or core.journal_torn:
                    raise SessionError(f"session {session_id}: its journal could not be folded; not rekeyed")
                new = self.keyring.new_cipher(session_id)
                assert isinstance(new, KeystoreCipher)
                core.cipher = new
                core._write_snapshot(background=False)  # its entry is written first, then the snapshot
            with contextlib.suppress(FileNotFoundError):
                self.kv_path(session_id).unlink()
            # Nothing names the old data key any more: it goes (old copies need it).
            self.keystore.drop_others(session_id, keep=new.entry_id,
                                      refs={old.entry_id} if isinstance(old, KeystoreCipher) else set())
            return True
        finally:
            writer.close()

    def set_title(self, session_id: str, title: str | None) -> None:
        """Name a session nobody has open (``sessions rename``): a journal line, like any change."""
        title = clean_title(title)
        writer, record = self.open(session_id)
        try:
            if record.title != title and not writer.append(len(record.messages), [], {"title": title}):
                raise SessionError(f"could not rename session {session_id}: {writer.last_error}")
        finally:
            writer.close()

    def search(self, text: str, *, limit: int = 50, only: Collection[str] | None = None) -> list[SearchHit]:
        """Sessions whose title or messages hold ``text`` (see ``StoreAPI.search``).

        Each session's files are read once; only those whose bytes contain every word of the
        text (case-folded; words JSON would escape are not used to filter) are parsed."""
        words = text.split()
        if not words:
            raise ValueError("search for what? the text is blank")
        needle = " ".join(words)
        plain = [w.casefold() for w in words if not any(c in w for c in '"\\') and w.isprintable()]
        hits: list[SearchHit] = []
        wanted = None if only is None else set(only)
        for session_id in self.newest_first():
            if wanted is not None and session_id not in wanted:
                continue
            if len(hits) >= limit:
                break
            try:
                parts = [self._read_file(p) for p in (self.journal_path(session_id), self.snapshot_path(session_id))]
                raw = b"".join(bytes(part[0]) for part in parts if part is not None)
                if not raw:
                    continue
                folded = raw.decode("utf-8", "replace").casefold()
                sealed = any(part is not None and (is_encrypted_snapshot(part[0]) or is_encrypted_journal(part[0]))
                             for part in parts)
                if not sealed and any(w not in folded for w in plain):
                    continue
                record = self.load(session_id)
            except (SessionFormatError, SessionNotFoundError, EncryptionKeyError, OSError) as exc:
                logger.debug("search: skipping %s: %s", session_id, exc)
                continue
            hits.extend(search_record(record, needle, limit - len(hits)))
        return hits


def search_record(record: SessionRecord, needle: str, limit: int) -> list[SearchHit]:
    """The hits of one session (its title first, then its messages in order), at most ``limit``."""
    out: list[SearchHit] = []
    if not record.messages:
        return out
    if record.title and (snippet := make_snippet(record.title, needle)) is not None:
        out.append(SearchHit(record.session_id, record.title, record.updated_at, -1, "title", snippet))
    for i, m in enumerate(record.messages):
        if len(out) >= limit:
            break
        if (snippet := make_snippet(m["content"], needle)) is not None:
            out.append(SearchHit(record.session_id, record.title, record.updated_at, i, m["role"], snippet))
    return out[:limit]


# -- the writer ------------------------------------------------------------------------------
_cores_lock = threading.Lock()
_open_cores: set[_Core] = set()


@atexit.register
def _flush_open_writers() -> None:
    # A program that forgets close() still gets complete snapshots at a normal exit (the
    # journal has the turns anyway; this keeps the .json current for people reading it).
    # Only this process's own writers: a fork()ed child inherits the set but not the writers.
    pid = os.getpid()
    with _cores_lock:
        mine = [c for c in _open_cores if c.pid == pid]
    for core in mine:
        with contextlib.suppress(Exception):
            core.close()


class _Core:
    """Everything an open session's writer owns.  ``SessionWriter`` is a thin face over it:
    background jobs and the garbage-collection finalizer hold the core, never the face, so a
    writer nobody references any more is collected (and closed)."""

    def __init__(self, store: HistoryStore, record: SessionRecord, journal_fd: int | None,
                 *, snapshot_upto: int | None, persisted: bool, cipher: SessionCipher | None = None):
        self.store = store
        self.cipher = cipher                    # an encrypted session's data key (None: plain JSON)
        self.record = record
        self.messages: list[MessageDict] = record.messages  # the writer's own list
        self.session_id = record.session_id
        self.pid = os.getpid()
        self.fd = journal_fd
        self.pending = journal_fd is None      # no files yet (a read-only folder at create())
        self.orphaned = False                  # the journal was removed underneath us
        self.journal_size = os.fstat(journal_fd).st_size if journal_fd is not None else 0
        self.journal_lines = 0
        self.journal_torn = False              # the journal does not end cleanly: save in full
        self.journaled = len(self.messages)    # messages[:journaled] are durable
        self.snapshot_upto = snapshot_upto     # messages in the .json, None if none/unknown
        self.persisted = persisted
        self.turns = count_turns(self.messages)
        self.encoded: list[str] = []           # encode_json of messages[: len(encoded)]
        self.size = self._initial_size()
        self.meta_dirty = False
        self.meta_seq = 0                      # bumped at each change of a record-level field
        self.full = False                      # refused an append: over the size the loader reads
        self.last_error: BaseException | None = None
        self.durability = store.durability      # "power": each line is flushed before it counts
        self.dir_synced = False                 # the folder's entries (the journal's name) are on disk
        self.lock = threading.Lock()            # the fd, the list and the counters
        self.snapshot_lock = threading.Lock()   # one snapshot (or reattach) at a time
        self.snapshot_owner: int | None = None
        self.cond = threading.Condition(threading.RLock())
        self.wanted = False
        self.job_running = False
        self.requested = 0                      # snapshots asked for / attempted: flush() waits on them
        self.done = 0
        self.closed = False
        self.closing = False
        with _cores_lock:
            _open_cores.add(self)

    def _initial_size(self) -> int:
        size = self.journal_size
        with contextlib.suppress(OSError):
            size += os.stat(self.store.snapshot_path(self.session_id), follow_symlinks=False).st_size
        return size

    @property
    def journal_path(self) -> Path:
        return self.store.journal_path(self.session_id)

    @property
    def snapshot_path(self) -> Path:
        return self.store.snapshot_path(self.session_id)

    # -- the hot path --------------------------------------------------------------------
    def ensure_room(self, nbytes: int) -> None:
        limit = self.store.max_file_bytes
        if self.size + max(nbytes, 0) + ROOM_MARGIN > limit:
            raise ValueError(
                f"session {self.session_id} is full: it holds about {self.size:,} bytes and sessions are read "
                f"up to {limit:,} bytes, so {nbytes:,} more would make it unreadable; start a new session "
                "(clear_history()) to go on")

    def append(self, start: int, messages: list[MessageDict], meta: dict[str, Any] | None) -> bool:
        with self.lock:
            if self.closed:
                raise SessionError(f"session {self.session_id} is closed")
            if start != len(self.messages):
                raise ValueError(f"append at message {start}, but session {self.session_id} holds "
                                 f"{len(self.messages)} messages")
            if meta and any(k in meta and meta[k] != getattr(self.record, k) for k in META_FIELDS):
                self.record.apply_meta(meta)
                self.meta_dirty = True
                self.meta_seq += 1
            self.messages.extend(messages)
            self.turns += count_turns(messages)
        return self.save()

    def rewind(self, start: int, messages: list[MessageDict], meta: dict[str, Any] | None) -> bool:
        """Withdraw ``messages[start:]`` (recorded in ``record.undone``) and append ``messages``:
        one journal line, written before anything changes in memory (all or nothing)."""
        if not self.save():  # what came before must be durable first, or the line could not follow it
            return False
        # The snapshot lock: a snapshot being written now holds the messages about to be withdrawn
        # and, once written, would empty the journal, rewind line included.
        with self.snapshot_lock, self.lock:
            if self.closed:
                raise SessionError(f"session {self.session_id} is closed")
            if not 0 <= start <= len(self.messages):
                raise ValueError(f"cannot undo from message {start}: session {self.session_id} holds "
                                 f"{len(self.messages)} messages")
            if self.pending or self.orphaned or self.journal_torn or self.journaled < len(self.messages) \
                    or self.meta_dirty or self.fd is None:
                self.last_error = self.last_error or SessionError("earlier turns are not saved yet")
                return False
            if self._gone():
                return False
            at = now_iso()
            after = dataclasses.replace(self.record, messages=[], undone=[])
            if after.summary is not None and after.summary["covers"] > start:
                after.summary = None
            after.apply_meta(meta)
            new = [encode_json(m) for m in messages]
            line = self._line(start, new, meta_of=after, updated_at=at,
                              rewind=(len(self.record.undone) + 1, self._encoded(start, len(self.messages))))
            if self.size + len(line) > self.store.max_file_bytes:
                self.last_error = ValueError(f"session {self.session_id} has reached the "
                                             f"{self.store.max_file_bytes:,}-byte limit sessions are read up to")
                return False
            failed = self._write_line(line)
            if failed is not None:
                logger.warning("could not save the undo in %s: %s; nothing was changed", self.journal_path,
                               failed.strerror or failed)
                return False
            if self._gone():
                return False
            gone = self.record.withdraw(start, at)
            for k in META_FIELDS:
                setattr(self.record, k, getattr(after, k))
            self.record.updated_at = at
            self.messages.extend(messages)
            self.turns += count_turns(messages) - count_turns(gone)
            del self.encoded[start:]
            if len(self.encoded) == start:
                self.encoded.extend(new)
            self.journaled = len(self.messages)
            self.snapshot_upto = None  # the .json holds what was withdrawn until the next snapshot
            self.journal_size += len(line)
            self.journal_lines += 1
            self.size += len(line)
            self.last_error = None
            logger.info("session %s: %d message(s) withdrawn from message %d (kept in the file's undone list)%s",
                        self.session_id, len(gone), start,
                        f", {len(messages)} appended" if messages else "")
        self._request_snapshot()
        return True

    def save(self) -> bool:
        """Make every message not yet durable durable; True once it is."""
        if self.pending or self.orphaned:
            return self._reattach()
        with self.lock:
            torn = self.journal_torn
        if torn:
            # Appending after a torn or unreadable line would hide the new turn from loading.
            return self._save_in_full()
        with self.lock:
            return self._append_line()

    def _line(self, start: int, encoded: list[str], *, meta_of: SessionRecord | None,
              rewind: tuple[int, list[str]] | None = None, updated_at: str | None = None,
              lineno: int | None = None) -> bytes:
        """One journal line (``JournalRecordDict``): ``encoded`` messages appended at ``start``;
        with ``meta_of``, every record-level field of that record, None included (a line carries
        the whole record-level state: None clears a system prompt, a title, a dropped summary);
        with ``rewind`` (its number, the withdrawn messages encoded), an undo."""
        meta = ""
        if meta_of is not None:
            fields = ", ".join(f'"{k}": {encode_json(getattr(meta_of, k))}' for k in META_FIELDS)
            meta = f', "meta": {{{fields}}}'
        undo = f'"rewind": {rewind[0]}, "undone": [{", ".join(rewind[1])}], ' if rewind is not None else ""
        text = (f'{{"session_id": {encode_json(self.session_id)}, "start": {start}, {undo}'
                f'"messages": [{", ".join(encoded)}], '
                f'"updated_at": {encode_json(updated_at or self.record.updated_at)}{meta}}}')
        if self.cipher is not None:
            # Sealed at its place in the journal: the line the file will hold at that position.
            return self.cipher.seal_line(text.encode(), lineno if lineno is not None else self.journal_lines + 1)
        return (text + "\n").encode()

    def _encoded(self, start: int, end: int) -> list[str]:
        """``messages[start:end]`` encoded, reusing the strings kept for snapshots (caller holds ``lock``)."""
        return [self.encoded[i] if i < len(self.encoded) else encode_json(self.messages[i]) for i in range(start, end)]

    def _append_line(self) -> bool:
        """One ``write`` of one line with everything not yet durable (caller holds ``lock``)."""
        assert self.fd is not None
        start, end = self.journaled, len(self.messages)
        if start >= end and not self.meta_dirty:
            return True
        if self._gone():
            return False
        if isinstance(self.cipher, KeystoreCipher):
            try:
                self.cipher.store()  # its data key in the keystore before a line names it
            except (OSError, SessionError) as err:
                self.last_error = err
                logger.warning("could not save turn of %s: its data key cannot be written to the keystore (%s); "
                               "the turn is kept in memory", self.session_id, getattr(err, "strerror", None) or err)
                return False
        self.record.updated_at = now_iso()
        # Each message is encoded once, here; snapshots reuse these strings.
        new = [encode_json(m) for m in self.messages[start:end]]
        line = self._line(start, new, meta_of=self.record if self.meta_dirty else None)
        if self.size + len(line) > self.store.max_file_bytes:
            exc = ValueError(f"session {self.session_id} has reached the {self.store.max_file_bytes:,}-byte "
                             "limit sessions are read up to; the turn is kept in memory only; start a new session")
            self.last_error = exc
            if not self.full:
                self.full = True  # from now on snapshots stop at what is durable, too
                logger.error("%s", exc)
            return False
        failed = self._write_line(line)
        if failed is not None:
            logger.warning("could not save turn to %s: %s; the turn is kept in memory and will "
                           "be saved with the next one", self.journal_path, failed.strerror or failed)
            return False
        if self._gone():  # removed while we wrote: the line is on no file
            return False
        self.journal_size += len(line)
        self.journal_lines += 1
        self.size += len(line)
        self.journaled = end
        self.meta_dirty = False
        self.persisted = True
        if len(self.encoded) == start:
            self.encoded.extend(new)
        self.last_error = None
        logger.debug("journaled %d message(s) of %s (%d bytes)", end - start, self.session_id, len(line))
        self._request_snapshot()
        return True

    def _gone(self) -> bool:
        """True (and logged) if the journal has no name any more: a write to it is durable nowhere."""
        assert self.fd is not None
        try:
            gone = os.fstat(self.fd).st_nlink == 0
        except OSError:
            gone = True
        if gone:
            self.orphaned = True
            self.last_error = FileNotFoundError(errno.ENOENT, "the journal was removed", str(self.journal_path))
            logger.error("session %s: %s was removed (or its folder was); this turn is NOT saved; it is kept in "
                         "memory and the next save writes the whole session again", self.session_id,
                         self.journal_path)
        return gone

    def _write_line(self, line: bytes) -> OSError | None:
        """Append ``line`` to the journal with ``write`` calls, and at the ``power`` level flush
        it to the disk; on failure cut off what was written and return the error (caller
        holds ``lock``)."""
        assert self.fd is not None
        try:
            view = memoryview(line)
            while view:
                view = view[os.write(self.fd, view):]
            if self.durability == "power":
                self._flush_journal()
        except OSError as exc:
            # A failed flush too: the line may never reach the disk, so it must not count.
            self._undo_partial_append()
            self.last_error = exc
            return exc
        return None

    def _flush_journal(self) -> None:
        """Put the journal's written lines on the disk, and, once per journal file, the folder
        entries that name it (a new journal, the folder itself if new): without them a power
        cut could leave the flushed line in a file no name reaches (caller holds ``lock``)."""
        assert self.fd is not None
        if not self.dir_synced:
            fsync_dir(self.store.directory)
            fsync_dir(self.store.directory.parent)
            self.dir_synced = True
        group_sync.sync(self.fd)

    def _undo_partial_append(self) -> None:
        # A short write leaves half a line; cut it off so the next append starts clean.
        # If even that fails the torn line stays, and loading stops at it: the next save
        # must then be a full snapshot.
        assert self.fd is not None
        try:
            os.ftruncate(self.fd, self.journal_size)
        except OSError:
            self.journal_torn = True

    def _save_in_full(self) -> bool:
        try:
            self.write_snapshot()
        except OSError as exc:
            self.last_error = exc
            logger.warning("could not save %s: %s; the turn is kept in memory", self.snapshot_path,
                           exc.strerror or exc)
            return False
        with self.lock:
            ok = not self.journal_torn and self.journaled == len(self.messages)
            if ok:
                self.last_error = None
                self.persisted = True
            return ok

    def _reattach(self) -> bool:
        """Give the session files again (first save in a folder that was read-only, or after
        the journal or folder was removed): a new locked journal, then everything in a snapshot."""
        with self.snapshot_lock:
            if self.closed:
                return False
            try:
                self.store.ensure_dir()
                if self.pending:
                    session_id, fd = self.store._claim_id(self.session_id)
                    if session_id != self.session_id:
                        logger.warning("session id %s was taken meanwhile; this session is %s", self.session_id,
                                       session_id)
                        with self.lock:
                            self.session_id = self.record.session_id = session_id
                            # The data key is bound to the id: a new id needs a new one.
                            if self.cipher is not None:
                                self.cipher = self.store.new_cipher(session_id)
                else:
                    with dir_lock(self.store.directory):
                        new_fd = self.store._lock_journal(self.session_id, create=True)
                    assert new_fd is not None
                    fd = new_fd
            except (OSError, SessionError) as exc:
                self.last_error = exc
                logger.warning("could not save session %s in %s: %s; the turn is kept in memory", self.session_id,
                               self.store.directory, getattr(exc, "strerror", None) or exc)
                return False
            with self.lock:
                old, self.fd = self.fd, fd
                self.pending = self.orphaned = False
                self.dir_synced = False  # a new journal: its name is not on the disk yet
                self.journal_size = os.fstat(fd).st_size
                self.journal_lines = 0
                self.journal_torn = self.journal_size > 0  # whatever is there is replaced by the snapshot
                self.snapshot_upto = None
            if old is not None:
                os.close(old)
            logger.info("session %s has files again in %s", self.session_id, self.store.directory)
        if not self.messages:
            return True
        return self._save_in_full()

    # -- snapshots -------------------------------------------------------------------------
    def _request_snapshot(self) -> None:
        with self.cond:
            self.wanted = True
            self.requested += 1
            if not self.job_running:
                self.job_running = True
                run_in_background(self._snapshot_job, f"snapshot of {self.session_id}")

    def _snapshot_job(self) -> None:
        while True:
            with self.cond:
                if not self.wanted or self.closed:
                    self.job_running = False
                    self.done = self.requested if self.closed else self.done
                    self.cond.notify_all()
                    return
                self.wanted = False
                target = self.requested
            try:
                self.write_snapshot(background=True)
            except OSError as exc:
                logger.warning("background save of %s failed: %s (the journal still has every turn)",
                               self.snapshot_path, exc.strerror or exc)
            finally:
                with self.cond:
                    self.done = max(self.done, target)
                    self.cond.notify_all()

    def write_snapshot(self, *, background: bool = False) -> Path:
        """Write ``<id>.json`` with every message so far, atomically; then empty the journal."""
        with self.snapshot_lock:
            self.snapshot_owner = threading.get_ident()
            try:
                return self._write_snapshot(background)
            finally:
                self.snapshot_owner = None

    def _write_snapshot(self, background: bool, *, final: bool = False) -> Path:
        path = self.snapshot_path
        if (self.closed and not final) or self.pending or self.orphaned or self.fd is None:
            if background:
                return path
            if self.closed:
                raise SessionError(f"session {self.session_id} is closed")
            raise FileNotFoundError(errno.ENOENT, "the session has no files (see the log)", str(path))
        t0 = time.perf_counter()
        with self.lock:
            upto = self.journaled if self.full else len(self.messages)
            messages = self.messages[:upto]
            encoded = self.encoded[:upto]
            turns = self.turns
            size_before = self.size
            if not self.record.updated_at:
                self.record.updated_at = now_iso()
            head = dataclasses.replace(self.record, messages=[])
            meta_seq = self.meta_seq
            meta_dirty = self.meta_dirty
        if len(encoded) < upto:  # messages loaded from disk, or saved without a journal
            extra = [encode_json(m) for m in messages[len(encoded):]]
            with self.lock:
                if len(self.encoded) == len(encoded):
                    self.encoded.extend(extra)
            encoded += extra
        data = encode_snapshot(head, messages, encoded, turns=turns)
        if self.cipher is not None:
            data = self.cipher.seal_snapshot(data)
        atomic_write_bytes(path, data)
        with self.lock:
            self.snapshot_upto = upto
            self.size = len(data) + (self.size - size_before)
            self.persisted = True
            if upto > self.journaled:
                self.journaled = upto  # an explicit save also covers unjournaled turns
            if meta_dirty and all(getattr(self.record, k) == getattr(head, k) for k in META_FIELDS):
                self.meta_dirty = False
            if self.fd is not None and (self.journal_size or self.journal_torn):
                # A field changed (a title, a summary) after ``head`` was taken: its journal line
                # may already be written, and this snapshot does not hold it.
                stale_meta = self.meta_seq != meta_seq
                if self.journaled <= upto and not stale_meta:
                    # The snapshot holds everything the journal does: empty it.
                    try:
                        os.ftruncate(self.fd, 0)
                        self.journal_size = self.journal_lines = 0
                        self.journal_torn = False
                    except OSError as exc:
                        logger.debug("could not empty journal of %s: %s", self.session_id, exc)
                elif stale_meta or self.journal_lines >= FOLD_LINES or self.journal_size >= FOLD_BYTES:
                    self._cut_journal(upto, with_meta=stale_meta)
        logger.debug("saved %s: %d messages, %d bytes in %.2f ms", path, upto, len(data),
                     (time.perf_counter() - t0) * 1000)
        return path

    def _cut_journal(self, upto: int, *, with_meta: bool = False) -> None:
        """Replace the journal by one line holding what the snapshot (of ``upto`` messages)
        lacks; turns keep arriving, so it is never simply emptied (caller holds ``lock``).

        The new journal is written and locked under a temporary name, then renamed over the
        old one: a crash at any moment leaves either journal, each complete against the
        snapshot.  A process that opened the old journal finds it replaced once it gets the
        lock, and starts again on the live path (``_lock_journal``).
        """
        assert self.fd is not None
        end = self.journaled
        carry_meta = with_meta or any(getattr(self.record, k) is not None for k in META_FIELDS)
        line = self._line(upto, self._encoded(upto, end), meta_of=self.record if carry_meta else None, lineno=1)
        path = self.journal_path
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        except OSError as exc:
            logger.debug("could not cut the journal of %s: %s", self.session_id, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
            # Under the folder lock, like every change of a journal's name: a lock probe
            # (is_locked) never sees the old journal already closed and the new one not yet there.
            with dir_lock(self.store.directory):
                os.replace(tmp, path)
                old, self.fd = self.fd, fd
                os.close(old)
        except OSError as exc:
            if self.fd != fd:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            logger.debug("could not cut the journal of %s: %s", self.session_id, exc)
            return
        fsync_dir(path.parent)
        self.journal_size, self.journal_lines = len(line), 1
        logger.debug("cut the journal of %s to %d message(s)", self.session_id, end - upto)

    def flush(self, timeout: float | None) -> bool:
        with self.cond:
            target = self.requested
            return self.cond.wait_for(lambda: self.done >= target or self.closed or not self.job_running, timeout)

    # -- the end -------------------------------------------------------------------------
    def close(self) -> None:
        """Write a final snapshot, remove the journal, release the lock.  Idempotent.

        In a fork()ed child this only closes the child's copy of the descriptor: the files
        and the lock (shared with the parent) stay the parent's."""
        with self.cond:
            if self.closed or getattr(self, "closing", False):
                return
            self.closing = True
        with _cores_lock:
            _open_cores.discard(self)
        if os.getpid() != self.pid:
            self._mark_closed()
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
            return
        if (self.pending or self.orphaned) and self.journaled < len(self.messages):
            self._reattach()
        with self.snapshot_lock:
            try:
                if self.fd is None:
                    if self.journaled < len(self.messages):
                        logger.error("session %s closed with %d message(s) that could not be saved",
                                     self.session_id, len(self.messages) - self.journaled)
                    return
                self._final_save()
            finally:
                with self.lock:
                    fd, self.fd = self.fd, None
                if fd is not None:
                    os.close(fd)
                self._mark_closed()

    def _target(self) -> int:
        """How many messages the final snapshot holds: all, unless some are over the size limit."""
        return self.journaled if self.full else len(self.messages)

    def _mark_closed(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def _final_save(self) -> None:
        try:
            if self.orphaned:
                logger.error("session %s: its files were removed; %d message(s) are not saved", self.session_id,
                             len(self.messages) - self.journaled)
                return
            keep = self.messages or self.record.undone  # an emptied session still says what was undone
            if keep and (self.snapshot_upto != self._target() or self.journal_size or self.journal_torn):
                try:
                    self._write_snapshot(background=False, final=True)
                except OSError as exc:
                    # Keep the journal: it is the only complete copy now.
                    logger.warning("could not write %s on close: %s; the journal %s keeps every saved turn",
                                   self.snapshot_path, exc.strerror or exc, self.journal_path)
                    return
            if self.journal_torn or (keep and self.snapshot_upto != self._target()):
                return
            # Still holding the lock: anyone who opened the journal before the unlink will
            # see it is gone once they get the lock, and start over on the live path.
            with dir_lock(self.store.directory):
                with contextlib.suppress(FileNotFoundError):
                    self.journal_path.unlink()
        except OSError as exc:
            logger.warning("closing session %s: %s", self.session_id, exc)

    def collected(self) -> None:
        """The writer was garbage-collected without ``close()``: close it (never blocking on
        this writer's own snapshot, if the collection happened inside it)."""
        if os.getpid() == self.pid and self.snapshot_owner == threading.get_ident():
            with contextlib.suppress(RuntimeError):  # RuntimeError: the pool is shut down
                run_in_background(self.close, f"closing {self.session_id}")
                return
        logger.debug("session %s was not closed; closing it now", self.session_id)
        self.close()


class SessionWriter:
    """The one writer of an open session (``SessionWriterAPI``): journal appends on the hot
    path, snapshots in the background on the shared pool, the session's lock until ``close()``."""

    def __init__(self, core: _Core):
        self._core = core
        # Collected without close(): release the lock, fold the journal.  Not at exit (the
        # atexit hook does that for this process only: a forked child must not).
        self._finalizer = weakref.finalize(self, core.collected)
        self._finalizer.atexit = False

    # -- what the session reads ----------------------------------------------------------
    @property
    def store(self) -> HistoryStore:
        return self._core.store

    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def record(self) -> SessionRecord:
        """The session as written so far (its messages are the writer's own list: read only)."""
        return self._core.record

    @property
    def persisted(self) -> bool:
        return self._core.persisted

    @property
    def has_file(self) -> bool:
        """Old name of ``persisted``."""
        return self._core.persisted

    @property
    def last_error(self) -> BaseException | None:
        return self._core.last_error

    @property
    def snapshot_path(self) -> Path:
        return self._core.snapshot_path

    @property
    def turns(self) -> int:
        return self._core.turns

    @property
    def durability(self) -> str:
        """What an append that returned True survives: ``process`` or ``power`` (docs/durability.md)."""
        return self._core.durability

    @durability.setter
    def durability(self, level: str) -> None:
        level = resolve_durability(level)
        with self._core.lock:
            self._core.durability = level

    # -- writing -------------------------------------------------------------------------
    def append(self, start: int, messages: list[MessageDict], meta: dict[str, Any] | None = None) -> bool:
        """Append ``messages`` at index ``start`` (the number of messages appended so far, else
        ``ValueError``); ``meta`` sets record-level fields (``system_prompt``).  True once
        durable: one ``write`` to the journal.  False (logged, in ``last_error``) when not:
        the messages stay in memory and the next append writes them first."""
        return self._core.append(start, list(messages), meta)

    def rewind(self, start: int, messages: list[MessageDict] | None = None,
               meta: dict[str, Any] | None = None) -> bool:
        """Withdraw the messages from ``start`` on and append ``messages``, in one journal line
        that records what was withdrawn (``SessionWriterAPI.rewind``).  All or nothing."""
        return self._core.rewind(start, list(messages or []), meta)

    def ensure_room(self, nbytes: int) -> None:
        """Raise ``ValueError`` if about ``nbytes`` more would make the session larger than the
        loader reads (``max_file_bytes``): whatever the writer writes, the reader reads."""
        self._core.ensure_room(nbytes)

    def bind(self, messages: list[MessageDict]) -> None:
        """Old interface: follow ``messages`` (the session's append-only list); ``commit()``
        appends what it holds beyond the writer's own copy."""
        self._bound = messages

    def commit(self) -> bool:
        """Old interface: append whatever the bound list holds beyond what was appended."""
        bound = getattr(self, "_bound", None)
        have = len(self._core.messages)
        if bound is None or len(bound) <= have:
            with self._core.lock:
                if self._core.closed:
                    raise SessionError(f"session {self.session_id} is closed")
            return self._core.save()
        return self.append(have, bound[have:])

    def write_snapshot(self) -> Path:
        """Write ``<id>.json`` with every message so far now (``save_history()``)."""
        core = self._core
        if core.pending or core.orphaned:
            core._reattach()
        return core.write_snapshot()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every snapshot asked for so far has been attempted; False on timeout."""
        return self._core.flush(timeout)

    def close(self) -> None:
        """Write a final snapshot, remove the journal, release the lock.  Idempotent."""
        self._finalizer.detach()
        self._core.close()

"""Housekeeping for a sessions folder: backups, imports, pruning and a doctor for damaged files.

Export, import and prune work through the store interface (``StoreAPI``: the file store or
any other), so they are safe while sessions are in use: exports are made from the store's
consistent reads, a session open for writing is never pruned.  ``doctor`` is specific to the
file store: it never deletes anything; it moves problem files aside to
``<name>.corrupt-<YYYYmmddHHMMSS>`` where a person can still look at them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from .._exceptions import EncryptionKeyError, SessionError, SessionFormatError, SessionLockedError
from ._api import StoreAPI
from ._crypto import is_encrypted_journal, is_encrypted_snapshot
from ._file import _CACHE_NAME, HistoryStore, aside_path, encode_snapshot, parse_json_bytes, replay_journal
from ._fileio import FileTooLargeError, NotARegularFileError, atomic_write_bytes, dir_lock, read_regular_file
from ._ids import SESSION_ID_RE
from ._record import SessionRecord
from ._sealed_export import encrypted_map, is_sealed_export, needs_seal, open_export, seal_export, store_keyring

__all__ = [
    "INFO_KINDS",
    "STRAY_TEMP_AGE_S",
    "ExportResult",
    "Problem",
    "doctor",
    "export_all",
    "import_session",
    "is_locked",
    "prune",
    "session_age_reference",
]

logger = logging.getLogger("conversation_session.housekeeping")

STRAY_TEMP_AGE_S = 60.0
"""A temporary file this old cannot belong to a write in progress (writes take milliseconds)."""

INFO_KINDS = frozenset({"id-mismatch", "encrypted"})
"""Problem kinds that are only reported: the file still loads (or, ``encrypted``, cannot be checked
without its key: docs/encryption.md), so nothing is moved."""

_LOCKED = (-1, -1)
"""``_snapshot_problem``'s count for an encrypted snapshot checked without its key."""

_TEMP_RE = re.compile(r"\..+\.tmp")
_ASIDE_RE = re.compile(r".+\.corrupt-\d{14}(-\d+)?")
_KNOWN_FILES = frozenset({".input_history", ".last_hint", _CACHE_NAME})


# -- helpers -------------------------------------------------------------------------------
def is_locked(store: StoreAPI, session_id: str) -> bool:
    """True if ``session_id`` is open for writing (the store's own probe: ``store.is_locked``)."""
    return store.is_locked(session_id)


def _disk_error(action: str, path: Path, exc: OSError) -> SessionError:
    reason = exc.strerror or str(exc)
    hint = ("free some disk space or choose another folder"
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else
            "check the folder exists and is writable")
    return SessionError(f"cannot {action} {path}: {reason}; {hint}")


# -- export / import -------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What ``export_all`` wrote, and which sessions it skipped and why."""

    written: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    sealed: list[Path] = field(default_factory=list)
    """The files of encrypted sessions, written sealed (among ``written``)."""


def export_all(store: StoreAPI, dest_dir: str | os.PathLike[str], *, plaintext: bool = False) -> ExportResult:
    """Write every session with at least one message to ``dest_dir/<id>.json``.

    Each copy comes from the store's consistent read (``store.load``) and is written
    atomically, so it is complete even while the session is being written; damaged sessions
    are skipped and listed in ``skipped``.  A failed write (disk full) raises
    ``SessionError``; files already written stay.  An encrypted session's file is sealed with
    the store's key (``_sealed_export``; listed in ``sealed``) unless ``plaintext``; a plain
    session's is the plain JSON.
    """
    dest = Path(dest_dir)
    directory = getattr(store, "directory", None)
    with contextlib.suppress(OSError):
        if directory is not None and Path(directory).resolve() == dest.resolve():
            raise SessionError(f"cannot export into the sessions folder itself ({dest}); choose another folder")
    try:
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise _disk_error("create the export folder", dest, exc) from exc
    result = ExportResult()
    keyring = None if plaintext else store_keyring(store)
    encrypted = None if keyring is None else encrypted_map(store)
    for session_id in store.newest_first():
        try:
            record = store.load(session_id)
            if not record.messages:
                continue
            data = encode_snapshot(record, record.messages)
            sealed = keyring is not None and needs_seal(session_id, encrypted)
            if keyring is not None and sealed:
                data = seal_export(data, session_id, keyring)
        except (SessionFormatError, EncryptionKeyError, OSError) as exc:  # encrypted: skipped without its key
            logger.warning("not exported: %s: %s", session_id, exc)
            result.skipped[session_id] = str(exc)
            continue
        path = dest / f"{session_id}.json"
        try:
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise _disk_error("write the export", path, exc) from exc
        result.written.append(path)
        if sealed:
            result.sealed.append(path)
    return result


def import_session(store: StoreAPI, path: str | os.PathLike[str], *,
                   max_file_bytes: int | None = None) -> str:
    """Copy a session file (as ``export`` writes it) into the store; returns its id there.

    A sealed export (an encrypted session's, ``_sealed_export``) is opened with the store's key
    (``EncryptionKeyError`` without it or with another one; ``SessionFormatError`` if it was
    altered; either way nothing is written) and, the store having that key, stored encrypted.
    The file is validated like any session file (``SessionFormatError`` says what is wrong).
    It keeps its own id when that is a valid name not yet taken; otherwise it gets a new
    ``session_<unix seconds>`` id (``_2``, ``_3``, ... if that is taken too): the store's
    one id allocation, ``store.import_record``.
    """
    src = Path(path)
    limit = max_file_bytes or getattr(store, "max_file_bytes", None) or 64 * 1024 * 1024
    try:
        raw: bytes | bytearray = read_regular_file(src.resolve(), limit)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SessionFormatError(f"cannot import {src}: {exc.strerror or exc}", path=src) from exc
    sealed_for = None
    if is_sealed_export(raw):
        try:
            raw, sealed_for = open_export(raw, store_keyring(store), src.name)
        except EncryptionKeyError as exc:
            raise EncryptionKeyError(f"cannot import {src}: {exc}") from None
        except SessionFormatError as exc:
            raise SessionFormatError(f"cannot import {src}: {exc}", path=src) from None
    data = parse_json_bytes(raw, f"cannot import {src}", src)
    try:
        record = SessionRecord.from_dict(data, raw=raw)
        if not record.messages:
            raise SessionFormatError("it has no messages")
        if sealed_for is not None and record.session_id != sealed_for:
            raise SessionFormatError(f"it was sealed for session {sealed_for} but holds {record.session_id}")
        return store.import_record(record)  # an id that is not a plain name gets a fresh one
    except SessionFormatError as exc:
        raise SessionFormatError(f"cannot import {src}: not a valid session file: {exc}", path=src) from exc
    except OSError as exc:
        raise _disk_error("import into", src, exc) from exc


# -- prune -----------------------------------------------------------------------------------
def session_age_reference(updated_at: str, fallback_mtime: float) -> float:
    """A session's last update as a Unix time: its ``updated_at`` (local time), else the file mtime."""
    try:
        dt = datetime.fromisoformat(updated_at)
    except (TypeError, ValueError):
        return fallback_mtime
    try:
        return dt.timestamp()  # naive means local time, as the format writes it
    except (OverflowError, OSError, ValueError):
        return fallback_mtime


def prune(store: StoreAPI, older_than: timedelta | None = None, keep: int | None = None,
          dry_run: bool = False) -> list[str]:
    """Delete old sessions; returns the ids deleted (or that would be, with ``dry_run``).

    A session goes if it is not among the ``keep`` most recently updated and (when
    ``older_than`` is given) was last updated more than ``older_than`` ago.  Sessions open for
    writing are skipped, and so are damaged ones (``doctor`` deals with those).  One listing,
    one ``delete`` per session (which itself refuses a session open for writing, and, with
    ``older_than``, checks the age again where no writer can add a turn meanwhile: a session
    used between the listing and its deletion stays).
    """
    if older_than is None and keep is None:
        raise ValueError("prune needs older_than, keep, or both")
    if keep is not None and keep < 0:
        raise ValueError(f"keep must be 0 or more, not {keep}")
    if older_than is not None and older_than < timedelta(0):
        raise ValueError(f"older_than must not be negative, not {older_than}")
    infos = store.list_sessions()
    aged = sorted(((session_age_reference(i.updated_at, session_age_reference(i.created_at, 0.0)), i.session_id)
                   for i in infos), reverse=True)
    cutoff = None if older_than is None else time.time() - older_than.total_seconds()
    doomed = [sid for n, (when, sid) in enumerate(aged)
              if (keep is None or n >= keep) and (cutoff is None or when < cutoff)]
    out = []
    for sid in doomed:
        if dry_run:
            if store.is_locked(sid):
                logger.info("not pruned: %s is open for writing", sid)
            else:
                out.append(sid)
            continue
        try:
            gone = store.delete(sid) if cutoff is None else store.delete(sid, idle_before=cutoff)
        except SessionLockedError:
            logger.info("not pruned: %s is open for writing", sid)
            continue
        if gone:
            out.append(sid)
    return out


# -- doctor ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """A file in the sessions folder that needs attention.

    ``kind`` is one of: ``symlink``, ``not-regular``, ``oversized``, ``unreadable``,
    ``unparseable``, ``malformed``, ``id-mismatch`` (loads; the file name wins),
    ``stray-temp``, ``orphan-journal``, ``torn-journal``, ``damaged-journal``,
    ``foreign-journal`` (lines of another session), ``tampered`` (an encrypted file that fails
    authentication), ``encrypted`` (only reported: not checked without the key, or its data key
    is not in the keystore), ``orphan-key`` (a keystore entry of this folder whose session is
    gone: a deletion interrupted by a crash; ``fix`` removes it, finishing the deletion).
    ``moved_to`` is set when ``doctor(fix=True)`` moved the file aside.
    """

    path: Path
    kind: str
    detail: str
    moved_to: Path | None = None
    removed: bool = False  # an orphan key removed by ``fix``

    @property
    def fixable(self) -> bool:
        return self.kind not in INFO_KINDS


def _move_aside(store: HistoryStore, path: Path, stamp: str) -> Path:
    """Rename ``path`` (never following a symlink) to a free ``.corrupt-`` name beside it."""
    with dir_lock(store.directory):
        target = aside_path(path, stamp)
        os.rename(path, target)
    return target


def _check_file(store: HistoryStore, path: Path, st: os.stat_result) -> tuple[str, str] | None:
    """(kind, detail) for a file that cannot be read as a session file, without reading it if unsafe."""
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return "symlink", f"a symbolic link (to {target}); session files are never followed through links"
    if not stat.S_ISREG(st.st_mode):
        return "not-regular", "not a regular file (a directory, FIFO or device)"
    if st.st_size > store.max_file_bytes:
        return "oversized", f"{st.st_size:,} bytes, over the {store.max_file_bytes:,}-byte limit"
    return None


def _snapshot_problem(store: HistoryStore, path: Path) -> tuple[tuple[str, str] | None, tuple[int, int] | None]:
    """(problem, (message count, rewinds folded)) for a regular ``<id>.json`` of acceptable size."""
    try:
        raw = read_regular_file(path, store.max_file_bytes)
    except (NotARegularFileError, FileTooLargeError) as exc:
        return ("not-regular", exc.strerror or str(exc)), None
    except OSError as exc:
        return ("unreadable", f"cannot read ({exc.strerror or exc})"), None
    stem = path.name[: -len(".json")]
    if is_encrypted_snapshot(raw):
        try:
            record = store._parse_snapshot(stem, raw)
        except EncryptionKeyError as exc:
            return ("encrypted", f"not checked: {exc}"), _LOCKED
        except SessionFormatError as exc:
            return ("tampered", str(exc)), None
        return None, (len(record.messages), len(record.undone))
    try:
        data = parse_json_bytes(raw, path.name, path)
    except SessionFormatError as exc:
        return ("unparseable", str(exc)), None
    try:
        record = SessionRecord.from_dict(data, raw=raw)
    except SessionFormatError as exc:
        return ("malformed", str(exc)), None
    if record.session_id != stem:
        return ("id-mismatch", f"says session_id={record.session_id!r}; it loads as {stem} (the file name wins)"), \
            (len(record.messages), len(record.undone))
    return None, (len(record.messages), len(record.undone))


def _journal_problem(store: HistoryStore, path: Path, have: tuple[int, int] | None) -> tuple[str, str] | None:
    """Check a regular, unlocked ``<id>.journal`` with the loader's own replay."""
    try:
        raw = read_regular_file(path, store.max_file_bytes)
    except OSError as exc:
        return "unreadable", f"cannot read ({exc.strerror or exc})"
    if not raw:
        if have is None:
            return "orphan-journal", "an empty journal with no snapshot, left by a process that ended early"
        return None
    stem = path.name[: -len(".journal")]
    if have == _LOCKED:
        return None  # its encrypted snapshot was reported: the journal cannot be checked either
    count, folded = have or (0, 0)
    try:
        sealed = is_encrypted_journal(raw) or _encrypted_snapshot(store, stem)
        plain, _cipher = store._plain_journal(stem, raw, None, encrypted=sealed)
    except EncryptionKeyError as exc:
        return "encrypted", f"not checked: {exc}"
    except SessionFormatError as exc:
        return "tampered", str(exc)
    return replay_journal(plain, stem, count, folded).problem


def _encrypted_snapshot(store: HistoryStore, session_id: str) -> bool:
    try:
        with open(store.snapshot_path(session_id), "rb") as f:
            return is_encrypted_snapshot(f.read(128))
    except OSError:
        return False


def _move_journal_aside(store: HistoryStore, session_id: str, path: Path, stamp: str, *, fold: bool) -> Path | None:
    """Move a journal aside while holding its session's lock; None if the session is open.

    With ``fold``, the turns the journal still holds are first saved into a fresh snapshot,
    so moving it aside loses nothing that loading would have shown.
    """
    try:
        with dir_lock(store.directory):
            fd = store._lock_journal(session_id, create=False)
    except SessionLockedError:
        return None
    try:
        if fold and fd is not None:
            try:
                record, _replay, _raw, cipher = store._read(session_id)
                data = encode_snapshot(record, record.messages) if record.messages else None
                if data is not None and cipher is not None:
                    data = cipher.seal_snapshot(data)  # an encrypted session stays encrypted
            except SessionFormatError as exc:
                logger.warning("%s: nothing saved from the journal: %s", session_id, exc)
            else:
                if data is not None:
                    atomic_write_bytes(store.snapshot_path(session_id), data)
        return _move_aside(store, path, stamp)
    finally:
        if fd is not None:
            os.close(fd)


def doctor(store: HistoryStore, fix: bool = False) -> list[Problem]:
    """List the problem files in the sessions folder; with ``fix``, move them aside.

    Nothing is ever deleted, but the keys of deleted sessions left in the keystore by an
    interrupted deletion (``orphan-key``).  Files of sessions open for writing are left alone, and so are
    temporary files younger than ``STRAY_TEMP_AGE_S`` (a write may be in progress).  Before a
    damaged journal is moved aside, the turns it still holds are saved into the snapshot.
    """
    directory = store.directory
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SessionError(f"cannot read the sessions folder {directory}: {exc.strerror or exc}") from exc
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    now = time.time()
    found: list[tuple[Path, str, str, str | None]] = []  # path, kind, detail, session id of a journal
    snapshot_counts: dict[str, tuple[int, int] | None] = {}
    journals: list[tuple[Path, str, os.stat_result]] = []
    for entry in entries:
        name = entry.name
        path = Path(entry.path)
        if name in _KNOWN_FILES or _ASIDE_RE.fullmatch(name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # vanished since the listing
        if name == ".lock":
            if not stat.S_ISREG(st.st_mode):  # sessions still start (the folder itself is locked)
                found.append((path, "not-regular", "the folder's lock file is not a regular file "
                                                   "(a directory, FIFO or link)", None))
            continue
        if _TEMP_RE.fullmatch(name):
            if now - st.st_mtime >= STRAY_TEMP_AGE_S:
                found.append((path, "stray-temp", f"a temporary file left by an interrupted save "
                                                  f"({int(now - st.st_mtime)} s old)", None))
            continue
        stem, dot, ext = name.rpartition(".")
        if not dot or ext not in ("json", "journal") or not SESSION_ID_RE.fullmatch(stem):
            continue
        bad = _check_file(store, path, st)
        if ext == "journal":
            if bad is None:
                journals.append((path, stem, st))
            elif not (stat.S_ISREG(st.st_mode) and store.is_locked(stem)):
                found.append((path, *bad, None))
            continue
        if bad is not None:
            found.append((path, *bad, None))
            snapshot_counts[stem] = None
            continue
        problem, count = _snapshot_problem(store, path)
        snapshot_counts[stem] = count
        if problem is not None:
            found.append((path, *problem, None))
    for path, stem, _st in journals:
        if store.is_locked(stem):
            continue  # in use: its writer owns it
        problem = _journal_problem(store, path, snapshot_counts.get(stem))
        if problem is not None:
            found.append((path, *problem, stem))
    if store.keystore is not None:
        names = {e.name for e in entries}
        for key_path in store.keystore.orphans(lambda sid: any(n.startswith(sid + ".") for n in names)):
            found.append((key_path, "orphan-key", "the data key of a session that is gone (its deletion was "
                                                  "interrupted); --fix removes it", None))
    problems: list[Problem] = []
    for path, kind, detail, journal_of in found:
        moved: Path | None = None
        if fix and kind == "orphan-key":
            assert store.keystore is not None
            removed = False
            try:
                with dir_lock(directory):  # no session of that id is created meanwhile
                    if not any(os.path.lexists(directory / f"{path.name.partition('.')[0]}.{ext}")
                               for ext in ("json", "journal")):
                        removed = store.keystore.remove_paths([path]) > 0
                        detail = "the data key of a session that is gone: removed"
            except OSError as exc:
                detail += f" (could not remove it: {exc.strerror or exc})"
            problems.append(Problem(path, kind, detail, None, removed))
            continue
        if fix and kind not in INFO_KINDS:
            try:
                if journal_of is None:
                    moved = _move_aside(store, path, stamp)
                else:
                    moved = _move_journal_aside(store, journal_of, path, stamp,
                                                fold=kind in ("torn-journal", "damaged-journal", "foreign-journal"))
                    if moved is None:
                        detail += " (left alone: the session was opened meanwhile)"
            except (OSError, SessionError) as exc:
                detail += f" (could not move it aside: {getattr(exc, 'strerror', None) or exc})"
        problems.append(Problem(path, kind, detail, moved))
    return problems

"""The history store: where sessions live on disk and how they get there safely.

Each session is two files in ``sessions_dir``:

* ``<id>.json``: a snapshot in the seed's format, only ever replaced atomically, so it is
  always a complete, parseable session.
* ``<id>.journal``: turns completed since that snapshot, one JSON line each, appended with a
  single ``write`` before ``chat()`` returns.  This is what makes a turn survive ``kill -9``
  the moment it is acknowledged, at a cost that does not grow with the history.

A background thread folds the journal into a fresh snapshot after each turn (the seed's
"asynchronous save"), then empties the journal.  Loading reads the snapshot and replays the
journal on top, so a crash at any point between those steps loses nothing.

While a session is open for writing, its journal carries an exclusive ``flock``: a second
writer gets ``SessionLockedError``; the lock dies with the process, so a crash never leaves
a session locked.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ._exceptions import SessionError, SessionFormatError, SessionLockedError
from ._fileio import atomic_write_bytes, dir_lock, flock_holder, read_regular_file
from ._format import MessageDict, SessionRecord, count_turns, now_iso, parse_journal_line

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "HistoryStore",
    "SessionInfo",
    "SessionWriter",
    "encode_json",
    "encode_snapshot",
    "parse_json_bytes",
    "validate_session_id",
]

logger = logging.getLogger("conversation_session.store")

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a plain session name, else raise ``ValueError``.

    Only letters, digits, ``_`` and ``-`` are allowed, so no id can name a path outside
    ``sessions_dir`` (no separators, no ``..``, no NUL, nothing absolute).
    """
    if not isinstance(session_id, str) or not _ID_RE.fullmatch(session_id):
        raise ValueError(
            f"invalid session id {session_id!r}: use 1-128 letters, digits, '_' or '-' "
            "(a name such as 'session_1730000001', not a path)"
        )
    return session_id


@dataclass(frozen=True)
class SessionInfo:
    """One saved session, as listed by ``HistoryStore.list_sessions``."""

    session_id: str
    path: Path
    created_at: str
    updated_at: str
    llm_model: str
    turns: int
    total_messages: int
    size_bytes: int
    first_user_line: str


# One encoder, built once: json.dumps(..., ensure_ascii=False) builds a new one per call.
encode_json = json.JSONEncoder(ensure_ascii=False).encode


def encode_snapshot(record: SessionRecord, messages: list[MessageDict], encoded: list[str] | None = None) -> bytes:
    """Serialise a snapshot like the seed shows it: one message per line, Chinese readable.

    Each message goes through the C JSON encoder on its own (``indent=`` would switch to the
    pure-Python one); ``encoded``, the messages already encoded, spares even that.
    """
    data = record.to_dict(messages)
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
    """``json.loads`` of a file's bytes; every failure is a ``SessionFormatError`` starting with ``label``."""
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SessionFormatError(f"{label}: not UTF-8 ({exc.reason})", path=path) from exc
    except RecursionError as exc:
        raise SessionFormatError(f"{label}: JSON nested too deeply", path=path) from exc
    except ValueError as exc:
        raise SessionFormatError(f"{label}: not valid JSON ({exc})", path=path) from exc


class HistoryStore:
    """All sessions in one directory."""

    def __init__(self, directory: str | os.PathLike[str], *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES):
        self.directory = Path(directory)
        self.max_file_bytes = max_file_bytes

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

    # -- reading -------------------------------------------------------------------------
    def _read_json(self, path: Path) -> tuple[object, bytearray]:
        """The parsed file and its bytes."""
        try:
            raw = read_regular_file(path, self.max_file_bytes)
        except OSError as exc:
            raise SessionFormatError(f"{path.name}: cannot read ({exc.strerror or exc})", path=path) from exc
        return parse_json_bytes(raw, path.name, path), raw

    def _replay_journal(self, session_id: str, record: SessionRecord) -> bool:
        """Apply journal records on top of the snapshot; a torn last line is expected after a crash.

        Returns False when the journal does not end cleanly (a torn or damaged line): nothing
        may be appended to it then, or the new lines would hide behind the damage.
        """
        path = self.journal_path(session_id)
        try:
            raw = read_regular_file(path, self.max_file_bytes)
        except FileNotFoundError:
            return True
        except OSError as exc:
            raise SessionFormatError(f"{path.name}: cannot read ({exc.strerror or exc})", path=path) from exc
        lines = raw.split(b"\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = parse_journal_line(line)
            except SessionFormatError as exc:
                # Only the unacknowledged tail of a crashed write can be torn; stop there.
                level = logging.DEBUG if n == len(lines) else logging.WARNING
                logger.log(level, "%s line %d ignored (and all after it): %s", path.name, n, exc)
                return False
            have = len(record.messages)
            start, msgs = entry["start"], entry["messages"]
            if start > have:
                logger.warning("%s line %d starts at message %d but only %d exist; ignored from here",
                               path.name, n, start, have)
                return False
            # Records already folded into the snapshot overlap it; take only what is new.
            record.messages.extend(msgs[have - start:])
            record.updated_at = entry["updated_at"]
        return not raw or raw.endswith(b"\n")

    def load(self, session_id: str) -> SessionRecord:
        """Load a session (snapshot plus journal).

        Raises:
            ValueError: ``session_id`` is not a plain session name.
            FileNotFoundError: there is no such session.
            SessionFormatError: the session's files are unreadable or malformed.
        """
        return self._load(session_id)[0]

    def _load(self, session_id: str) -> tuple[SessionRecord, bool]:
        """``load``, and whether the journal ended cleanly."""
        t0 = time.perf_counter()
        snap, journal = self.snapshot_path(session_id), self.journal_path(session_id)
        if snap.exists() or snap.is_symlink():
            data, raw = self._read_json(snap)
            try:
                record = SessionRecord.from_dict(data, raw=raw)
            except SessionFormatError as exc:
                raise SessionFormatError(f"{snap.name}: {exc}", path=snap) from None
            if record.session_id != session_id:
                logger.warning("%s says session_id=%r; using the file name", snap.name, record.session_id)
                record.session_id = session_id
        elif journal.exists():
            record = SessionRecord(session_id=session_id, llm_model="unknown", created_at="", updated_at="")
        else:
            raise FileNotFoundError(errno.ENOENT, "no such session", str(snap))
        clean = self._replay_journal(session_id, record)
        if not record.created_at:
            # A session that crashed before its first snapshot: date it by its journal.
            record.created_at = record.updated_at or now_iso()
        if logger.isEnabledFor(logging.DEBUG):
            size = sum(p.stat().st_size for p in (snap, journal) if p.exists())
            logger.debug("loaded %s: %d messages, %d bytes in %.2f ms", snap, len(record.messages), size,
                         (time.perf_counter() - t0) * 1000)
        return record, clean

    def candidates(self) -> list[tuple[float, str]]:
        """Session ids in the folder with their last-modified time, newest first."""
        newest: dict[str, float] = {}
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if not dot or ext not in ("json", "journal") or not _ID_RE.fullmatch(stem):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            newest[stem] = max(newest.get(stem, 0.0), st.st_mtime)
        return sorted(((m, s) for s, m in newest.items()), reverse=True)

    def load_newest(self, exclude: Iterable[str] = ()) -> SessionRecord | None:
        """The most recently updated session that loads and has at least one message."""
        skip = set(exclude)
        for _mtime, session_id in self.candidates():
            if session_id in skip:
                continue
            try:
                record = self.load(session_id)
            except (SessionFormatError, OSError) as exc:
                logger.warning("skipping session %s: %s", session_id, exc)
                continue
            if record.messages:
                return record
        return None

    def list_sessions(self) -> list[SessionInfo]:
        """Every loadable session with at least one message, newest first; bad files are logged."""
        out = []
        for _mtime, session_id in self.candidates():
            try:
                record = self.load(session_id)
            except (SessionFormatError, OSError) as exc:
                logger.warning("skipping session %s: %s", session_id, exc)
                continue
            if not record.messages:
                continue
            size = 0
            for p in (self.snapshot_path(session_id), self.journal_path(session_id)):
                with contextlib.suppress(OSError):
                    size += p.lstat().st_size
            first = next((m["content"] for m in record.messages if m["role"] == "user"), "")
            out.append(SessionInfo(
                session_id=session_id,
                path=self.snapshot_path(session_id),
                created_at=record.created_at,
                updated_at=record.updated_at or record.created_at,
                llm_model=record.llm_model,
                turns=count_turns(record.messages),
                total_messages=len(record.messages),
                size_bytes=size,
                first_user_line=first.strip().splitlines()[0] if first.strip() else "",
            ))
        return out

    def delete(self, session_id: str) -> bool:
        """Delete a session's files; refuses (``SessionLockedError``) while it is open for writing."""
        validate_session_id(session_id)
        if not self.directory.is_dir():
            return False
        removed = False
        with dir_lock(self.directory):
            fd = self._open_locked_journal(session_id, create=False)
            try:
                for p in (self.snapshot_path(session_id), self.journal_path(session_id)):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
                        removed = True
                with contextlib.suppress(FileNotFoundError):
                    self.kv_path(session_id).unlink()
            finally:
                if fd is not None:
                    os.close(fd)
        return removed

    # -- writing -------------------------------------------------------------------------
    def _open_locked_journal(self, session_id: str, *, create: bool) -> int | None:
        path = self.journal_path(session_id)
        flags = os.O_WRONLY | os.O_APPEND | _O_NOFOLLOW | _O_CLOEXEC | (os.O_CREAT if create else 0)
        while True:
            try:
                fd = os.open(path, flags, 0o600)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise SessionError(f"cannot open {path}: {exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = flock_holder(fd)
                os.close(fd)
                who = ("another session object in this process" if holder == os.getpid()
                       else f"process {holder}" if holder else "another process")
                raise SessionLockedError(
                    f"session {session_id} is open for writing by {who}; close it there first, "
                    "or start a new session",
                    session_id=session_id, holder=str(holder) if holder else None,
                ) from None
            # The previous holder may have removed the journal after we opened it; a lock on
            # that orphan would protect nothing, so start again on the live path.
            try:
                st_path = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                st_path = None
            st_fd = os.fstat(fd)
            if st_path is not None and (st_path.st_ino, st_path.st_dev) == (st_fd.st_ino, st_fd.st_dev):
                return fd
            os.close(fd)
            if not create:
                return None

    def create(self, record_model: str) -> SessionWriter:
        """Start a new session named ``session_<unix seconds>``, with a suffix if that is taken."""
        self.ensure_dir()
        base = f"session_{int(time.time())}"
        try:
            with dir_lock(self.directory):
                for n in range(1, 100_000):
                    session_id = base if n == 1 else f"{base}_{n}"
                    snap, journal = self.snapshot_path(session_id), self.journal_path(session_id)
                    if snap.exists() or snap.is_symlink():
                        continue
                    try:
                        fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                                     | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
                    except FileExistsError:
                        continue
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new file: cannot be held
                    record = SessionRecord(session_id=session_id, llm_model=record_model)
                    return SessionWriter(self, record, fd, snapshot_upto=None)
        except OSError as exc:
            raise self._folder_error("create a session in", exc) from exc
        raise SessionError(f"no free session name in {self.directory}")  # pragma: no cover

    def _folder_error(self, action: str, exc: OSError) -> SessionError:
        return SessionError(f"cannot {action} {self.directory}: {exc.strerror or exc}; check that the folder is "
                            "writable, or choose another with sessions_dir=... (--sessions-dir)")

    def open(self, session_id: str) -> tuple[SessionWriter, SessionRecord]:
        """Open an existing session for writing: lock it, then load it (so nothing is missed)."""
        validate_session_id(session_id)
        if not (self.snapshot_path(session_id).exists() or self.journal_path(session_id).exists()):
            raise FileNotFoundError(errno.ENOENT, "no such session", str(self.snapshot_path(session_id)))
        self.ensure_dir()
        journal = self.journal_path(session_id)
        try:
            with dir_lock(self.directory):
                created = not journal.exists()
                fd = self._open_locked_journal(session_id, create=True)
        except OSError as exc:
            raise self._folder_error("open a session in", exc) from exc
        assert fd is not None
        try:
            record, clean = self._load(session_id)
            snapshot_upto = len(record.messages) if os.fstat(fd).st_size == 0 else None
            writer = SessionWriter(self, record, fd, snapshot_upto=snapshot_upto)
        except BaseException:
            # Leave a damaged session as it was found: no empty journal beside it.
            if created:
                with contextlib.suppress(OSError):
                    journal.unlink()
            os.close(fd)
            raise
        # A journal torn by a crash must not be appended to: the first save will be a snapshot.
        writer._journal_torn = not clean
        return writer, record


_open_writers: weakref.WeakSet[SessionWriter] = weakref.WeakSet()


@atexit.register
def _flush_open_writers() -> None:
    # A program that forgets close() still gets complete snapshots at a normal exit; the
    # journal has the turns anyway, this only keeps the .json current for people reading it.
    for writer in list(_open_writers):
        with contextlib.suppress(Exception):
            writer.close()


class SessionWriter:
    """Writes one open session: journal appends on the hot path, snapshots in the background."""

    def __init__(self, store: HistoryStore, record: SessionRecord, journal_fd: int,
                 *, snapshot_upto: int | None):
        self.store = store
        self.record = record
        self.session_id = record.session_id
        self._fd: int | None = journal_fd
        self._journal_size = os.fstat(journal_fd).st_size
        self._journaled = len(record.messages)  # messages[: _journaled] are on disk
        self._journal_torn = False             # a failed append left half a line behind
        self._snapshot_upto = snapshot_upto     # messages in the .json, None if none/unknown
        self._messages: list[MessageDict] = record.messages
        self._lock = threading.Lock()           # journal fd and counters
        self._snapshot_lock = threading.Lock()  # one snapshot write at a time
        self._cond = threading.Condition()
        self._wanted = False
        self._requested = 0                     # snapshots asked for / attempted: flush() waits on them
        self._done = 0
        self._stopping = False
        self._encoded: list[str] = []          # encode_json of messages[: len(_encoded)]
        self.last_error: OSError | None = None
        # Started now, not at the first turn: Thread.start() waits for the thread to run,
        # which would land on that turn's save.
        self._thread = threading.Thread(target=self._run, name=f"snapshot-{self.session_id}", daemon=True)
        self._thread.start()
        _open_writers.add(self)

    @property
    def snapshot_path(self) -> Path:
        return self.store.snapshot_path(self.session_id)

    @property
    def has_file(self) -> bool:
        return self._snapshot_upto is not None or self._journal_size > 0

    def bind(self, messages: list[MessageDict]) -> None:
        """Follow ``messages`` (the session's live, append-only list) from now on."""
        self._messages = messages
        self.record.messages = messages

    # -- hot path --------------------------------------------------------------------------
    def commit(self) -> bool:
        """Append every message not yet on disk to the journal; True once it is written.

        One ``write`` of one line: after it returns the turn survives ``kill -9``.  A failure
        (disk full, permissions) is logged and returns False; memory keeps the messages and
        the next commit writes them all.
        """
        with self._lock:
            if self._fd is None:
                raise SessionError(f"session {self.session_id} is closed")
            start = self._journaled
            end = len(self._messages)
            if start >= end:
                return True
            torn = self._journal_torn
        if torn:
            # Appending after a torn line would hide the new turn from loading: save in full.
            try:
                self.write_snapshot()
            except OSError as exc:
                self.last_error = exc
                logger.warning("could not save %s: %s; the turn is kept in memory", self.snapshot_path,
                               exc.strerror or exc)
                return False
            return not self._journal_torn
        with self._lock:
            self.record.updated_at = now_iso()
            # Each message is encoded once, here; snapshots reuse these strings.
            new = [encode_json(m) for m in self._messages[start:end]]
            line = (f'{{"start": {start}, "messages": [{", ".join(new)}], '
                    f'"updated_at": {encode_json(self.record.updated_at)}}}\n').encode()
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as exc:
                self._undo_partial_append()
                self.last_error = exc
                logger.warning("could not save turn to %s: %s; the turn is kept in memory and will "
                               "be saved with the next one", self.store.journal_path(self.session_id),
                               exc.strerror or exc)
                return False
            self._journal_size += len(line)
            self._journaled = end
            if len(self._encoded) == start:
                self._encoded.extend(new)
            self.last_error = None
        logger.debug("journaled %d message(s) of %s (%d bytes)", end - start, self.session_id, len(line))
        self._request_snapshot()
        return True

    def _undo_partial_append(self) -> None:
        # A short write leaves half a line; cut it off so the next append starts clean.
        # If even that fails the torn line stays, and loading stops at it: the next save
        # must then be a full snapshot, which _snapshot_upto=None arranges.
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._journal_size)
        except OSError:
            self._journal_torn = True

    # -- snapshots -------------------------------------------------------------------------
    def _request_snapshot(self) -> None:
        with self._cond:
            self._wanted = True
            self._requested += 1
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._stopping:
                    self._cond.wait()
                if not self._wanted:
                    return
                self._wanted = False
                target = self._requested
            try:
                self.write_snapshot()
            except OSError as exc:
                logger.warning("background save of %s failed: %s (the journal still has every turn)",
                               self.snapshot_path, exc.strerror or exc)
            finally:
                with self._cond:
                    self._done = max(self._done, target)
                    self._cond.notify_all()

    def write_snapshot(self) -> Path:
        """Write ``<id>.json`` with every message so far, atomically; then empty the journal."""
        with self._snapshot_lock:
            t0 = time.perf_counter()
            with self._lock:
                upto = len(self._messages)
                messages = self._messages[:upto]
                encoded = self._encoded[:upto]
                if not self.record.updated_at:
                    self.record.updated_at = now_iso()
            if len(encoded) < upto:  # messages loaded from disk, or saved without a journal
                extra = [encode_json(m) for m in messages[len(encoded):]]
                with self._lock:
                    if len(self._encoded) == len(encoded):
                        self._encoded.extend(extra)
                encoded += extra
            data = encode_snapshot(self.record, messages, encoded)
            path = self.snapshot_path
            atomic_write_bytes(path, data)
            with self._lock:
                self._snapshot_upto = upto
                if upto > self._journaled:
                    self._journaled = upto  # an explicit save also covers unjournaled turns
                # Only empty the journal if the snapshot holds everything in it; a turn
                # appended meanwhile stays until the next snapshot.
                if self._fd is not None and self._journaled <= upto and (self._journal_size or self._journal_torn):
                    try:
                        os.ftruncate(self._fd, 0)
                        self._journal_size = 0
                        self._journal_torn = False
                    except OSError as exc:
                        logger.debug("could not empty journal of %s: %s", self.session_id, exc)
            logger.debug("saved %s: %d messages, %d bytes in %.2f ms", path, upto, len(data),
                         (time.perf_counter() - t0) * 1000)
            return path

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every snapshot asked for so far has been attempted; False on timeout."""
        with self._cond:
            target = self._requested
            return self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(), timeout)

    def close(self) -> None:
        """Write a final snapshot, remove the journal, release the lock. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            fd = self._fd
            if fd is None:
                return
        try:
            if self._messages and (self._snapshot_upto != len(self._messages) or self._journal_size):
                try:
                    self.write_snapshot()
                except OSError as exc:
                    # Keep the journal: it is the only complete copy now.
                    logger.warning("could not write %s on close: %s; the journal %s keeps every turn",
                                   self.snapshot_path, exc.strerror or exc,
                                   self.store.journal_path(self.session_id))
                    return
            # Still holding the lock: anyone who opened the journal before the unlink will
            # see it is gone once they get the lock, and start over on the live path.
            with dir_lock(self.store.directory):
                with contextlib.suppress(FileNotFoundError):
                    self.store.journal_path(self.session_id).unlink()
        except OSError as exc:
            logger.warning("closing session %s: %s", self.session_id, exc)
        finally:
            with self._lock:
                self._fd = None
            os.close(fd)
            _open_writers.discard(self)

"""Small, careful file primitives: atomic replace, bounded safe reads, advisory locks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "FileTooLargeError",
    "GroupSync",
    "NotARegularFileError",
    "atomic_write_bytes",
    "dir_lock",
    "flock_holder",
    "fsync_dir",
    "group_sync",
    "open_regular",
    "process_label",
    "read_regular_file",
    "read_regular_file_stat",
]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

logger = logging.getLogger("conversation_session.store")


class NotARegularFileError(OSError):
    """A symlink, FIFO, device or directory stands where a session file should be."""


class FileTooLargeError(OSError):
    """A file is larger than the caller is willing to read."""


def open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that can never block or follow a link, and only ever returns a regular file.

    ``O_NONBLOCK`` makes opening a planted FIFO (or device) return at once instead of waiting
    for a peer forever; ``O_NOFOLLOW`` refuses a symlink; the ``fstat`` of the descriptor then
    refuses anything that is not a regular file (``NotARegularFileError``).  For a regular file
    ``O_NONBLOCK`` changes nothing.
    """
    try:
        fd = os.open(path, flags | _O_NOFOLLOW | _O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotARegularFileError(errno.ELOOP, "is a symbolic link; not followed", str(path)) from exc
        if exc.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV, errno.EOPNOTSUPP):
            raise NotARegularFileError(exc.errno, "is not a regular file", str(path)) from exc
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotARegularFileError(errno.EINVAL, "is not a regular file", str(path))
    return fd


def read_regular_file(path: Path, max_bytes: int) -> bytearray:
    """Read ``path`` without following a symlink, refusing anything but a regular file.

    The size is checked on the open descriptor before reading, so a planted multi-GB file
    costs nothing, and a file swapped for a symlink between a listing and the read is refused.
    The bytes land in one buffer of the file's size (no joining of chunks; writable, so a KV
    cache can hand it to llama.cpp without another copy).
    """
    return read_regular_file_stat(path, max_bytes)[0]


def read_regular_file_stat(path: Path, max_bytes: int) -> tuple[bytearray, os.stat_result]:
    """``read_regular_file``, and the ``fstat`` of the descriptor it read (its identity)."""
    fd = open_regular(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_size > max_bytes:
            raise FileTooLargeError(
                errno.EFBIG, f"is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit", str(path)
            )
        buf = bytearray(st.st_size)
        view = memoryview(buf)
        got = 0
        while got < len(buf):
            n = os.readv(fd, [view[got:]])
            if n == 0:  # the file shrank while we read: return what is there
                del view
                del buf[got:]
                return buf, st
            got += n
        del view
        # A journal may grow while we read it: take the rest too, still within the limit.
        while chunk := os.read(fd, 1 << 20):
            buf += chunk
            if len(buf) > max_bytes:
                raise FileTooLargeError(errno.EFBIG, f"grew over the {max_bytes:,}-byte limit", str(path))
        return buf, st
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the new, never a mix.

    The new content goes to a temporary file in the same directory (same filesystem, so the
    rename is atomic), is flushed and fsynced, and only then renamed over the live file; the
    directory is fsynced so the rename itself survives a power cut.  On any failure, Ctrl-C
    included, the temporary file is removed and the live file is untouched.  ``durable=False``
    skips both fsyncs, for files that can be rebuilt (a cache): still atomic, just not
    guaranteed to survive a power cut.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def _load_syncfs() -> object | None:
    """libc's ``syncfs`` (Linux): one call makes every write to a filesystem durable."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_fdatasync = getattr(os, "fdatasync", os.fsync)


class _Ticket:
    __slots__ = ("dev", "done", "error", "fd")

    def __init__(self, fd: int, dev: int):
        self.fd, self.dev = fd, dev
        self.done = False
        self.error: OSError | None = None


class GroupSync:
    """Make file writes durable, sharing disk flushes between threads that commit at once.

    Leader/follower group commit: a thread that asks while no flush runs becomes the leader and
    flushes every request queued so far; the others wait, and those that queued while a flush
    ran are taken by the next leader together.  Every request was queued after its ``write``
    returned, and the flush that covers it starts after it was queued, so it covers the write.

    A batch of one file is an ``fdatasync`` of it (the cheapest flush of a single file); a
    batch of several is one ``syncfs`` per filesystem (one flush for all: measured on this
    project's machine at 100 files, 2 ms against 13 ms for 100 ``fdatasync`` calls; see
    BENCHMARKS.md), falling back to ``fdatasync`` of each where ``syncfs`` is missing.  The
    price: ``syncfs`` also writes out other dirty data of that filesystem (a ``.kv`` file just
    saved), which can lengthen that batch; a lone commit only ever flushes its own journal.
    """

    def __init__(self) -> None:
        self._syncfs = _load_syncfs()
        self.flushes = 0          # disk flushes issued (the benchmark reads it)
        self._reset()
        _instances.add(self)

    def _reset(self) -> None:
        """A fresh, idle committer.  Run in a forked child too (``os.register_at_fork``): only
        the forking thread lives on there, so a leader flushing in the parent would never finish
        and wake the child's committers, the lock may have been copied held, and the parent's
        queued tickets are not the child's to flush."""
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_Ticket] = []
        self._leading = False

    def sync(self, fd: int) -> None:
        """Return once everything written to ``fd`` before the call is on the disk; raise
        the flush's ``OSError`` if it failed (then nothing is known to be durable)."""
        ticket = _Ticket(fd, os.fstat(fd).st_dev)
        with self._cond:
            self._queue.append(ticket)
            while not ticket.done and self._leading:
                self._cond.wait()
            if ticket.done:
                if ticket.error is not None:
                    raise ticket.error
                return
            self._leading = True
            batch, self._queue = self._queue, []
        flushed = False
        try:
            self._flush(batch)
            flushed = True
        finally:
            with self._cond:
                for t in batch:
                    if not flushed and t.error is None:
                        # The flush was interrupted (Ctrl-C in the leading thread): nothing in
                        # the batch is known to be on the disk, so no waiter may report success.
                        t.error = OSError(errno.EIO, "the disk flush was interrupted")
                    t.done = True
                self._leading = False
                self._cond.notify_all()
        if ticket.error is not None:
            raise ticket.error

    def _flush(self, batch: list[_Ticket]) -> None:
        if len(batch) == 1 or self._syncfs is None:
            for t in batch:
                self.flushes += 1
                try:
                    _fdatasync(t.fd)
                except OSError as failed:
                    t.error = failed
            return
        by_dev: dict[int, list[_Ticket]] = {}
        for t in batch:
            by_dev.setdefault(t.dev, []).append(t)
        for tickets in by_dev.values():
            self.flushes += 1
            if self._syncfs(tickets[0].fd) != 0:  # type: ignore[operator]
                err = _c_errno()
                error = OSError(err, os.strerror(err))
                for t in tickets:
                    t.error = error


def _c_errno() -> int:
    import ctypes

    return ctypes.get_errno()


_instances: weakref.WeakSet[GroupSync] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for sync in list(_instances):
        sync._reset()


os.register_at_fork(after_in_child=_reset_after_fork)

group_sync = GroupSync()
"""The process's one group committer (every writer at the ``power`` level goes through it)."""


_warned_lock_dirs: set[str] = set()


def _open_dir_lock(directory: Path) -> int:
    """The descriptor to ``flock`` for the folder: ``.lock``, or the folder itself.

    ``.lock`` is used when it is (or can be made) a regular file.  When it cannot (a planted
    directory, FIFO or symlink of that name, or a read-only folder where it cannot be
    created), the folder's own descriptor is locked instead: every process meets the same
    obstacle, so every process falls back the same way, and no new session is ever blocked.
    """
    path = directory / ".lock"
    try:
        return open_regular(path, os.O_RDWR | os.O_CREAT)
    except NotARegularFileError:
        reason = "is not a regular file (doctor reports it)"
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        reason = f"cannot be used ({exc.strerror})"
    key = str(directory)
    if key not in _warned_lock_dirs:
        _warned_lock_dirs.add(key)
        logger.warning("%s %s; locking the folder itself instead", path, reason)
    return os.open(directory, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)


@contextlib.contextmanager
def dir_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``directory/.lock`` (threads and processes alike).

    Used only around creating and removing session files, so that "is this name free?" and
    "claim it" are one step even when twenty sessions start in the same second.
    """
    fd = _open_dir_lock(directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def flock_holder(fd: int) -> int | None:
    """The pid holding a conflicting flock on the file behind ``fd``, from /proc/locks (Linux)."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    wanted = f":{st.st_ino}"
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 12345 fd:01:123456 0 EOF"; blocked waiters have "->".
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].endswith(wanted):
            dev = parts[5].rsplit(":", 1)[0]
            major, minor = (int(x, 16) for x in dev.split(":"))
            if os.makedev(major, minor) == st.st_dev:
                with contextlib.suppress(ValueError):
                    return int(parts[4])
    return None


def process_label(pid: int) -> str | None:
    """What program process ``pid`` runs, for messages naming a lock's holder: the command's
    name and its script or ``-m`` module (``python main.py``, ``python -m
    conversation_session.service``), never its other arguments (a prompt, a token, a URL with a
    password).  None when it cannot be read (gone, another user's on a hardened /proc, not Linux)."""
    try:
        with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
            argv = f.read(4096).split(b"\0")
    except (OSError, ValueError):
        return None
    words = [w.decode("utf-8", "replace") for w in argv if w]
    if not words:
        return None
    label = [os.path.basename(words[0])]
    if len(words) > 2 and words[1] == "-m":
        label += words[1:3]
    elif len(words) > 1 and words[1].endswith(".py"):
        label.append(os.path.basename(words[1]))
    return " ".join(label)

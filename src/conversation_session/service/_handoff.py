"""Hand a session over between workers on one host: "please close it if it is idle".

A worker keeps a session open between requests (``--keep-open``), which is what makes a turn
cheap (no reopen, no final snapshot, the backend's cache warm).  But the store lets only one
writer hold a session, so when a request for that session reaches another worker, that worker
asks the holder to let go: the ``SessionLockedError`` names the holder's pid (file store) or
``host:pid:tag`` (PostgreSQL), and each worker listens on a datagram socket named by its pid.
The holder closes the session if no request is using it; the asker's bounded retry then
opens it.  It is only a hint: the store's lock stays the one rule, a lost or late message costs
a retry, and a holder on another host (which cannot be reached) lets go when its
``--keep-open`` time runs out.

The sockets live in a folder private to the user (0700), so only the user's own processes can
ask, and all they can do is make an idle session close early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..stores._fileio import process_label
from ..stores._ids import SESSION_ID_RE_BYTES

__all__ = ["HandoffListener", "ask_release", "describe_holder", "holder_pid", "is_worker"]

logger = logging.getLogger("conversation_session.service")

_ID = SESSION_ID_RE_BYTES


def _folder() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"conversation-session-service-{os.getuid()}"


def _path(pid: int) -> Path:
    return _folder() / f"{pid}.sock"


def holder_pid(holder: str | None) -> int | None:
    """The pid of a lock holder on this host, from a ``SessionLockedError.holder``; None if it
    is elsewhere or unknown."""
    if not holder:
        return None
    if holder.isdigit():
        return int(holder)
    parts = holder.split(":")
    if len(parts) >= 2 and parts[0] == socket.gethostname() and parts[1].isdigit():
        return int(parts[1])
    return None


def is_worker(pid: int) -> bool:
    """True if ``pid`` is a live service worker of this user on this host (it listens for
    hand-over requests); False for another program holding a session (the chat, a script)."""
    try:
        os.kill(pid, 0)
        path = _path(pid)
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
        # The file alone proves nothing: a worker killed with -9 leaves it, and its pid may since
        # belong to another program (the chat).  Connecting is refused unless a live socket is
        # bound there, and sends nothing.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            probe.connect(str(path))
        return True
    except (OSError, ValueError):  # gone, no socket, or a dead worker's: not a worker (or hand-over is off)
        return False


def describe_holder(holder: str | None) -> str:
    """Who holds a session, for a 409's message: another worker of this service, or the real
    program (``process 4242 (python main.py)``: the chat), so the user knows what to close."""
    pid = holder_pid(holder)
    if pid is None:
        return f"another worker ({holder})" if holder else "another worker"
    if is_worker(pid):
        return f"another worker of this service (process {pid})"
    label = process_label(pid)
    return (f"another program, process {pid}" + (f" ({label})" if label else "")
            + ", not this service: close the session there (in the chat: `new`, or quit)")


def ask_release(pid: int, store_id: str) -> bool:
    """Ask worker ``pid`` to close ``store_id`` if it is idle (best effort, never blocks)."""
    if pid == os.getpid():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(store_id.encode(), str(_path(pid)))
        return True
    except OSError:  # not a service worker, gone, or its queue is full: the retry covers it
        return False


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_request: Callable[[str], None]):
        self.on_request = on_request

    def datagram_received(self, data: bytes, addr: object) -> None:
        if _ID.fullmatch(data):
            self.on_request(data.decode())


class HandoffListener:
    """This worker's socket; ``on_request(store_id)`` runs on the event loop."""

    def __init__(self) -> None:
        self._transport: asyncio.BaseTransport | None = None
        self._path: Path | None = None

    async def start(self, on_request: Callable[[str], None]) -> None:
        folder = _folder()
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            st = folder.stat()
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                logger.warning("%s is not private to this user; session hand-over between workers is off", folder)
                return
            path = _path(os.getpid())
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a dead process's, with our pid
            loop = asyncio.get_running_loop()
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(on_request), local_addr=str(path), family=socket.AF_UNIX)
            self._path = path
        except OSError as exc:
            logger.warning("session hand-over between workers is off: %s", exc)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self._path = None

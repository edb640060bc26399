"""What the HTTP backends share: timeouts, and stopping a stream from another thread."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass
from typing import Any

import httpx

from ._base import CancelToken

__all__ = ["HttpTimeouts", "StreamKiller"]


@dataclass(frozen=True)
class HttpTimeouts:
    """Finite by default: a server that accepts and then says nothing cannot hang a turn.

    ``connect`` is short so that a server that is down fails at once, whatever the turn's
    own ``timeout``; ``read`` bounds the silence between two streamed pieces.
    """

    connect: float = 5.0
    read: float = 300.0
    write: float = 30.0

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.connect)


class StreamKiller:
    """Lets a cancel token close the socket a streaming response is being read from.

    Closing a socket from another thread does not wake a thread blocked reading it on Linux;
    ``shutdown`` does, and it sends the FIN that tells the server its client is gone, which
    is how Ollama and llama.cpp's server learn to stop generating.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def bind(self, cancel: CancelToken | None) -> None:
        """Attach responses received on this thread to ``cancel`` (None to detach)."""
        self._local.cancel = cancel

    def response_hook(self, response: httpx.Response) -> None:
        cancel: CancelToken | None = getattr(self._local, "cancel", None)
        if cancel is None:
            return
        stream = response.extensions.get("network_stream")
        sock: Any = stream.get_extra_info("socket") if stream is not None else None
        if sock is None:
            cancel.on_cancel(response.close)
            return

        def kill() -> None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        cancel.on_cancel(kill)

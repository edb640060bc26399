"""What the HTTP backends share: timeouts, stopping a request from another thread, error text."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from ._base import CancelToken

__all__ = ["HttpTimeouts", "StreamKiller", "iter_sse_data", "make_client", "server_message"]


@dataclass(frozen=True)
class HttpTimeouts:
    """Finite by default: a server that accepts and then says nothing cannot hang a turn.

    ``connect`` is short so that a server that is down fails at once, whatever the turn's
    own ``timeout``; ``read`` bounds the silence between two streamed pieces (and the time a
    server may take to load a model and compute a long prompt before its first piece).
    """

    connect: float = 5.0
    read: float = 300.0
    write: float = 30.0

    def to_httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect, read=self.read, write=self.write, pool=self.connect)


class StreamKiller:
    """Lets a cancel token shut down the socket a request is using, from another thread.

    Closing a socket from another thread does not wake a thread blocked reading it on Linux;
    ``shutdown`` does, and it sends the FIN that tells the server its client is gone, which
    is how Ollama and llama.cpp's servers learn to stop generating.

    The socket is captured when the connection is made (an httpcore trace event), not when
    the response arrives: Ollama sends no headers until the first token, i.e. after loading
    the model and computing the whole prompt, and a cancel must work during that time too.
    Clients built by ``make_client`` open a connection per request so that this always fires;
    ``response_hook`` still covers a connection that was reused.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def bind(self, cancel: CancelToken | None) -> None:
        """Attach requests made on this thread to ``cancel`` (None to detach)."""
        self._local.cancel = cancel

    def _cancel(self) -> CancelToken | None:
        return getattr(self._local, "cancel", None)

    def event_hooks(self) -> dict[str, list[Any]]:
        return {"request": [self.request_hook], "response": [self.response_hook]}

    def request_hook(self, request: httpx.Request) -> None:
        cancel = self._cancel()
        if cancel is None:
            return

        def trace(event: str, info: dict[str, Any]) -> None:
            if event == "connection.connect_tcp.complete":
                self._watch(cancel, info.get("return_value"), None)

        request.extensions["trace"] = trace

    def response_hook(self, response: httpx.Response) -> None:
        cancel = self._cancel()
        if cancel is not None:
            self._watch(cancel, response.extensions.get("network_stream"), response)

    @staticmethod
    def _watch(cancel: CancelToken, stream: Any, response: httpx.Response | None) -> None:
        sock: Any = stream.get_extra_info("socket") if stream is not None else None
        if sock is None:
            if response is not None:
                cancel.on_cancel(response.close)
            return

        def kill() -> None:
            # A socket closed since (the request ended) has fd -1: shutdown raises, harmlessly.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        cancel.on_cancel(kill)


def make_client(base_url: str, timeouts: HttpTimeouts, killer: StreamKiller,
                headers: dict[str, str] | None = None) -> httpx.Client:
    """An ``httpx.Client`` whose requests a ``StreamKiller`` can stop at any point.

    No keep-alive: each request gets a fresh connection, whose socket the killer sees being
    made.  On loopback that costs well under a millisecond a turn.
    """
    return httpx.Client(
        base_url=base_url,
        headers=headers,
        timeout=timeouts.to_httpx(),
        limits=httpx.Limits(max_keepalive_connections=0),
        event_hooks=killer.event_hooks(),
    )


def server_message(response: httpx.Response, limit: int = 500) -> str:
    """The server's own error text: ``{"error": {"message": ...}}``, ``{"error": ...}``,
    ``{"detail": ...}``, or the body as it is (shortened)."""
    try:
        text = response.text
    except (httpx.HTTPError, UnicodeDecodeError):
        return response.reason_phrase or "no message"
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error", data.get("detail", data.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err
        if err:
            text = err if isinstance(err, str) else json.dumps(err, ensure_ascii=False)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return text or response.reason_phrase or "no message"


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event (comments such as pings and other fields skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)

"""What the HTTP backends share: timeouts, stopping a request from another thread, error text."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from .._runtime import run_in_background
from ._base import Backend, CancelToken

__all__ = ["AsyncClients", "HttpBackend", "HttpTimeouts", "aiter_sse_data", "cancel_extensions", "iter_sse_data",
           "make_client", "on_event_loop", "probe_off_the_loop", "server_message"]


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


def cancel_extensions(cancel: CancelToken, *, is_async: bool) -> dict[str, Any]:
    """httpx request extensions that let ``cancel`` shut down the request's socket, from any
    thread, at any point of the request.

    Closing a socket from another thread does not wake a thread blocked reading it on Linux;
    ``shutdown`` does (and an event loop watching it sees it readable at once), and it sends the
    FIN that tells the server its client is gone, which is how Ollama and llama.cpp's servers
    learn to stop generating.

    The socket is captured when the connection is made (an httpcore trace event), not when the
    response arrives: Ollama sends no headers until the first token, i.e. after loading the
    model and computing the whole prompt, and a cancel must work during that time too.  Clients
    built by ``make_client`` open a connection per request so that this always fires.
    """

    def watch(info: dict[str, Any]) -> None:
        stream = info.get("return_value")
        sock: Any = stream.get_extra_info("socket") if stream is not None else None
        if sock is None:
            return

        def kill() -> None:
            # A socket closed since (the request ended) has fd -1: shutdown raises, harmlessly.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        cancel.on_cancel(kill)

    if is_async:
        async def atrace(event: str, info: dict[str, Any]) -> None:
            if event == "connection.connect_tcp.complete":
                watch(info)

        return {"trace": atrace}

    def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            watch(info)

    return {"trace": trace}


def on_event_loop() -> bool:
    """True on a thread running an asyncio loop: a blocking question to a server would stall it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def probe_off_the_loop(backend: Any, timeout: float | None) -> bool:
    """On an event loop's thread a question to the server must not block it: ask
    ``backend.context_length(timeout)`` on the shared pool (one question at a time) and return
    True, so the caller answers with its configured window meanwhile.  False off the loop, or
    once the question has failed (then the caller answers from what it knows, at once)."""
    if backend._probe_failed or not on_event_loop():
        return False
    if not backend._probing:
        backend._probing = True

        def probe() -> None:
            try:
                backend.context_length(timeout)
            finally:
                backend._probing = False

        run_in_background(probe, "context-window probe")
    return True


def make_client(base_url: str, timeouts: HttpTimeouts, headers: dict[str, str] | None = None) -> httpx.Client:
    """An ``httpx.Client`` whose requests ``cancel_extensions`` can stop at any point.

    No keep-alive: each request gets a fresh connection, whose socket the trace sees being
    made (and closing a response early closes its connection, so the server hears it).  On
    loopback that costs well under a millisecond a turn.
    """
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeouts.to_httpx(),
                        limits=httpx.Limits(max_keepalive_connections=0))


class AsyncClients:
    """One ``httpx.AsyncClient`` per event loop (an async client belongs to the loop it was
    first used on), made on first use.  No keep-alive, as ``make_client``: an idle client holds
    no socket, so one dropped without ``aclose()`` leaks nothing."""

    def __init__(self, base_url: str, timeouts: HttpTimeouts, headers: dict[str, str] | None = None):
        self._args = (base_url, timeouts, headers)
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.get(loop)
            if client is None or client.is_closed:
                base_url, timeouts, headers = self._args
                client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeouts.to_httpx(),
                                           limits=httpx.Limits(max_keepalive_connections=0))
                self._clients[loop] = client
            return client

    async def aclose(self) -> None:
        """Close the running loop's client (the others hold no connections; they are dropped)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._clients.pop(loop, None)
            self._clients = weakref.WeakKeyDictionary()
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        with self._lock:
            self._clients = weakref.WeakKeyDictionary()


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


class _SSE:
    """Server-sent events, a line at a time: ``feed`` returns an event's data when it ends."""

    def __init__(self) -> None:
        self.data: list[str] = []

    def feed(self, line: str) -> str | None:
        if not line:
            if self.data:
                out, self.data = "\n".join(self.data), []
                return out
        elif line.startswith("data:"):
            value = line[5:]
            self.data.append(value[1:] if value.startswith(" ") else value)
        return None

    def end(self) -> str | None:
        return "\n".join(self.data) if self.data else None


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each server-sent event (comments such as pings and other fields skipped)."""
    sse = _SSE()
    for line in lines:
        if (data := sse.feed(line)) is not None:
            yield data
    if (data := sse.end()) is not None:
        yield data


async def aiter_sse_data(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """``iter_sse_data`` over an async stream of lines."""
    sse = _SSE()
    async for line in lines:
        if (data := sse.feed(line)) is not None:
            yield data
    if (data := sse.end()) is not None:
        yield data


class HttpBackend(Backend):
    """What the Ollama and OpenAI-compatible backends share: a sync client, one async client
    per event loop, and the last reply's server figures per ``cache_key`` (under ``_stats_lock``)."""

    _client: httpx.Client
    _aclients: AsyncClients
    _stats_lock: threading.Lock
    _last: dict[Any, dict[str, Any]]

    def reset_cache(self, *, cache_key: Any = None) -> None:
        self.forget(cache_key)

    def forget(self, cache_key: Any) -> None:
        with self._stats_lock:
            self._last.pop(cache_key, None)

    def close(self) -> None:
        self._client.close()
        self._aclients.close()

    async def aclose(self) -> None:
        self._client.close()
        await self._aclients.aclose()

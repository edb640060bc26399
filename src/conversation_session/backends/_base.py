"""The backend interface: one streaming generator (sync and async) plus capability flags.

A backend turns a list of messages into a stream of text pieces.  It knows nothing of
sessions, files or timeouts: the session iterates ``generate()`` (or ``agenerate()`` on an
event loop), and to stop it (deadline, Ctrl-C) it cancels the request's ``CancelToken``.  A
backend checks the token between steps and registers ``on_cancel`` callbacks for anything that
blocks (a socket read), so that cancelling really stops the work, not just the reading of it.

One backend object serves many sessions at once, from several threads and event loops: what
belongs to one generation (prompt tokens, tokens served from the KV cache, timings) goes into
``request.usage``, never into the backend; what belongs to one conversation (the embedded
model's KV state, the last server figures) is keyed by ``request.cache_key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .._runtime import generation_executor, shared_executor
from ..stores._record import MessageDict
from ..tools._tool import ToolCall

__all__ = ["Backend", "CancelToken", "GenerationRequest", "ToolCall", "Usage", "estimate_tokens"]


class CancelToken:
    """A one-way flag with callbacks, shared between the session and a running backend."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until cancelled or ``timeout`` passes; True if cancelled."""
        return self._event.wait(timeout)

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # a failing callback must not stop the others  # noqa: BLE001
                pass

    def on_cancel(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on cancellation (at once if already cancelled)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn()


@dataclass
class Usage:
    """What a backend reports about one generation; ``None`` where it does not know."""

    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    load_s: float | None = None
    prompt_eval_s: float | None = None
    eval_s: float | None = None
    finish_reason: str | None = None

    def figures(self, prefix: str) -> dict[str, Any]:
        """The known figures as ``{prefix + name: value}``, for ``get_cache_stats``."""
        names = ("prompt_tokens", "cached_tokens", "completion_tokens", "load_s", "prompt_eval_s", "eval_s")
        return {prefix + n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass
class GenerationRequest:
    messages: list[MessageDict]
    max_tokens: int = 512
    temperature: float = 0.7
    cancel: CancelToken = field(default_factory=CancelToken)
    usage: Usage = field(default_factory=Usage)
    options: dict[str, Any] = field(default_factory=dict)
    # Whose KV state this request continues (the session's identity).  A backend that keeps
    # per-conversation state (the embedded model) serves several sessions from one model by
    # switching to this key's state; the others ignore it.
    cache_key: Any = None
    # Tools offered to the model (their JSON schemas, as the chat APIs take them); None: none.
    tools: list[dict[str, Any]] | None = None
    # Whether the model must call one (OpenAI's ``tool_choice``): None or "auto" (it may answer),
    # "none" (tools not offered this time), "required" (a call to any of them), a tool's name or
    # ``{"type": "function", "function": {"name": ...}}`` (a call to that one).  Backends that
    # cannot force a call treat it as "auto".
    tool_choice: str | dict[str, Any] | None = None
    # Set by the backend before its stream ends when the model asks for tool calls instead of
    # (or after) text.  Calls are never yielded as text pieces, so speech never speaks them.
    tool_calls: list[ToolCall] = field(default_factory=list)


def estimate_tokens(messages: list[MessageDict]) -> int:
    """A deliberately generous token count for backends that cannot tokenize locally.

    CJK and other non-ASCII characters are often a token each; ASCII text averages about four
    characters a token; each message costs a few tokens of chat-template framing.  Erring high
    only trims a little early, erring low would let the server cut the front silently.
    """
    total = 0
    for m in messages:
        text = m["content"]
        if "tool_calls" in m:  # a call request: its name and arguments are in the prompt too
            text += json.dumps(m["tool_calls"], ensure_ascii=False)
        ascii_chars = sum(1 for ch in text if ch < "\x80")
        total += (ascii_chars + 2) // 3 + (len(text) - ascii_chars) + 6
    return total + 3


class Backend(ABC):
    """A model that streams replies.  Subclasses implement ``generate``.

    Capability flags:
        can_stream: pieces arrive as they are generated (not all at the end).
        reuses_prompt_cache: a repeated prompt prefix is not computed again, so keeping the
            sent history stable between turns makes them cheap.
        exact_token_count: ``count_tokens`` is exact (else an overestimate).
        can_warm: ``warm`` does something (loads a restored history into the prompt cache).
        can_persist_state: ``save_state``/``restore_state`` keep the KV cache on disk, so a
            restarted process need not recompute the conversation.
    """

    name: ClassVar[str] = "backend"
    can_stream: ClassVar[bool] = True
    reuses_prompt_cache: ClassVar[bool] = False
    exact_token_count: ClassVar[bool] = False
    can_warm: ClassVar[bool] = False
    can_persist_state: ClassVar[bool] = False

    model_name: str = ""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> Iterator[str]:
        """Yield the reply's text pieces; stop early when ``request.cancel`` is cancelled.

        Raises:
            BackendError: the backend cannot produce a reply (message says what to do).
        """

    async def agenerate(self, request: GenerationRequest) -> AsyncIterator[str]:
        """``generate`` for an event loop: the same pieces, never blocking the loop.

        Stopping: ``request.cancel`` being cancelled (from any thread), the consuming task being
        cancelled, or the generator being closed early (``aclose()``) all stop the generation
        where it runs.  This default runs ``generate`` on the process's shared executor and
        hands the pieces to the loop; when the consumer stops early it cancels
        ``request.cancel`` (the thread then stops within one step) and does not wait for the
        thread.  Server backends override it with native async HTTP.
        """
        loop = asyncio.get_running_loop()
        feed = _ThreadFeed(loop)
        cancel = request.cancel

        def produce() -> None:
            try:
                if cancel.cancelled:
                    feed.finish(None)
                    return
                stream = self.generate(request)
                try:
                    for piece in stream:
                        feed.put(piece)
                        if cancel.cancelled or feed.abandoned:
                            break
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                feed.finish(exc)
            else:
                feed.finish(None)

        generation_executor().submit(produce)
        finished = False
        try:
            while True:
                pieces, done, error = await feed.get()
                for piece in pieces:
                    yield piece
                if done:
                    finished = True
                    if error is not None:
                        raise error
                    return
        finally:
            if not finished:
                # Closed early, or the consuming task was cancelled: stop the thread (it notices
                # within one token) and leave at once; it ends on its own.
                feed.abandoned = True
                cancel.cancel()

    def context_length(self, timeout: float | None = None) -> int | None:
        """The context window in tokens, or None when unknown (then nothing is trimmed).

        Never blocks long: a backend that asks a server bounds the question by a few seconds
        (``timeout``, if given and shorter: what is left of a turn) and remembers the answer, or
        the failure."""
        return None

    async def acontext_length(self, timeout: float | None = None) -> int | None:
        """``context_length`` for an event loop (server backends ask without blocking it)."""
        return self.context_length(timeout)

    def check(self, timeout: float = 5.0) -> None:  # noqa: B027 - optional hook
        """Fail fast, within ``timeout``, if the backend cannot serve (server down, model
        missing), with a ``BackendError`` saying what to do.  Called by the chat app at start."""

    async def acheck(self, timeout: float = 5.0) -> None:
        """``check`` for an event loop (run on the shared executor unless overridden)."""
        await asyncio.get_running_loop().run_in_executor(shared_executor(), self.check, timeout)

    def count_tokens(self, messages: list[MessageDict]) -> int:
        """Tokens the messages take in the prompt, including chat-template framing."""
        return estimate_tokens(messages)

    def warm(self, messages: list[MessageDict], cancel: CancelToken, *, cache_key: Any = None) -> dict[str, Any]:
        """Bring ``messages`` (a restored conversation, as the next prompt will start) into the
        backend's prompt cache, so the first turn after a restart does not pay for it.

        Runs in a background thread right after ``load_history``; must stop soon after
        ``cancel`` is cancelled.  Returns figures for ``get_cache_stats`` (e.g. tokens, seconds).
        """
        return {}

    def save_state(self, path: Path, messages: list[MessageDict],
                   still_current: Callable[[], bool] | None = None, *, cache_key: Any = None) -> dict[str, Any]:
        """Save the KV cache of the completed conversation ``messages`` (``can_persist_state``)."""
        raise NotImplementedError

    def restore_state(self, path: Path, messages: list[MessageDict], max_bytes: int, *,
                      cache_key: Any = None) -> dict[str, Any]:
        """Restore a KV cache saved by ``save_state`` if it matches ``messages`` exactly."""
        raise NotImplementedError

    def cache_stats(self, *, cache_key: Any = None) -> dict[str, Any]:
        """Backend-specific figures for ``ConversationSession.get_cache_stats`` (this key's)."""
        return {}

    def reset_cache(self, *, cache_key: Any = None) -> None:  # noqa: B027 - optional hook
        """Forget the cached prompt state of ``cache_key`` (``clear``); other keys keep theirs."""

    def forget(self, cache_key: Any) -> None:  # noqa: B027 - optional hook
        """The session ``cache_key`` closed: drop whatever the backend keeps for it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (connections; shared models stay loaded)."""

    async def aclose(self) -> None:
        """``close`` for an event loop: also closes the async client of the running loop."""
        self.close()


class _ThreadFeed:
    """Pieces from a producer thread to an event loop, woken once per batch (not per piece):
    while the loop has not yet taken what is waiting, more pieces join it without another
    cross-thread wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pieces: list[str] = []
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._wake_pending = False
        self.abandoned = False

    def _wake(self) -> None:  # on the loop
        with self._lock:
            self._wake_pending = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _notify(self) -> None:  # on the producer, lock held
        if not self._wake_pending:
            self._wake_pending = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening
                self._loop.call_soon_threadsafe(self._wake)

    def put(self, piece: str) -> None:
        with self._lock:
            self._pieces.append(piece)
            self._notify()

    def finish(self, error: BaseException | None) -> None:
        with self._lock:
            self._done, self._error = True, error
            self._notify()

    async def get(self) -> tuple[list[str], bool, BaseException | None]:
        """Wait for pieces or the end: (pieces, done, error)."""
        while True:
            with self._lock:
                if self._pieces or self._done:
                    pieces, self._pieces = self._pieces, []
                    return pieces, self._done, self._error
                self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

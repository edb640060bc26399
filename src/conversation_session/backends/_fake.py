"""A deterministic backend for tests, shipped so that users can test their own code too.

    fake = FakeBackend()
    fake.enqueue(["Hello", "! How can I help?"])        # next reply, in pieces
    with ConversationSession(backend=fake, sessions_dir=tmp) as s:
        assert s.chat("hi").response == "Hello! How can I help?"
    assert fake.requests[0].messages[-1]["content"] == "hi"

Without a queued reply it answers ``"Reply N: <the user's message>"``.  It models a prompt
cache (cached tokens = the common prefix with the previous prompt, one token per word) so the
session's cache bookkeeping can be tested without a model.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from .._exceptions import BackendError
from .._format import MessageDict
from ._base import Backend, GenerationRequest

__all__ = ["FakeBackend"]


def _words(messages: list[MessageDict]) -> list[str]:
    out: list[str] = []
    for m in messages:
        out.append(f"<{m['role']}>")
        out.extend(m["content"].split())
    return out


class FakeBackend(Backend):
    """Scripted replies, optional per-piece delay, and a record of every request.

    Args:
        piece_delay: seconds to wait before each piece (to exercise timeouts).
        context_length: tokens (words) in the modelled context window; None for unlimited.
    """

    name = "fake"
    reuses_prompt_cache = True
    exact_token_count = True

    def __init__(self, *, piece_delay: float = 0.0, context_length: int | None = None,
                 model_name: str = "fake-model"):
        self.model_name = model_name
        self.piece_delay = piece_delay
        self._context_length = context_length
        self._queue: deque[list[str] | BaseException] = deque()
        self.requests: list[GenerationRequest] = []
        self.cancelled = 0
        self._cached: list[str] = []
        self._lock = threading.Lock()

    def enqueue(self, reply: Iterable[str] | str | BaseException) -> None:
        """Queue the next reply (a string, its pieces, or an exception to raise)."""
        if isinstance(reply, BaseException):
            self._queue.append(reply)
        else:
            self._queue.append([reply] if isinstance(reply, str) else list(reply))

    def context_length(self) -> int | None:
        return self._context_length

    def count_tokens(self, messages: list[MessageDict]) -> int:
        return len(_words(messages)) + 1

    def generate(self, request: GenerationRequest) -> Iterator[str]:
        with self._lock:
            self.requests.append(request)
            prompt = [*_words(request.messages), "<assistant>"]
            if self._context_length is not None and len(prompt) > self._context_length:
                raise BackendError(f"fake: prompt of {len(prompt)} tokens over {self._context_length}")
            cached = 0
            while cached < min(len(prompt) - 1, len(self._cached)) and self._cached[cached] == prompt[cached]:
                cached += 1
            request.usage.prompt_tokens = len(prompt)
            request.usage.cached_tokens = cached
            self._cached = list(prompt)
            if self._queue:
                reply = self._queue.popleft()
            else:
                user = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
                reply = [f"Reply {len(self.requests)}: ", user]
            if isinstance(reply, BaseException):
                raise reply
            produced: list[str] = []
            for piece in reply:
                if self.piece_delay:
                    request.cancel.wait(self.piece_delay)
                if request.cancel.cancelled:
                    self.cancelled += 1
                    request.usage.finish_reason = "cancelled"
                    break
                words = piece.split()
                if len(produced) + len(words) > request.max_tokens:
                    request.usage.finish_reason = "length"
                    break
                produced.extend(words)
                self._cached.extend(words)
                yield piece
            else:
                request.usage.finish_reason = "stop"
            request.usage.completion_tokens = len(produced)
            request.usage.eval_s = 0.0

    def cache_stats(self) -> dict[str, Any]:
        return {"n_ctx": self._context_length, "tokens_in_cache": len(self._cached)}

    def reset_cache(self) -> None:
        with self._lock:
            self._cached = []

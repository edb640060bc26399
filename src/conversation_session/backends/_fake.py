"""A deterministic backend for tests, shipped so that users can test their own code too.

    fake = FakeBackend()
    fake.enqueue(["Hello", "! How can I help?"])        # next reply, in pieces
    with ConversationSession(backend=fake, sessions_dir=tmp) as s:
        assert s.chat("hi").response == "Hello! How can I help?"
    assert fake.requests[0].messages[-1]["content"] == "hi"

A tool call is scripted with ``ToolCalls``: ``fake.enqueue(ToolCalls([("set_light", {"on": True})]))``
makes the next reply ask for that call (with a fresh id ``call_<hex>`` unless one is given).

Without a queued reply it answers ``"Reply N: <the user's message>"``.  It models a prompt
cache (cached tokens = the common prefix with the previous prompt, one token per word) so the
session's cache bookkeeping can be tested without a model.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

from .._exceptions import BackendError
from ..stores._record import MessageDict
from ..tools._tool import ToolCall
from ._base import Backend, GenerationRequest

__all__ = ["FakeBackend", "ToolCalls", "WordFakeBackend"]


class ToolCalls:
    """A scripted reply that asks for tool calls: ``ToolCalls([("name", {args}), ...], text="")``
    (a call may also be a ``ToolCall``); ``text`` is streamed before the calls are reported."""

    def __init__(self, calls: Sequence[ToolCall | tuple[str, dict[str, Any]]], text: str = ""):
        self.calls = [c if isinstance(c, ToolCall) else ToolCall(c[0], dict(c[1])) for c in calls]
        self.text = text


def _words(messages: list[MessageDict]) -> list[str]:
    out: list[str] = []
    for m in messages:
        out.append(f"<{m['role']}>")
        out.extend(m["content"].split())
        if "tool_calls" in m:
            out.extend(json.dumps(m["tool_calls"], ensure_ascii=False).split())
    return out


class _Plan:
    """One scripted reply under way."""

    __slots__ = ("calls", "key", "pieces", "produced")

    def __init__(self, key: Any, pieces: list[str], calls: list[ToolCall] | None = None):
        self.key = key
        self.pieces = pieces
        self.produced: list[str] = []
        self.calls = calls or []


class FakeBackend(Backend):
    """Scripted replies, optional per-piece delay, and a record of every request.

    Safe to share between sessions, threads and event loops: each ``cache_key`` has its own
    modelled prompt cache, and replies are handed out in the order requests arrive.
    ``agenerate`` is native async (``asyncio.sleep`` between pieces, no thread).

    Args:
        piece_delay: seconds to wait before each piece (to exercise timeouts).
        context_length: tokens (words) in the modelled context window; None for unlimited.
        script_calls: follow the ``!call NAME {json}`` convention (``scripted_calls``) when no
            reply is queued, so tool calls can be tried without a model (``serve --backend fake
            --tools-file``, ``chat --backend fake --tools-file``): a testing aid.
    """

    name = "fake"
    reuses_prompt_cache = True
    exact_token_count = True

    def __init__(self, *, piece_delay: float = 0.0, context_length: int | None = None,
                 model_name: str = "fake-model", script_calls: bool = False):
        self.model_name = model_name
        self.script_calls = script_calls
        self.piece_delay = piece_delay
        self._context_length = context_length
        self._queue: deque[list[str] | ToolCalls | BaseException] = deque()
        self.requests: list[GenerationRequest] = []
        self.cancelled = 0
        self._cached: dict[Any, list[str]] = {}
        self._lock = threading.Lock()

    def enqueue(self, reply: Iterable[str] | str | ToolCalls | BaseException) -> None:
        """Queue the next reply (a string, its pieces, ``ToolCalls``, or an exception to raise)."""
        with self._lock:
            if isinstance(reply, (BaseException, ToolCalls)):
                self._queue.append(reply)
            else:
                self._queue.append([reply] if isinstance(reply, str) else list(reply))

    def context_length(self, timeout: float | None = None) -> int | None:
        return self._context_length

    def count_tokens(self, messages: list[MessageDict]) -> int:
        return len(_words(messages)) + 1

    def _start(self, request: GenerationRequest) -> _Plan:
        """Record the request, model the prompt cache, pick the reply (or raise the queued error)."""
        with self._lock:
            self.requests.append(request)
            prompt = [*_words(request.messages), "<assistant>"]
            if self._context_length is not None and len(prompt) > self._context_length:
                raise BackendError(f"fake: prompt of {len(prompt)} tokens over {self._context_length}")
            previous = self._cached.get(request.cache_key, [])
            cached = 0
            while cached < min(len(prompt) - 1, len(previous)) and previous[cached] == prompt[cached]:
                cached += 1
            request.usage.prompt_tokens = len(prompt)
            request.usage.cached_tokens = cached
            self._cached[request.cache_key] = list(prompt)
            reply = self._queue.popleft() if self._queue else self._default_reply(request)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, ToolCalls):
            calls = [c if c.id else ToolCall(c.name, c.arguments, f"call_{uuid.uuid4().hex[:12]}") for c in reply.calls]
            return _Plan(request.cache_key, [reply.text] if reply.text else [], calls)
        return _Plan(request.cache_key, reply)

    def _default_reply(self, request: GenerationRequest) -> list[str] | ToolCalls:
        """The reply when none is queued (called under the lock)."""
        scripted = scripted_calls(request) if self.script_calls else None
        if scripted is not None:
            return scripted
        user = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
        return [f"Reply {len(self.requests)}: ", user]

    def _accept(self, request: GenerationRequest, plan: _Plan, piece: str) -> bool:
        """Whether ``piece`` may be sent (the token budget); counts it into the modelled cache."""
        words = piece.split()
        if len(plan.produced) + len(words) > request.max_tokens:
            request.usage.finish_reason = "length"
            return False
        plan.produced.extend(words)
        with self._lock:
            self._cached.setdefault(plan.key, []).extend(words)
        return True

    def _stopped(self, request: GenerationRequest) -> None:
        with self._lock:
            self.cancelled += 1
        request.usage.finish_reason = "cancelled"

    def generate(self, request: GenerationRequest) -> Iterator[str]:
        plan = self._start(request)
        try:
            for piece in plan.pieces:
                if self.piece_delay:
                    request.cancel.wait(self.piece_delay)
                if request.cancel.cancelled:
                    self._stopped(request)
                    break
                if not self._accept(request, plan, piece):
                    break
                yield piece
            else:
                request.usage.finish_reason = "tool_calls" if plan.calls else "stop"
                request.tool_calls = list(plan.calls)
        finally:
            request.usage.completion_tokens = len(plan.produced)
            request.usage.eval_s = 0.0

    async def agenerate(self, request: GenerationRequest) -> AsyncIterator[str]:
        plan = self._start(request)
        finished = False
        try:
            for piece in plan.pieces:
                if self.piece_delay:
                    await asyncio.sleep(self.piece_delay)
                if request.cancel.cancelled:
                    self._stopped(request)
                    break
                if not self._accept(request, plan, piece):
                    break
                yield piece
            else:
                request.usage.finish_reason = "tool_calls" if plan.calls else "stop"
                request.tool_calls = list(plan.calls)
            finished = True
        finally:
            if not finished and request.usage.finish_reason is None:
                self._stopped(request)  # the task was cancelled, or the consumer closed the stream
            request.usage.completion_tokens = len(plan.produced)
            request.usage.eval_s = 0.0

    def cache_stats(self, *, cache_key: Any = None) -> dict[str, Any]:
        with self._lock:
            return {"n_ctx": self._context_length, "tokens_in_cache": len(self._cached.get(cache_key, []))}

    def reset_cache(self, *, cache_key: Any = None) -> None:
        with self._lock:
            self._cached.pop(cache_key, None)

    def forget(self, cache_key: Any) -> None:
        self.reset_cache(cache_key=cache_key)


_CALL_LINE = re.compile(r"^!call\s+([A-Za-z_][A-Za-z0-9_.-]*)\s*(\{.*\})?\s*$")


def scripted_calls(request: GenerationRequest) -> ToolCalls | list[str] | None:
    """The ``!call`` convention of ``serve --backend fake`` (a testing aid): a user message whose
    lines are each ``!call NAME {json arguments}`` makes the reply ask for those calls, when
    tools are offered; once their results follow it, the reply lists them.  ``None`` otherwise."""
    if not request.tools:
        return None
    last_user = max((i for i, m in enumerate(request.messages) if m["role"] == "user"), default=None)
    if last_user is None:
        return None
    lines = [ln for ln in request.messages[last_user]["content"].splitlines() if ln.strip()]
    found = [_CALL_LINE.match(ln.strip()) for ln in lines]
    if not lines or not all(found):
        return None
    after = request.messages[last_user + 1:]
    if not after:
        try:
            return ToolCalls([(m[1], json.loads(m[2]) if m[2] else {}) for m in found if m is not None])
        except (ValueError, TypeError):
            return ["The !call arguments are not a JSON object."]
    results = [f"{m.get('name', '?')} → {m['content']}" for m in after if m["role"] == "tool"]
    return ["Done: " + "; ".join(results) + "."]


class WordFakeBackend(FakeBackend):
    """The fake backend, streaming its reply word by word (so streaming, sentence events and
    interrupts have something to cut): ``serve --backend fake``, for trying the service and
    its clients without a model.  With ``script_calls`` it follows the ``!call`` convention
    (``scripted_calls``) for tools the server or a client offers."""

    def _start(self, request: Any) -> Any:
        plan = super()._start(request)
        text = "".join(plan.pieces)
        plan.pieces = re.findall(r"\S+\s*", text) or ([text] if text else [])  # no empty piece
        return plan

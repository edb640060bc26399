"""AsyncConversationSession: the same session for asyncio hosts (Home Assistant, Pipecat,
LiveKit Agents, FastAPI).

Same arguments and methods as ``ConversationSession``, awaited.  It drives the same
``SessionCore`` and turn logic; what differs is only how it waits:

* the backend streams through ``Backend.agenerate`` (native async HTTP for Ollama and
  OpenAI-compatible servers; the embedded model on the process's small shared pool, stopping
  within one token of a cancellation);
* ``task.cancel()``, ``asyncio.timeout()`` and the session's own ``timeout`` stop the
  generation where it runs; ``CancelledError`` propagates and only completed turns are kept;
* nothing blocks the loop: a journal append (microseconds) runs inline, store reads, snapshot
  folds, KV saves and warm-ups run on the shared pool.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .._exceptions import SessionError
from .._result import ChatResult
from .._runtime import shared_executor
from ..stores import validate_session_id
from ._core import SessionView
from ._turn import AsyncTurn, _TurnSteps

__all__ = ["AsyncConversationSession"]

logger = logging.getLogger("conversation_session")
T = TypeVar("T")


class AsyncConversationSession(SessionView):
    """A conversation for asyncio code; see ``ConversationSession`` for the arguments.

    ::

        async with AsyncConversationSession(backend="ollama", timeout=30) as s:
            await s.load_history()
            result = await s.chat("你好")
            async with s.stream("讲个故事") as turn:
                async for piece in turn:
                    print(piece, end="")
    """

    def _init_driver(self) -> None:
        # Construction touches the store once (a new session's id); for a folder that is a
        # few microseconds, so it is done in the constructor rather than forcing an awaitable one.
        self._lock: asyncio.Lock | None = None   # made on first use, inside the running loop
        self._turn_task: asyncio.Task[Any] | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(shared_executor(), functools.partial(fn, *args))

    def _check_reentry(self, action: str) -> None:
        task = asyncio.current_task()
        if self._turn_task is not None and self._turn_task is task:
            raise SessionError(f"cannot {action} while this task's turn is still streaming; finish or "
                               "cancel the turn first")

    # -- context manager --------------------------------------------------------------------
    async def __aenter__(self) -> AsyncConversationSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Flush, release the session's lock and a backend this session created.  Idempotent."""
        if self._core.closed:
            return
        self._check_reentry("close the session")
        async with self._get_lock():
            await self._off_loop(self._core.close)

    close = aclose

    # -- properties (the rest: SessionView) ---------------------------------------------
    @property
    def system_prompt(self) -> str | None:
        return self._core.conversation.system_prompt

    @system_prompt.setter
    def system_prompt(self, value: str | None) -> None:
        """Change the persona from the next turn on; saved with the session.  Between turns only:
        a setter cannot wait for a running turn, so during one it raises ``SessionError``."""
        if self._turn_task is not None:
            raise SessionError("cannot change the system prompt while a turn is running; set it between turns")
        self._core.set_system_prompt(value)

    # -- the turn ---------------------------------------------------------------------------
    def stream(self, text: str, *, on_token: Callable[[str], None] | None = None,
               tools: Sequence[Callable[..., Any]] | None = None, max_tool_rounds: int | None = None,
               client_tools: Sequence[dict[str, Any]] | None = None,
               tool_choice: str | None = None) -> AsyncTurn:
        """A turn to stream: ``async with s.stream(text) as turn: async for piece in turn``.

        The session takes the turn when the turn starts (``async with`` or the first
        iteration) and holds it until the turn ends; concurrent calls wait their turn.

        ``client_tools``: tool schemas (``{"type": "function", "function": {"name", ...}}``)
        of tools the caller runs itself (an API client's).  They are offered to the model and
        never run here: a call to one ends the turn with ``finish_reason == "tool_calls"`` and
        the call in ``result.tool_calls`` (``"client": True``, no result), committed as pending;
        ``stream_tool_results`` continues the turn.  A new message instead records for each
        pending call that the client sent no result (docs/compat.md).
        """
        return self._start(text, on_token, retry=False, tools=tools, max_tool_rounds=max_tool_rounds,
                           client_tools=client_tools, tool_choice=tool_choice)

    def stream_tool_results(self, results: Sequence[dict[str, Any]], *,
                            on_token: Callable[[str], None] | None = None,
                            client_tools: Sequence[dict[str, Any]] | None = None) -> AsyncTurn:
        """Record the results of the client's pending calls (``{"content", "tool_call_id"?}``;
        without ids they answer the calls in order: ``SessionCore.add_tool_results``), durably,
        then let the model continue the turn; its reply is committed as the turn's end.  The
        model may call the client's tools again (the same rules as ``stream``)."""
        return self._start("", on_token, retry=False, client_tools=client_tools, results=list(results))

    def stream_retry(self, *, on_token: Callable[[str], None] | None = None,
                     client_tools: Sequence[dict[str, Any]] | None = None) -> AsyncTurn:
        """Ask the last user message again; the completed reply replaces the last one (see
        ``ConversationSession.stream_retry``; ``client_tools`` as in ``stream``)."""
        return self._start("", on_token, retry=True, client_tools=client_tools)

    def _start(self, text: str, on_token: Callable[[str], None] | None, *, retry: bool, tools: Any = None,
               max_tool_rounds: int | None = None, client_tools: Sequence[dict[str, Any]] | None = None,
               results: list[dict[str, Any]] | None = None, tool_choice: str | None = None) -> AsyncTurn:
        core = self._core
        if tools is not None or max_tool_rounds is not None or tool_choice is not None:
            _TurnSteps.check_tools(core, tools, max_tool_rounds, tool_choice)
        core.check_can_chat(text)

        async def begin() -> _TurnSteps:
            self._check_reentry("start another turn")
            lock = self._get_lock()
            await lock.acquire()
            try:
                core.check_can_chat(text)
                if results is not None:
                    await self._step(core.add_tool_results, results)  # durable before the model sees them
                self._turn_task = asyncio.current_task()
                loop = asyncio.get_running_loop()

                def release() -> None:
                    # asyncio.Lock belongs to the loop: a commit run on the pool hands it back there.
                    def free() -> None:
                        self._turn_task = None
                        if lock.locked():
                            lock.release()
                    try:
                        running = asyncio.get_running_loop()
                    except RuntimeError:
                        running = None
                    if running is loop:
                        free()
                    else:
                        loop.call_soon_threadsafe(free)

                return _TurnSteps(core, text, on_token, release, retry=retry, tools=tools,
                                   max_tool_rounds=max_tool_rounds, client_tools=list(client_tools or []),
                                   resume=results is not None, tool_choice=tool_choice)
            except BaseException:
                self._turn_task = None
                lock.release()
                raise

        return AsyncTurn(begin, self)

    async def _complete(self, steps: _TurnSteps, **how: Any) -> ChatResult:
        """Commit a turn (``how``: ``heard=``, ``silence_s=`` for an interrupted one).  A file
        journal append is one small write: inline.  A store that talks to a server, or waits for
        the disk (the ``power`` level: a flush shared with the other sessions committing at
        once, which only happens when they wait off the loop), appends off the loop."""
        if self._commits_block():
            return await self._off_loop(functools.partial(steps.complete, **how))
        return steps.complete(**how)

    async def _step(self, fn: Callable[..., T], *args: Any) -> T:
        """A durable step of a tool-using turn, inline or off the loop as ``_complete`` decides."""
        if self._commits_block():
            return await self._off_loop(fn, *args)
        return fn(*args)

    def _commits_block(self) -> bool:
        """Whether a commit waits on a server or the disk (so it must not run on the loop)."""
        return bool(getattr(self._core.store, "blocking_appends", False)) or self._core.saved_level == "power"

    async def chat(self, text: str, *, on_token: Callable[[str], None] | None = None,
                   tools: Sequence[Callable[..., Any]] | None = None,
                   max_tool_rounds: int | None = None, tool_choice: str | None = None) -> ChatResult:
        """Send ``text``; the completed reply, saved before this returns.  Raises what
        ``ConversationSession.chat`` raises; a cancelled task keeps nothing of the turn."""
        turn = self.stream(text, on_token=on_token, tools=tools, max_tool_rounds=max_tool_rounds,
                           tool_choice=tool_choice)
        async with turn:
            return await turn.result()

    async def retry(self, *, on_token: Callable[[str], None] | None = None) -> ChatResult:
        """Regenerate the reply to the last user message (see ``ConversationSession.retry``)."""
        turn = self.stream_retry(on_token=on_token)
        async with turn:
            return await turn.result()

    async def undo(self) -> bool:
        """Withdraw the last turn, durably (see ``ConversationSession.undo``)."""
        self._check_reentry("undo")
        async with self._get_lock():
            return await self._off_loop(self._core.undo)

    async def rewind_to(self, n: int) -> int:
        """Keep the first ``n`` messages; the rest are withdrawn durably, as by ``undo``
        (``SessionCore.rewind_to``).  Returns how many were withdrawn."""
        self._check_reentry("rewind")
        async with self._get_lock():
            return await self._off_loop(self._core.rewind_to, n)

    async def import_turns(self, messages: list[Any]) -> bool:
        """Append completed turns without asking the model (``SessionCore.import_turns``)."""
        self._check_reentry("append to")
        async with self._get_lock():
            return await self._off_loop(self._core.import_turns, messages)

    async def cut_last_reply(self, heard: str | int) -> bool:
        """Barge-in after the reply was saved (see ``ConversationSession.cut_last_reply``)."""
        self._check_reentry("cut a reply in")
        async with self._get_lock():
            return await self._off_loop(self._core.cut_last_reply, heard)

    async def set_title(self, title: str | None) -> bool:
        """Name the session (see ``ConversationSession.set_title``)."""
        self._check_reentry("rename")
        async with self._get_lock():
            return await self._off_loop(self._core.set_title, title)

    # -- persistence ------------------------------------------------------------------------
    async def save_history(self) -> Path | str:
        self._check_reentry("save")
        async with self._get_lock():
            self._core.check_open("save")
            return await self._off_loop(self._core.save_now)

    async def load_history(self, session_id: str | None = None, *, read_only: bool = False) -> bool:
        """See ``ConversationSession.load_history``; the store is read off the loop."""
        if session_id is not None:
            validate_session_id(session_id)
        self._check_reentry("load a session")
        async with self._get_lock():
            self._core.check_open("load into")
            # Store reads, and closing the previous writer (a snapshot fold): all off the loop.
            return await self._off_loop(self._core.load_history, session_id, read_only)

    async def clear_history(self) -> None:
        self._check_reentry("clear")
        async with self._get_lock():
            await self._off_loop(self._core.clear)

    # -- reports ----------------------------------------------------------------------------
    def get_history_summary(self) -> dict[str, Any]:
        """The seed's summary (no I/O: a plain method)."""
        return self._core.summary()

    async def get_cache_stats(self) -> dict[str, Any]:
        """Cache figures; asks the backend, so it runs off the loop."""
        return await self._off_loop(self._core.stats)

    def __repr__(self) -> str:
        return (f"<AsyncConversationSession {self.session_id} backend={self.backend.name} "
                f"model={self.llm_model} turns={self.turns}>")

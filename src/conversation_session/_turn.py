"""A turn in progress: ``Turn`` (iterate it) and ``AsyncTurn`` (``async for`` it).

``session.stream(text)`` returns one; ``chat()`` is a thin wrapper that iterates it.  A turn
joins the conversation only when it is complete: then its messages are committed and
journaled, and ``on_done`` callbacks run (the way simonw/llm's ``Response`` records itself).
A timeout, ``cancel()``, an error, Ctrl-C or a cancelled task leave the history, the file and
the KV cache as they were.

The sync and the async turn share ``_TurnSteps``: what happens before the first token, with
each piece, and at the end.  They differ only in how they drive the backend's stream and wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ._exceptions import BackendError, SessionError, SessionTimeoutError, TTSTimeoutError
from ._format import MessageDict
from ._result import ChatResult
from ._runtime import Deadline, schedule, shared_executor
from .backends import GenerationRequest
from .speech import Speaker, SpeechTimeout

if TYPE_CHECKING:
    from ._core import SessionCore

__all__ = ["AsyncTurn", "Turn"]

logger = logging.getLogger("conversation_session")


class _TurnSteps:
    """The turn's logic, shared by the sync and the async turn; no waiting happens here."""

    def __init__(self, core: SessionCore, text: str, on_token: Callable[[str], None] | None,
                 release: Callable[[], None]):
        self.core = core
        self.t0 = time.perf_counter()
        self.on_token = on_token
        self._release: Callable[[], None] | None = release
        self.pieces: list[str] = []
        self.ttft: float | None = None
        self.result: ChatResult | None = None
        self.error: BaseException | None = None
        self.expired = threading.Event()
        self.user_cancelled = False
        self.speech_finished = False
        self.done_callbacks: list[Callable[[ChatResult], None]] = []
        self.empty = not text.strip()
        self.plan = None if self.empty else core.conversation.plan(text)
        self.request = GenerationRequest(
            messages=self.plan.prompt if self.plan else [], max_tokens=core.max_tokens,
            temperature=core.temperature, cache_key=core.cache_key, options=dict(core.sampling),
        )
        self.speaker: Speaker | None = None
        if not self.empty:
            core.turn_seq += 1  # a KV-cache save still pending for the previous turn is now stale
            self.speaker = core.speaker
            if self.speaker is not None:
                self.speaker.start_turn(self.t0, f"{core.session_id}_turn{core.conversation.turns + 1:04d}_"
                                                 f"{core.turn_seq}")

    # -- during -----------------------------------------------------------------------
    def accept(self, piece: str) -> None:
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.t0
        self.pieces.append(piece)
        if self.speaker is not None:
            self.speaker.feed(piece)
        if self.on_token is not None:
            with self.core.in_callback():
                self.on_token(piece)

    def expire(self) -> None:
        self.expired.set()
        self.request.cancel.cancel()

    def deadline_s(self) -> float | None:
        timeout = self.core.timeout
        return None if timeout is None else max(self.t0 + timeout - time.perf_counter(), 0.0)

    def warmup_timeout_error(self) -> SessionTimeoutError:
        # Its work is the work this turn would do: it goes on for the next attempt.
        return SessionTimeoutError(
            f"the restored conversation was still being loaded into the model after timeout="
            f"{self.core.timeout} s (the warm-up after load_history()); nothing was lost, ask again "
            "in a moment", timeout=self.core.timeout,
        )

    def map_error(self, exc: BaseException) -> BaseException:
        """A backend's failure, unless the deadline caused it (then it is the timeout)."""
        if self.expired.is_set():
            return self.timeout_error()
        if isinstance(exc, SessionError):
            return exc
        return BackendError(f"{self.core.backend.name} backend failed: {exc!r}")

    def timeout_error(self) -> SessionTimeoutError:
        partial = "".join(self.pieces)
        logger.info("turn timed out after %.1f s; %d characters discarded, history kept",
                    self.core.timeout, len(partial))
        return SessionTimeoutError(
            f"the reply took longer than timeout={self.core.timeout} s; the conversation so far "
            "is kept and you can continue", partial_response=partial, timeout=self.core.timeout,
        )

    # -- after ------------------------------------------------------------------------
    def complete(self) -> ChatResult:
        """Commit the whole reply; the turn is journaled before this returns."""
        core = self.core
        total = time.perf_counter() - self.t0
        usage = self.request.usage
        if self.empty or self.plan is None:
            logger.info("empty message: nothing sent, no turn added")
            result = ChatResult(response="", turn=core.conversation.turns, ttft_s=None, total_s=total,
                                saved=False, finish_reason="empty")
        else:
            reply: MessageDict = {"role": "assistant", "content": "".join(self.pieces)}
            saved = core.commit(self.plan, reply)
            core.conversation.figures.add(usage)
            result = ChatResult(
                response=reply["content"],
                turn=core.conversation.turns if core.enable_cache else 1,
                ttft_s=self.ttft, total_s=total, prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens, completion_tokens=usage.completion_tokens,
                saved=saved, finish_reason=usage.finish_reason, trimmed_turns=self.plan.trimmed_turns,
            )
            core.last = result
        self.result = result
        self.release()
        for fn in self.done_callbacks:
            try:
                fn(result)
            except Exception:
                logger.exception("an on_done callback failed")
        return result

    def abort(self) -> None:
        """Nothing of the turn is kept; the cache keeps the completed conversation."""
        if self.speaker is not None:
            self.speaker.cancel()
        if self.plan is not None:
            self.core.after_abort(self.plan.prompt[:-1])
        self.release()

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def finish_speech(self) -> ChatResult:
        """Wait for the reply to be spoken, at most ``tts_wait_timeout``; the turn is already saved."""
        result = self.result
        assert result is not None
        speaker = self.speaker
        if speaker is None or self.empty or self.speech_finished:
            return result
        self.speech_finished = True
        timeout = self.core.tts_wait_timeout
        try:
            report = speaker.finish(timeout)
        except SpeechTimeout as exc:
            self.result = replace(result, tts_first_audio_s=speaker.first_audio_s)
            self.core.last = self.result
            raise TTSTimeoutError(
                f"speaking the reply took longer than tts_wait_timeout={timeout} s, so it "
                "was stopped; the turn itself is complete and saved", result=self.result, timeout=timeout,
            ) from exc
        except BaseException:
            speaker.cancel()
            raise
        self.result = replace(result, tts_first_audio_s=report.first_audio_s)
        self.core.last = self.result
        return self.result


class Turn:
    """One turn of a ``ConversationSession``, streamed in the caller's thread.

    Iterate it for the reply's pieces; ``result()`` finishes it (iterating the rest) and returns
    the ``ChatResult``; ``cancel()`` stops it and keeps nothing.  Use it as a context manager
    (or iterate it to the end) so the session is free for the next turn.
    """

    def __init__(self, steps: _TurnSteps):
        self._s = steps
        self._started = False
        self._finished = False

    @property
    def response(self) -> str:
        """The text so far."""
        return "".join(self._s.pieces)

    def on_done(self, fn: Callable[[ChatResult], None]) -> None:
        """Call ``fn(result)`` when the turn completes (at once if it has)."""
        if self._s.result is not None:
            fn(self._s.result)
        else:
            self._s.done_callbacks.append(fn)

    def cancel(self) -> None:
        """Stop the generation; nothing of this turn is kept.  Safe from any thread: the
        iteration then ends quietly and ``result()`` raises ``SessionError``."""
        self._s.user_cancelled = True
        self._s.request.cancel.cancel()
        if not self._started and not self._finished:
            self._finished = True
            self._s.error = SessionError("the turn was cancelled")
            self._s.abort()

    def __iter__(self) -> Iterator[str]:
        if self._started or self._finished:
            if self._s.error is not None:
                raise self._s.error
            return
        self._started = True
        yield from self._run()

    def _run(self) -> Iterator[str]:
        s = self._s
        try:
            if s.empty:
                s.complete()
                self._finished = True
                return
            warmup = s.core.warmup
            if warmup is not None and not warmup.wait(s.deadline_s()):
                raise s.warmup_timeout_error()
            watchdog: Deadline | None = None
            remaining = s.deadline_s()
            if remaining is not None:
                watchdog = schedule(remaining, s.expire)
            completed = False
            try:
                stream = s.core.backend.generate(s.request)
                try:
                    for piece in stream:
                        if s.expired.is_set():
                            break
                        s.accept(piece)
                        yield piece
                    else:
                        # The stream ended before anything cancelled it: the reply is whole, and a
                        # deadline that fires from now on cuts nothing.
                        completed = not s.request.cancel.cancelled
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
            except (Exception, GeneratorExit) as exc:
                if isinstance(exc, GeneratorExit):
                    s.request.cancel.cancel()
                    raise
                raise s.map_error(exc) from exc
            finally:
                if watchdog is not None:
                    watchdog.cancel()
            if not completed:
                if s.expired.is_set():
                    raise s.timeout_error()
                if s.user_cancelled:
                    self._finished = True
                    s.error = SessionError("the turn was cancelled; nothing of it was kept")
                    s.abort()
                    return
                raise SessionError("the turn was cancelled; nothing of it was kept")
            s.complete()
            self._finished = True
        except BaseException as exc:
            s.request.cancel.cancel()
            if not self._finished:
                self._finished = True
                s.error = exc if isinstance(exc, Exception) else None
                s.abort()
            raise

    def result(self) -> ChatResult:
        """Finish the turn (consuming the rest of the stream) and return its result.

        Raises what ``chat()`` raises: ``SessionTimeoutError``, ``BackendError``, ``TTSTimeoutError``.
        """
        if not self._started and not self._finished:
            for _ in self:
                pass
        if self._s.result is None:
            raise self._s.error or SessionError("the turn did not complete")
        return self._s.finish_speech()

    def close(self) -> None:
        """Abandon the turn if it has not finished (nothing of it is kept)."""
        if not self._finished:
            self.cancel()
            self._finished = True
            self._s.abort()

    def __enter__(self) -> Turn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._s.release()


class AsyncTurn:
    """One turn of an ``AsyncConversationSession``: ``async with session.stream(text) as turn:
    async for piece in turn: ...``; then ``await turn.result()``."""

    def __init__(self, steps_factory: Callable[[], Any], session: Any):
        self._factory = steps_factory
        self._session = session
        self._s: _TurnSteps | None = None
        self._finished = False
        self._iterating = False
        self._done_callbacks: list[Callable[[ChatResult], None]] = []
        self._cancelled = False

    async def _begin(self) -> _TurnSteps:
        if self._s is None:
            self._s = await self._factory()
            self._s.done_callbacks.extend(self._done_callbacks)
        return self._s

    @property
    def response(self) -> str:
        return "".join(self._s.pieces) if self._s else ""

    def on_done(self, fn: Callable[[ChatResult], None]) -> None:
        if self._s is not None and self._s.result is not None:
            fn(self._s.result)
        elif self._s is not None:
            self._s.done_callbacks.append(fn)
        else:
            self._done_callbacks.append(fn)

    def cancel(self) -> None:
        """Stop the generation; nothing of this turn is kept (``result()`` then raises)."""
        self._cancelled = True
        if self._s is not None:
            self._s.user_cancelled = True
            self._s.request.cancel.cancel()

    async def __aenter__(self) -> AsyncTurn:
        await self._begin()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._s is not None and not self._finished:
            self._finished = True
            self._s.request.cancel.cancel()
            self._s.abort()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._run()

    async def _run(self) -> AsyncIterator[str]:
        if self._iterating or self._finished:
            if self._s is not None and self._s.error is not None:
                raise self._s.error
            return
        self._iterating = True
        s = await self._begin()
        loop = asyncio.get_running_loop()
        try:
            if self._cancelled:
                raise SessionError("the turn was cancelled; nothing of it was kept")
            if s.empty:
                s.complete()
                self._finished = True
                return
            warmup = s.core.warmup
            if warmup is not None and not await warmup.await_done(s.deadline_s()):
                raise s.warmup_timeout_error()
            remaining = s.deadline_s()
            handle = loop.call_later(remaining, s.expire) if remaining is not None else None
            completed = False
            stream = s.core.backend.agenerate(s.request)
            try:
                async for piece in stream:
                    if s.expired.is_set() or self._cancelled:
                        break
                    s.accept(piece)
                    yield piece
                else:
                    completed = not s.request.cancel.cancelled
            except (Exception, GeneratorExit) as exc:
                if isinstance(exc, GeneratorExit):
                    s.request.cancel.cancel()
                    raise
                raise s.map_error(exc) from exc
            finally:
                if handle is not None:
                    handle.cancel()
                if not completed:
                    s.request.cancel.cancel()
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
            if not completed:
                if s.expired.is_set():
                    raise s.timeout_error()
                if s.user_cancelled:
                    self._finished = True
                    s.error = SessionError("the turn was cancelled; nothing of it was kept")
                    s.abort()
                    return
                raise SessionError("the turn was cancelled; nothing of it was kept")
            await self._session._complete(s)
            self._finished = True
        except BaseException as exc:
            s.request.cancel.cancel()
            if not self._finished:
                self._finished = True
                s.error = exc if isinstance(exc, Exception) else None
                s.abort()
            raise

    async def result(self) -> ChatResult:
        """Finish the turn and return its result (speech waited for off the loop)."""
        if not self._iterating and not self._finished:
            async for _ in self:
                pass
        s = self._s
        if s is None or s.result is None:
            raise (s.error if s is not None and s.error else SessionError("the turn did not complete"))
        if s.speaker is not None and not s.speech_finished and not s.empty:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(shared_executor(), s.finish_speech)
        return s.result

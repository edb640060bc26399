"""A turn in progress: ``Turn`` (iterate it) and ``AsyncTurn`` (``async for`` it).

``session.stream(text)`` returns one; ``chat()`` is a thin wrapper that iterates it.  A turn
joins the conversation only when it is complete: then its messages are committed and
journaled, and ``on_done`` callbacks run (the way simonw/llm's ``Response`` records itself).

Three outcomes, each with one meaning (``_conversation.py`` has the rules):

* completed: the user message and the whole reply are kept;
* timed out, ``cancel()``, an error, Ctrl-C or a cancelled task: nothing of the turn is kept;
  the history, the file and the KV cache are as they were;
* ``interrupt()`` (barge-in): the reply is kept cut to what reached the user, marked
  ``"interrupted": true``; if nothing reached the user, nothing is kept (as after ``cancel()``),
  so roles keep alternating for every chat template.  The turn is committed, and journaled,
  before ``interrupt()`` returns its result, whichever thread (or task) streams it.

With speech, "what reached the user" is known only once the audio has played, so a spoken turn
is committed when its speech ends (finished, timed out, or interrupted), still before
``chat()`` returns.  The sync and the async turn share ``_TurnSteps``; they differ only in how
they drive the backend's stream and wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

from .._exceptions import BackendError, SessionError, SessionTimeoutError, TTSTimeoutError
from .._result import ChatResult
from .._runtime import Deadline, schedule, shared_executor
from ..backends import GenerationRequest
from ..speech import HeardReport, Speaker, SpeechTimeout, heard_prefix
from ..stores._record import MessageDict

if TYPE_CHECKING:
    from ._core import SessionCore

__all__ = ["AsyncTurn", "Turn"]

logger = logging.getLogger("conversation_session")

# How long interrupt() waits for a thread (or task) in the middle of a step of the stream: the
# backends stop within one step of a cancellation, so this is only reached by a backend deaf to
# it or an on_token that blocks; interrupt() then commits what was heard from its own thread.
_INTERRUPT_WAIT_S = 5.0


class _TurnSteps:
    """The turn's logic, shared by the sync and the async turn; no waiting happens here."""

    def __init__(self, core: SessionCore, text: str, on_token: Callable[[str], None] | None,
                 release: Callable[[], None], *, retry: bool = False):
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
        self.interrupt_req: tuple[str | int | None, float | None] | None = None
        self.text_done = False          # the backend's stream ended by itself
        self.aborted = False
        self.finished = False           # the driver is done: committed, dropped, or left to its speech
        self.backend_stream: Any = None  # the backend's generator, for an interrupt from on_token
        self._commit_lock = threading.Lock()
        self.done_callbacks: list[Callable[[ChatResult], None]] = []
        self.empty = not retry and not text.strip()
        self.plan = core.conversation.plan_retry() if retry else None if self.empty else core.conversation.plan(text)
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

    @property
    def speaking(self) -> bool:
        return self.speaker is not None and not self.empty

    # -- the end: one of complete / interrupted / abort, exactly once ----------------------
    def complete(self, *, heard: str | None = None, silence_s: float | None = None) -> ChatResult:
        """Commit the turn (the whole reply, or with ``heard`` the part that reached the user);
        it is journaled before this returns."""
        with self._commit_lock:
            if self.result is not None:
                return self.result
            core = self.core
            total = time.perf_counter() - self.t0
            usage = self.request.usage
            full = "".join(self.pieces)
            interrupted = heard is not None
            if self.empty or self.plan is None or (interrupted and not (heard or "").strip()):
                if not self.empty:
                    logger.info("interrupted before anything reached the user: nothing of the turn is kept")
                    if self.plan is not None:
                        core.after_abort(self.plan.prompt[:-1])
                else:
                    logger.info("empty message: nothing sent, no turn added")
                result = ChatResult(response="", turn=core.conversation.turns, ttft_s=self.ttft, total_s=total,
                                    saved=False, finish_reason="interrupted" if interrupted else "empty",
                                    interrupted=interrupted, heard_fraction=0.0 if interrupted else None,
                                    interrupt_to_silence_s=silence_s)
            else:
                content = full if heard is None else heard
                reply: MessageDict = {"role": "assistant", "content": content}
                if interrupted:
                    reply["interrupted"] = True
                    logger.info("turn interrupted: %d of %d characters reached the user and are kept",
                                len(content), len(full))
                saved = core.commit(self.plan, reply)
                core.conversation.figures.add(usage)
                if interrupted:
                    core.interruptions += 1
                result = ChatResult(
                    response=content,
                    turn=core.conversation.turns if core.enable_cache else 1,
                    ttft_s=self.ttft, total_s=total, prompt_tokens=usage.prompt_tokens,
                    cached_tokens=usage.cached_tokens, completion_tokens=usage.completion_tokens,
                    saved=saved, durability=core.saved_level if saved else None,
                    finish_reason="interrupted" if interrupted else usage.finish_reason,
                    trimmed_turns=self.plan.trimmed_turns,
                    tts_first_audio_s=self.speaker.first_audio_s if self.speaker is not None else None,
                    interrupted=interrupted,
                    heard_fraction=(len(content) / len(full) if full else 1.0) if interrupted else None,
                    interrupt_to_silence_s=silence_s,
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
        """Nothing of the turn is kept; the cache keeps the completed conversation.  Idempotent."""
        with self._commit_lock:
            if self.result is not None or self.aborted:
                return
            self.aborted = True
            if self.speaker is not None:
                self.speaker.cancel()
            if self.plan is not None:
                self.core.after_abort(self.plan.prompt[:-1])
        self.release()

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def stream_ended(self, completed: bool) -> str:
        """What the end of the backend's stream means, for either driver.

        Returns ``"interrupt"`` (commit what was heard), ``"commit"`` (the whole reply),
        ``"speak"`` (commit when the speech ends) or ``"dropped"`` (``cancel()``: nothing kept).
        Raises ``SessionTimeoutError`` for the deadline, ``SessionError`` for a cancellation
        nobody asked this turn for.
        """
        if self.interrupt_req is not None and not self.expired.is_set():
            return "interrupt"
        if not completed:
            if self.expired.is_set():
                raise self.timeout_error()
            self.error = SessionError("the turn was cancelled; nothing of it was kept")
            self.abort()
            if self.user_cancelled:
                return "dropped"
            raise self.error
        self.text_done = True
        return "speak" if self.speaking else "commit"

    def heard(self) -> tuple[str, float | None]:
        """What reached the user, for an interrupt: (text, seconds from interrupt to silence)."""
        text = "".join(self.pieces)
        heard, heard_ms = self.interrupt_req or (None, None)
        silence: float | None = None
        report: HeardReport | None = None
        if self.speaking and self.speaker is not None:
            t0 = time.perf_counter()
            report = self.speaker.interrupt()
            silence = report.interrupt_to_silence_s or (time.perf_counter() - t0)
        if isinstance(heard, str):
            n = _shared(heard, text)
            if n < len(heard):
                logger.info("heard= is not a prefix of the reply; keeping the %d characters they share", n)
            return text[:n], silence
        if isinstance(heard, int) and not isinstance(heard, bool):
            return text[:max(heard, 0)], silence
        if heard_ms is not None:
            # A remote device's playback position: the sentence durations the speaker measured
            # (if it spoke), else estimated at espeak-ng's rate; cut at a word's end.
            durations = self.speaker.durations() if self.speaker is not None else []
            return heard_prefix(text, heard_ms, durations).text, silence
        if report is not None:
            return _prefix_of(report.text, text), silence
        return text, silence  # no speech: what was streamed out is what was presented

    def finish_speech(self) -> ChatResult:
        """Wait for the reply to be spoken (at most ``tts_wait_timeout``), then commit it; an
        interrupt meanwhile commits what was heard.  Ctrl-C while speaking is a barge-in."""
        speaker = self.speaker
        assert speaker is not None
        timeout = self.core.tts_wait_timeout
        try:
            speaker.finish(timeout)
        except SpeechTimeout as exc:
            result = self.complete()
            raise TTSTimeoutError(
                f"speaking the reply took longer than tts_wait_timeout={timeout} s, so it "
                "was stopped; the turn itself is complete and saved", result=result, timeout=timeout,
            ) from exc
        except BaseException:
            self.interrupt_req = self.interrupt_req or (None, None)
            heard, silence = self.heard()
            self.complete(heard=heard, silence_s=silence)
            raise
        if self.interrupt_req is not None and self.result is None:
            heard, silence = self.heard()
            return self.complete(heard=heard, silence_s=silence)
        return self.complete()


def _shared(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prefix_of(heard: str, text: str) -> str:
    return text[:_shared(heard, text)]


class Turn:
    """One turn of a ``ConversationSession``, streamed in the caller's thread.

    Iterate it for the reply's pieces; ``result()`` finishes it and returns the ``ChatResult``;
    ``cancel()`` stops it and keeps nothing; ``interrupt()`` stops it, keeps what the user heard
    and returns the result.  Use it as a context manager (or iterate it to the end) so the
    session is free for the next turn: leaving the loop early leaves the turn open, so that
    ``interrupt()`` or ``result()`` can still end it.
    """

    def __init__(self, steps: _TurnSteps):
        self._s = steps
        self._started = False
        self._iter_thread: int | None = None
        # The generator that runs the turn; it refers to the steps, never to this Turn, so
        # dropping the Turn closes it at once (and so ends the turn and frees the session).
        self._gen: Generator[str, None, None] | None = None
        # Held while the generator runs: one thread at a time steps it, so an interrupt() from
        # another thread never closes it under that thread's feet.  Re-entrant for on_token.
        self._step = threading.RLock()

    @property
    def response(self) -> str:
        """The text so far."""
        return "".join(self._s.pieces)

    def on_done(self, fn: Callable[[ChatResult], None]) -> None:
        """Call ``fn(result)`` when the turn is committed (at once if it has been)."""
        if self._s.result is not None:
            fn(self._s.result)
        else:
            self._s.done_callbacks.append(fn)

    def cancel(self) -> None:
        """Stop the generation; nothing of this turn is kept.  Safe from any thread: the
        iteration then ends quietly and ``result()`` raises ``SessionError``."""
        s = self._s
        s.user_cancelled = True
        s.request.cancel.cancel()
        if s.result is not None:
            return
        if not self._started or s.text_done:
            s.finished = True
            s.error = SessionError("the turn was cancelled; nothing of it was kept")
            s.abort()
        elif self._step.acquire(blocking=False):
            try:
                if not _running(self._gen):
                    # Between two steps (the loop left early, or is busy with a piece): end it
                    # now; the next step of the loop, if any, ends quietly.
                    s.error = SessionError("the turn was cancelled; nothing of it was kept")
                    if self._gen is not None:
                        self._gen.close()
                    if not s.finished:  # closed before its first step
                        s.finished = True
                        s.abort()
            finally:
                self._step.release()

    def interrupt(self, heard: str | int | None = None, *, heard_ms: float | None = None) -> ChatResult:
        """Barge-in: stop generation and speech at once, keep what reached the user, and return
        the turn's result (``result()`` returns it too).

        Args:
            heard: what the caller presented, for a remote device that knows its playback: the
                text (a prefix of the reply) or a number of characters.  Default: the audio
                played (with speech), else the text streamed so far.
            heard_ms: milliseconds of the reply's audio played (instead of ``heard``).

        The assistant message is saved cut to that, marked ``"interrupted": true``, and journaled
        before this returns; nothing is kept if nothing was heard.  Safe from any thread, inside
        or outside ``with``: a loop suspended between pieces is closed here; a thread in the
        middle of a step is waited for (it stops within one step of the cancellation, at most
        ``_INTERRUPT_WAIT_S``) and its commit returned.  After the turn was committed it changes
        nothing.

        Raises:
            SessionError (or the turn's own error): the turn had already ended without a result
                (cancelled, timed out, failed), as ``result()`` would.
        """
        s = self._s
        if s.result is None and not s.aborted:
            s.interrupt_req = (heard, heard_ms)
            s.request.cancel.cancel()
            if s.text_done or not self._started:
                # Text complete (speech still playing) or never iterated: decide now.
                self._commit_heard(started=self._started)
            else:
                self._stop_stream()
        return self._outcome()

    def _stop_stream(self) -> None:
        """End a stream still open after ``interrupt()`` and commit what was heard."""
        s = self._s
        if not self._step.acquire(timeout=_INTERRUPT_WAIT_S):
            # Another thread is in a step that does not end (a backend deaf to cancellation, an
            # on_token that blocks): commit from here; that thread's stream ends quietly.
            logger.warning("the thread streaming the turn did not stop within %.1f s of the interrupt; "
                           "committing what was heard from here", _INTERRUPT_WAIT_S)
            self._commit_heard(started=True)
            return
        try:
            gen = self._gen
            if _running(gen):
                # Called by on_token, in this thread's own step: the backend's stream is
                # suspended below us; close it first, so nothing generates after the commit.
                close = getattr(s.backend_stream, "close", None)
                if close is not None:
                    close()
                self._commit_heard(started=True)
            elif gen is not None:
                gen.close()  # suspended between pieces: its cleanup commits what was heard
        finally:
            self._step.release()
        if s.result is None and not s.finished:
            self._commit_heard(started=True)  # closed before its first step: nothing was heard

    def _commit_heard(self, *, started: bool) -> None:
        s = self._s
        heard, silence = s.heard() if started else ("", None)
        s.finished = True
        s.complete(heard=heard, silence_s=silence)

    def _outcome(self) -> ChatResult:
        s = self._s
        if s.result is None:
            raise s.error or SessionError("the turn did not complete")
        return s.result

    def __iter__(self) -> Iterator[str]:
        s = self._s
        if self._started or s.finished:
            if s.error is not None:
                raise s.error
            return
        with self._step:
            self._started = True
            self._iter_thread = threading.get_ident()
            self._gen = _run(s)
        yield from self._pieces()

    def _pieces(self) -> Iterator[str]:
        """Step the generator under the lock.  Leaving this loop early leaves the generator
        suspended (not closed): the turn stays open for ``interrupt()`` or ``result()``."""
        gen = self._gen
        assert gen is not None
        while True:
            with self._step:
                try:
                    piece = next(gen)
                except StopIteration:
                    return
            yield piece

    def result(self) -> ChatResult:
        """Finish the turn (the rest of the stream, and its speech) and return its result.

        Raises what ``chat()`` raises: ``SessionTimeoutError``, ``BackendError``, ``TTSTimeoutError``.
        """
        s = self._s
        if not self._started and not s.finished:
            for _ in self:
                pass
        elif (not s.finished and not s.text_done and self._iter_thread == threading.get_ident()
              and not _running(self._gen)):
            for _ in self._pieces():  # the loop was left early: the rest of the stream
                pass
        if s.result is None and s.text_done and s.speaking:
            s.finished = True
            return s.finish_speech()
        return self._outcome()

    def close(self) -> None:
        """End the turn: a reply still being spoken is committed with what was heard so far; an
        unfinished generation is abandoned (nothing kept)."""
        s = self._s
        if s.result is not None or s.aborted:
            return
        if s.text_done and s.speaking:
            self.interrupt()
            return
        if not s.finished:
            self.cancel()
            s.finished = True
            s.abort()

    def __enter__(self) -> Turn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            gen = self._gen
            if gen is not None and not _running(gen):
                gen.close()  # a turn left open and dropped: ended as cancel() would
            self._s.release()


def _running(gen: Generator[str, None, None] | None) -> bool:
    return gen is not None and inspect.getgeneratorstate(gen) == inspect.GEN_RUNNING


def _run(s: _TurnSteps) -> Generator[str, None, None]:
    """Run a sync turn: stream the backend's pieces, then commit (or drop) the turn."""
    try:
        if s.empty:
            s.complete()
            s.finished = True
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
            stream = s.backend_stream = s.core.backend.generate(s.request)
            try:
                for piece in stream:
                    if s.expired.is_set() or s.interrupt_req is not None:
                        break
                    s.accept(piece)
                    if s.result is not None:
                        break  # on_token interrupted the turn, which is committed: stop here
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
            if s.interrupt_req is None:
                raise s.map_error(exc) from exc
        finally:
            if watchdog is not None:
                watchdog.cancel()
        _end(s, completed)
    except BaseException as exc:
        s.request.cancel.cancel()
        if not s.finished:
            s.finished = True
            if s.interrupt_req is not None and not isinstance(exc, Exception):
                # interrupt() then the loop was closed (interrupt(), Ctrl-C): still a barge-in.
                heard, silence = s.heard()
                s.complete(heard=heard, silence_s=silence)
            else:
                s.error = exc if isinstance(exc, Exception) else s.error
                s.abort()
        raise


def _end(s: _TurnSteps, completed: bool) -> None:
    if s.result is not None:
        s.finished = True  # committed meanwhile by interrupt()
        return
    outcome = s.stream_ended(completed)
    if outcome == "interrupt":
        heard, silence = s.heard()
        s.complete(heard=heard, silence_s=silence)
    elif outcome == "commit":
        s.complete()
    s.finished = outcome != "speak"


class AsyncTurn:
    """One turn of an ``AsyncConversationSession``: ``async with session.stream(text) as turn:
    async for piece in turn: ...``; then ``await turn.result()``."""

    def __init__(self, steps_factory: Callable[[], Any], session: Any):
        self._factory = steps_factory
        self._session = session
        self._s: _TurnSteps | None = None
        self._iterating = False
        self._iter_task: asyncio.Task[Any] | None = None
        self._done_callbacks: list[Callable[[ChatResult], None]] = []
        self._cancelled = False
        # As in Turn: the generator refers to the steps, not to this object, and one task at a
        # time steps it.
        self._agen: AsyncGenerator[str, None] | None = None
        self._step = asyncio.Lock()
        self._begun: asyncio.Event | None = None  # set once a task has tried to take the session

    async def _begin(self) -> _TurnSteps:
        if self._s is not None:
            return self._s
        if self._begun is not None:
            # Another task (the iterating one, or interrupt()) is taking the session for this
            # turn: taking it twice would wait for ourselves.
            await self._begun.wait()
            if self._s is None:
                raise SessionError("the turn could not start")
            return self._s
        begun = self._begun = asyncio.Event()
        try:
            s = self._s = await self._factory()
        except BaseException:
            self._begun = None  # a later call tries again
            raise
        finally:
            begun.set()
        s.done_callbacks.extend(self._done_callbacks)
        if self._cancelled:
            s.user_cancelled = True
            s.request.cancel.cancel()
        return s

    @property
    def _finished(self) -> bool:
        return self._s is not None and self._s.finished

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

    async def interrupt(self, heard: str | int | None = None, *, heard_ms: float | None = None) -> ChatResult:
        """Barge-in (see ``Turn.interrupt``): the turn is committed, and its result returned,
        before this returns; another task streaming the turn is waited for (bounded)."""
        s = self._s if self._s is not None else await self._begin()
        if s.result is None and not s.aborted:
            s.interrupt_req = (heard, heard_ms)
            s.request.cancel.cancel()
            if s.text_done or self._agen is None:
                # Text complete (speech still playing) or never iterated: decide now.
                await self._commit_heard(s, started=self._agen is not None)
            else:
                await self._close_stream(s, wait=True)
                if s.result is None and not s.finished:
                    await self._commit_heard(s, started=True)
        if s.result is None:
            raise s.error or SessionError("the turn did not complete")
        return s.result

    async def _commit_heard(self, s: _TurnSteps, *, started: bool) -> None:
        heard, silence = await self._session._off_loop(s.heard) if started else ("", None)
        s.finished = True
        await self._session._complete(s, heard=heard, silence_s=silence)

    async def _close_stream(self, s: _TurnSteps, *, wait: bool) -> None:
        """Close the generator if it is suspended; its cleanup commits (after an interrupt) or
        drops the turn.  With ``wait``, a task in the middle of a step is waited for, bounded."""
        agen = self._agen
        if agen is None:
            return
        if not wait and self._step.locked():
            return
        try:
            await asyncio.wait_for(self._step.acquire(), _INTERRUPT_WAIT_S)
        except asyncio.TimeoutError:
            logger.warning("the task streaming the turn did not stop within %.1f s of the interrupt; "
                           "committing what was heard from here", _INTERRUPT_WAIT_S)
            return
        try:
            await agen.aclose()
        finally:
            self._step.release()

    async def __aenter__(self) -> AsyncTurn:
        await self._begin()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        s = self._s
        if s is None or s.result is not None or s.aborted:
            return
        if (s.text_done and s.speaking) or s.interrupt_req is not None:
            heard, heard_ms = s.interrupt_req or (None, None)
            await self.interrupt(heard, heard_ms=heard_ms)
            return
        if not s.finished:
            s.request.cancel.cancel()
            await self._close_stream(s, wait=False)
            s.finished = True
            s.abort()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[str]:
        if self._iterating or self._finished:
            if self._s is not None and self._s.error is not None:
                raise self._s.error
            return
        self._iterating = True
        self._iter_task = asyncio.current_task()
        s = await self._begin()
        self._agen = _arun(s, self._session)
        async for piece in self._stepped():
            yield piece

    async def _stepped(self) -> AsyncIterator[str]:
        """Step the generator under the lock (see ``Turn._pieces``)."""
        agen = self._agen
        assert agen is not None
        while True:
            async with self._step:
                try:
                    piece = await agen.__anext__()
                except StopAsyncIteration:
                    return
            yield piece

    async def result(self) -> ChatResult:
        """Finish the turn and return its result (speech waited for off the loop)."""
        s = self._s
        if not self._iterating and not self._finished:
            async for _ in self:
                pass
        elif (s is not None and not s.finished and not s.text_done and self._agen is not None
              and self._iter_task is asyncio.current_task()):
            async for _ in self._stepped():  # the loop was left early: the rest of the stream
                pass
        s = self._s
        if s is not None and s.result is None and s.text_done and s.speaking:
            s.finished = True
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(shared_executor(), s.finish_speech)
        if s is None or s.result is None:
            raise (s.error if s is not None and s.error else SessionError("the turn did not complete"))
        return s.result


async def _arun(s: _TurnSteps, session: Any) -> AsyncGenerator[str, None]:
    """Run an async turn (see ``_run``); ``session`` commits it without blocking the loop."""
    loop = asyncio.get_running_loop()
    try:
        if s.empty:
            s.complete()
            s.finished = True
            return
        if s.user_cancelled:
            raise SessionError("the turn was cancelled; nothing of it was kept")
        warmup = s.core.warmup
        if warmup is not None and not await warmup.await_done(s.deadline_s()):
            raise s.warmup_timeout_error()
        remaining = s.deadline_s()
        handle = loop.call_later(remaining, s.expire) if remaining is not None else None
        completed = False
        stream = s.core.backend.agenerate(s.request)
        try:
            async for piece in stream:
                if s.expired.is_set() or s.user_cancelled or s.interrupt_req is not None:
                    break
                s.accept(piece)
                yield piece
            else:
                completed = not s.request.cancel.cancelled
        except (Exception, GeneratorExit) as exc:
            if isinstance(exc, GeneratorExit):
                s.request.cancel.cancel()
                raise
            if s.interrupt_req is None:
                raise s.map_error(exc) from exc
        finally:
            if handle is not None:
                handle.cancel()
            if not completed:
                s.request.cancel.cancel()
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
        if s.result is not None:
            s.finished = True  # committed meanwhile by interrupt()
            return
        outcome = s.stream_ended(completed)
        if outcome == "interrupt":
            heard, silence = await session._off_loop(s.heard)
            await session._complete(s, heard=heard, silence_s=silence)
        elif outcome == "commit":
            await session._complete(s)
        s.finished = outcome != "speak"
    except BaseException as exc:
        s.request.cancel.cancel()
        if not s.finished:
            s.finished = True
            if s.interrupt_req is not None and not isinstance(exc, Exception) and s.result is None:
                # interrupt() then the generator was closed (interrupt(), a cancelled task):
                # still a barge-in.
                heard, silence = await session._off_loop(s.heard)
                await session._complete(s, heard=heard, silence_s=silence)
            else:
                s.error = exc if isinstance(exc, Exception) else s.error
                s.abort()
        raise

"""ConversationSession: turn orchestration, timeouts, trimming, and persistence hooks.

A turn joins the history only once it is complete: the reply is generated from
``history + [user message]``, and only when the backend has finished are both messages added
(in one step) and journaled.  A timeout, a backend error or Ctrl-C therefore leaves memory,
file and KV cache exactly as they were after the previous turn.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._exceptions import BackendError, SessionError, SessionLockedError, SessionTimeoutError, TTSTimeoutError
from ._format import MessageDict, SessionRecord, count_turns, is_utf8_text
from ._result import ChatResult
from ._store import HistoryStore, SessionWriter, validate_session_id
from .backends import Backend, CancelToken, GenerationRequest, create_backend, estimate_tokens
from .backends._kvstate import enforce_cap
from .speech import Speaker, SpeechTimeout, create_speaker

__all__ = ["SESSIONS_DIR_ENV", "ConversationSession"]

logger = logging.getLogger("conversation_session")

SESSIONS_DIR_ENV = "CONVERSATION_SESSIONS_DIR"
# Background work (a warm-up, a KV-cache save) stops within one step of being cancelled or
# finishes soon; this only guards against a stuck backend.
_JOIN_TIMEOUT_S = 15.0
# A KV-cache save waits this long for the next turn before it starts: scripted, back-to-back
# turns then skip the saves they would only wait for, and a person typing never notices.
_KV_SAVE_DELAY_S = 0.5


def default_sessions_dir() -> str:
    return os.environ.get(SESSIONS_DIR_ENV) or "sessions"


@contextlib.contextmanager
def _closing(stream: Iterator[str]) -> Generator[Iterator[str], None, None]:
    """Close a backend's stream however the loop ends (a generator's ``finally`` then runs)."""
    try:
        yield stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _speaking(speaker: Speaker, on_token: Callable[[str], None] | None) -> Callable[[str], None]:
    def feed(piece: str) -> None:
        speaker.feed(piece)
        if on_token is not None:
            on_token(piece)

    return feed


def _STOP() -> None:
    """Sentinel job: ends a _LatestJob's thread."""


class _LatestJob:
    """Runs submitted jobs in one background thread, each after ``delay`` seconds; a job that
    has not started when a newer one arrives is dropped for it."""

    def __init__(self, name: str, delay: float = 0.0):
        self._cond = threading.Condition()
        self._job: Callable[[], None] | None = None
        self._busy = False
        self._hurry = False
        self._delay = delay
        self._name = name
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._job = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None:
                    self._cond.wait()
                job = self._job
                deadline = time.monotonic() + self._delay
                # Wait out the delay unless flushed; a newer job restarts it.
                while not self._hurry and (wait := deadline - time.monotonic()) > 0:
                    self._cond.wait(wait)
                    if self._job is not job:
                        job, deadline = self._job, time.monotonic() + self._delay
                if job is _STOP:
                    self._job = None
                    self._cond.notify_all()
                    return
                self._job, self._busy = None, True
            try:
                job()
            except Exception:  # a failed background job must not kill the thread
                logger.exception("background %s failed", self._name)
            finally:
                del job  # the closure holds the session: do not keep it alive from here
                with self._cond:
                    self._busy = False
                    if self._job is None:
                        self._hurry = False
                    self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """End the thread once any pending job has run (``flush`` first to wait for it)."""
        with self._cond:
            thread = self._thread
            if thread is None or self._job is not None:
                return  # never started, or still has work (a flush that timed out): leave it
            self._job, self._hurry = _STOP, True
            self._cond.notify_all()
        thread.join(timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Run any pending job now and wait for it; False on timeout."""
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._job is None and not self._busy, timeout)
            self._hurry = False
            return done


class _Warmup:
    """A background ``Backend.warm`` call for a just-restored conversation."""

    def __init__(self, backend: Backend, messages: list[MessageDict],
                 restore: Callable[[], dict[str, Any]] | None = None):
        self.cancel = CancelToken()
        self.stats: dict[str, Any] = {"warmup": "running", "warmup_messages": len(messages)}
        self._t0 = time.perf_counter()

        def run() -> None:
            try:
                if restore is not None:
                    self.stats.update(restore())
                figures = backend.warm(messages, self.cancel) if backend.can_warm else {}
                self.stats.update(figures or {})
                self.stats["warmup"] = "cancelled" if self.cancel.cancelled else "done"
            except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs speed
                self.stats["warmup"] = "failed"
                self.stats["warmup_error"] = str(exc)
                logger.info("warm-up of the restored conversation failed: %s", exc)
            self.stats["warmup_s"] = round(time.perf_counter() - self._t0, 4)

        self.thread = threading.Thread(target=run, name="warmup", daemon=True)
        self.thread.start()

    def wait(self, timeout: float | None) -> bool:
        """Let the warm-up finish (it is work the next turn would do anyway); False if it has not
        within ``timeout`` (it goes on)."""
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def stop(self) -> None:
        self.cancel.cancel()
        self.thread.join(_JOIN_TIMEOUT_S)


class ConversationSession:
    """A conversation that saves every completed turn and survives timeouts and restarts.

    Args:
        llm_model: model to use: a ``.gguf`` path for ``llama-cpp`` (``None``: the bundled
            SmolLM2-135M-Instruct), a model name for ``ollama`` (``None``: ``qwen2.5:3b``).
        backend: ``"llama-cpp"`` (in-process), ``"ollama"``, ``"openai"``, or a ``Backend``.
        base_url: server URL for the server backends.
        enable_cache: keep the history (and the KV cache) between turns and save it; False is
            stateless: each ``chat()`` sends only its own message and nothing is saved.
        timeout: seconds a whole turn may take (``None``: no limit).
        tts_wait_timeout: seconds to wait for speech to finish once the text is complete.
        tts: speak replies as they stream: ``"espeak"`` (espeak-ng) or a ``SpeechEngine``;
            ``None`` is silent.  A missing espeak-ng logs how to install it and stays silent.
        sessions_dir: where session files live (default ``$CONVERSATION_SESSIONS_DIR`` or
            ``sessions``).
        system_prompt: sent first in every prompt; never trimmed; not part of the history.
        max_tokens: reply length limit in tokens.
        temperature: sampling temperature (0 = greedy).
        backend_options: extra keyword arguments for the backend (``n_ctx``, ``num_ctx``, ...).
        persist_kv_cache: with a backend that can (``llama-cpp``), keep the KV cache of the
            completed conversation in ``<session_id>.kv`` so a restart resumes without
            recomputing it.
        kv_cache_max_bytes: total size cap of the ``.kv`` files in ``sessions_dir`` (least
            recently used are deleted first).
        tts_output_dir: also write the speech as WAV files into this folder.
        tts_options: ``rate`` (words per minute), ``voice``, ``playback`` for the speech engine.

    Raises:
        BackendError: the backend cannot be set up (model file missing, ...).
        SessionError: the sessions folder cannot be created.
    """

    def __init__(
        self,
        llm_model: str | os.PathLike[str] | None = None,
        *,
        backend: str | Backend = "llama-cpp",
        base_url: str | None = None,
        enable_cache: bool = True,
        timeout: float | None = 60.0,
        tts_wait_timeout: float | None = 30.0,
        tts: Any = None,
        sessions_dir: str | os.PathLike[str] | None = None,
        system_prompt: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.7,
        backend_options: dict[str, Any] | None = None,
        persist_kv_cache: bool = True,
        kv_cache_max_bytes: int = 1 << 30,
        tts_output_dir: str | os.PathLike[str] | None = None,
        tts_options: dict[str, Any] | None = None,
    ):
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, not {timeout!r}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {max_tokens!r}")
        self.enable_cache = enable_cache
        self.timeout = timeout
        self.tts_wait_timeout = tts_wait_timeout
        self.tts = tts
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.temperature = temperature
        if isinstance(backend, Backend):
            self.backend = backend
        else:
            self.backend = create_backend(
                backend, None if llm_model is None else str(llm_model), base_url=base_url,
                **(backend_options or {}),
            )
        self.llm_model = self.backend.model_name
        self.store = HistoryStore(sessions_dir if sessions_dir is not None else default_sessions_dir())
        self._lock = threading.RLock()
        self._messages: list[MessageDict] = []
        self._trim_start = 0          # history[_trim_start:] is what the prompt carries
        self._closed = False
        self._last: ChatResult | None = None
        self._total_prompt = 0
        self._total_cached = 0
        self._writer: SessionWriter | None = None
        self._warmup: _Warmup | None = None
        self._read_only: SessionRecord | None = None  # a session opened with read_only=True
        self.persist_kv_cache = bool(persist_kv_cache and enable_cache and self.backend.can_persist_state)
        self.kv_cache_max_bytes = kv_cache_max_bytes
        self._kv_saver = _LatestJob("kv-cache-save", delay=_KV_SAVE_DELAY_S)
        self._kv_stats: dict[str, Any] = {}
        self._turn_seq = 0            # bumped when a turn starts: older KV saves are then stale
        self._stateless_id = f"session_{int(time.time())}"
        self._speaker = create_speaker(tts, output_dir=tts_output_dir, **(tts_options or {}))
        try:
            if enable_cache:
                self._writer = self.store.create(self.llm_model)
                self._writer.bind(self._messages)
        except BaseException:
            if self._speaker is not None:
                self._speaker.close()
            if not isinstance(backend, Backend):  # ours to release; a caller's stays theirs
                self.backend.close()
            raise
        logger.debug("session %s started (backend %s, model %s)", self.session_id, self.backend.name,
                     self.llm_model)

    # -- context manager -----------------------------------------------------------------
    def __enter__(self) -> ConversationSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush the session file, release the session lock and the backend. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop_warmup()
            self._flush_kv_save()
            self._kv_saver.stop(_JOIN_TIMEOUT_S)
            try:
                if self._speaker is not None:
                    self._speaker.close()
                if self._writer is not None:
                    self._writer.close()
            finally:
                self.backend.close()

    # -- properties ----------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self._writer.session_id if self._writer is not None else self._stateless_id

    @property
    def history(self) -> list[MessageDict]:
        """A copy of the kept conversation (completed turns only)."""
        return [dict(m) for m in self._messages]  # type: ignore[misc]

    @property
    def turns(self) -> int:
        return count_turns(self._messages)

    @property
    def path(self) -> Path:
        return self.store.snapshot_path(self.session_id)

    # -- the turn ------------------------------------------------------------------------
    def chat(self, text: str, *, on_token: Callable[[str], None] | None = None) -> ChatResult:
        """Send ``text`` and return the completed reply; the turn is saved before returning.

        Args:
            text: the user's message.
            on_token: called with each streamed piece of the reply, as it arrives.

        Raises:
            SessionTimeoutError: the turn took longer than ``timeout``; nothing of it is kept,
                the session stays usable and its KV cache valid.
            TTSTimeoutError: the reply is complete and saved (``.result``), but speaking it took
                longer than ``tts_wait_timeout``; the speech was stopped.
            BackendError: the backend failed (server down, model missing, ...).
            ValueError: ``text`` is empty.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty")
        if not is_utf8_text(text):
            raise ValueError("the message contains a lone surrogate character and cannot be saved as UTF-8")
        with self._lock:
            if self._closed:
                raise SessionError("the session is closed; start a new ConversationSession")
            if self._read_only is not None:
                raise SessionError(
                    f"session {self._read_only.session_id} was opened read-only; call clear_history() to start a new "
                    "session, or load it without read_only once no other process has it open"
                )
            user: MessageDict = {"role": "user", "content": text}
            t0 = time.perf_counter()
            if self._warmup is not None and not self._warmup.wait(self.timeout):
                # Its work is the work this turn would do: let it go on for the next attempt.
                raise SessionTimeoutError(
                    f"the restored conversation was still being loaded into the model after timeout="
                    f"{self.timeout} s (the warm-up after load_history()); nothing was lost, ask again "
                    "in a moment", timeout=self.timeout,
                )
            prompt, trimmed = self._prompt_for(user)
            request = GenerationRequest(messages=prompt, max_tokens=self.max_tokens,
                                        temperature=self.temperature)
            speaker = self._speaker
            if speaker is not None:
                speaker.start_turn(t0, f"{self.session_id}_turn{self.turns + 1:04d}_{self._turn_seq}")
                on_token = _speaking(speaker, on_token)
            self._turn_seq += 1  # a KV-cache save still pending for the previous turn is now stale
            try:
                pieces, ttft = self._generate(request, t0, on_token)
            except BaseException:
                if speaker is not None:
                    speaker.cancel()
                # The cache still holds the completed conversation (plus the abandoned turn's
                # tokens, which a save drops): keep it on disk too, if a save was skipped.
                if self.persist_kv_cache and self._messages:
                    self._schedule_kv_save(prompt[:-1])
                raise
            total = time.perf_counter() - t0
            reply: MessageDict = {"role": "assistant", "content": "".join(pieces)}
            saved = False
            if self.enable_cache:
                # One extend: a background snapshot never sees half a turn.
                self._messages.extend((user, reply))
                assert self._writer is not None
                t1 = time.perf_counter()
                saved = self._writer.commit()
                logger.debug("turn %d committed in %.3f ms", self.turns, (time.perf_counter() - t1) * 1000)
                if self.persist_kv_cache:
                    self._schedule_kv_save([*prompt, reply])
            usage = request.usage
            if usage.prompt_tokens and usage.cached_tokens is not None:  # a ratio of known turns only
                self._total_prompt += usage.prompt_tokens
                self._total_cached += usage.cached_tokens
            self._last = ChatResult(
                response=reply["content"],
                turn=self.turns if self.enable_cache else 1,
                ttft_s=ttft,
                total_s=total,
                prompt_tokens=usage.prompt_tokens,
                cached_tokens=usage.cached_tokens,
                completion_tokens=usage.completion_tokens,
                saved=saved,
                finish_reason=usage.finish_reason,
                trimmed_turns=trimmed,
            )
            if speaker is not None:
                self._finish_speech(speaker)
            return self._last

    def _finish_speech(self, speaker: Speaker) -> None:
        """Wait for the reply to be spoken, at most ``tts_wait_timeout``; the turn is already saved."""
        assert self._last is not None
        try:
            report = speaker.finish(self.tts_wait_timeout)
        except SpeechTimeout as exc:
            self._last = replace(self._last, tts_first_audio_s=speaker.first_audio_s)
            raise TTSTimeoutError(
                f"speaking the reply took longer than tts_wait_timeout={self.tts_wait_timeout} s, so it "
                "was stopped; the turn itself is complete and saved",
                result=self._last, timeout=self.tts_wait_timeout,
            ) from exc
        except BaseException:
            speaker.cancel()
            raise
        self._last = replace(self._last, tts_first_audio_s=report.first_audio_s)

    def _generate(self, request: GenerationRequest, t0: float,
                  on_token: Callable[[str], None] | None) -> tuple[list[str], float | None]:
        """Run the backend in this thread, with a sleeping watchdog for the deadline.

        On expiry the watchdog cancels the request, which stops the model at its next step or
        shuts the socket down, so the loop ends and no computation outlives the turn.  Ctrl-C
        arrives here as KeyboardInterrupt between two steps and closes the stream the same way.

        Generating here rather than in a worker thread matters on a small machine: llama.cpp's
        threads wait for each other at every step, and a third thread waking for every token
        (to hand it over) delays them all.
        """
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            request.cancel.cancel()

        watchdog = None
        if self.timeout is not None:
            watchdog = threading.Timer(max(t0 + self.timeout - time.perf_counter(), 0.0), expire)
            watchdog.daemon = True
            watchdog.start()
        pieces: list[str] = []
        ttft: float | None = None
        completed = False
        try:
            with _closing(self.backend.generate(request)) as stream:
                for piece in stream:
                    if expired.is_set():
                        break
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    pieces.append(piece)
                    if on_token is not None:
                        on_token(piece)
                else:
                    # The stream ended before anything cancelled it: the reply is whole, and a
                    # deadline that fires from now on cuts nothing.
                    completed = not request.cancel.cancelled
        except SessionError:
            if not expired.is_set():
                raise
        except Exception as exc:
            if not expired.is_set():
                raise BackendError(f"{self.backend.name} backend failed: {exc!r}") from exc
        except BaseException:
            request.cancel.cancel()
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if expired.is_set() and not completed:
            partial = "".join(pieces)
            logger.info("turn timed out after %.1f s; %d characters discarded, history kept",
                        self.timeout, len(partial))
            raise SessionTimeoutError(
                f"the reply took longer than timeout={self.timeout} s; the conversation so far "
                "is kept and you can continue",
                partial_response=partial, timeout=self.timeout,
            )
        return pieces, ttft

    # -- context window ------------------------------------------------------------------
    def _prompt_for(self, user: MessageDict) -> tuple[list[MessageDict], int]:
        """The messages to send: system prompt, as much recent history as fits, the new message.

        The oldest whole turns are left out when the context window would overflow (the
        history itself keeps them).  When that happens a quarter of the window more is freed,
        so the prompt's prefix, and with it the KV cache, stays stable for the next turns
        instead of shifting every turn.
        """
        system: list[MessageDict] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        )
        history = self._messages if self.enable_cache else []
        n_ctx = self.backend.context_length()
        if n_ctx is None:
            return system + history[self._trim_start:] + [user], self._trimmed_turns()
        budget = n_ctx - self.max_tokens
        backend = self.backend

        def fits(start: int, limit: int) -> bool:
            msgs = system + history[start:] + [user]
            estimate = estimate_tokens(msgs)
            if backend.exact_token_count and estimate > limit // 2:
                return backend.count_tokens(msgs) <= limit
            return estimate <= limit

        if not fits(len(history), budget):
            need = backend.count_tokens([*system, user])
            raise SessionError(
                f"the message is too long: with the system prompt it takes {need} tokens, and the "
                f"{n_ctx}-token context leaves {budget} after reserving max_tokens={self.max_tokens}; "
                "shorten it or raise the context size"
            )
        if not fits(self._trim_start, budget):
            starts = [i for i in range(self._trim_start + 1, len(history)) if history[i]["role"] == "user"]
            starts.append(len(history))
            target = budget - n_ctx // 4
            new_start = next((s for s in starts if fits(s, target)), None)
            if new_start is None:
                new_start = next(s for s in starts if fits(s, budget))
            dropped = count_turns(history[self._trim_start:new_start])
            self._trim_start = new_start
            logger.warning("context window (%d tokens) full: %d oldest turn(s) left out of the prompt "
                           "(still in the history and the file)", n_ctx, dropped)
        return system + history[self._trim_start:] + [user], self._trimmed_turns()

    def _start_warmup(self) -> None:
        """Load the restored conversation into the backend's cache while the user types:
        from the saved KV cache when there is a valid one, else by prefilling it."""
        backend = self.backend
        if not (backend.can_warm or self.persist_kv_cache) or not self._messages:
            return
        try:
            prompt, _ = self._prompt_for({"role": "user", "content": "…"})
        except SessionError:
            return
        messages = prompt[:-1]
        restore = None
        if self.persist_kv_cache:
            path, cap = self.store.kv_path(self.session_id), self.kv_cache_max_bytes

            def restore() -> dict[str, Any]:
                return backend.restore_state(path, messages, max_bytes=cap)
        self._warmup = _Warmup(backend, messages, restore)

    def _schedule_kv_save(self, messages: list[MessageDict]) -> None:
        """Save the KV cache of the turn just completed, in the background (never delays a reply)."""
        seq, backend, cap = self._turn_seq, self.backend, self.kv_cache_max_bytes
        path = self.store.kv_path(self.session_id)

        def job() -> None:
            try:
                figures = backend.save_state(path, messages, still_current=lambda: self._turn_seq == seq)
            except (OSError, SessionError) as exc:
                figures = {"kv_save": f"failed: {exc}"}
                logger.warning("could not save the KV cache to %s: %s (only speed is lost)", path, exc)
            self._kv_stats.update(figures)
            if figures.get("kv_save") == "saved":
                evicted = enforce_cap(path.parent, cap, keep=path)
                if evicted:
                    logger.info("KV cache files over %d bytes: removed %s", cap, ", ".join(p.name for p in evicted))

        self._kv_saver.submit(job)

    def _flush_kv_save(self) -> None:
        if not self._kv_saver.flush(_JOIN_TIMEOUT_S):
            logger.warning("the KV cache save did not finish within %.0f s", _JOIN_TIMEOUT_S)

    def _stop_warmup(self) -> None:
        if self._warmup is not None:
            self._warmup.stop()

    def _trimmed_turns(self) -> int:
        return count_turns(self._messages[: self._trim_start])

    # -- persistence ---------------------------------------------------------------------
    def save_history(self) -> Path:
        """Write the session file now (it is also written after every turn) and return its path.

        Raises:
            SessionError: ``enable_cache=False`` (nothing is kept to save), or the write failed.
        """
        with self._lock:
            if self._read_only is not None:
                raise SessionError(
                    f"session {self._read_only.session_id} was opened read-only; it is not saved from here")
            if not self.enable_cache or self._writer is None:
                raise SessionError(
                    "this session was created with enable_cache=False, so it keeps no history to "
                    "save; create it with enable_cache=True to persist conversations"
                )
            try:
                return self._writer.write_snapshot()
            except OSError as exc:
                raise SessionError(
                    f"could not save {self.path}: {exc.strerror or exc}; the conversation is kept in "
                    "memory, free some space or fix the folder's permissions and save again"
                ) from exc

    def load_history(self, session_id: str | None = None, *, read_only: bool = False) -> bool:
        """Continue a saved session: its history, in its own file, under its own id.

        Args:
            session_id: the session to load; ``None`` for the most recently updated one.
                Unreadable or malformed files are skipped with a warning.
            read_only: only look: load the history without taking the session's lock (so it
                works while another process has it open); ``chat()`` then refuses until
                ``clear_history()`` starts a new session.

        Returns:
            True if a session was loaded, False if there was none (or it had no turns).

        Raises:
            ValueError: ``session_id`` is not a plain session name.
            SessionFormatError: the named session's file is corrupt.
            SessionLockedError: the session is open for writing elsewhere (not with read_only).
        """
        if session_id is not None:
            validate_session_id(session_id)
        with self._lock:
            if not self.enable_cache:
                logger.warning("load_history() ignored: enable_cache=False keeps no history")
                return False
            t0 = time.perf_counter()
            if read_only:
                if session_id is None:
                    newest = self.store.load_newest(exclude={self.session_id})
                    if newest is None:
                        logger.info("no saved session to view in %s", self.store.directory)
                        return False
                    session_id = newest.session_id
                return self._load_read_only(session_id)
            if session_id is None:
                opened = self._open_newest()
                if opened is None:
                    logger.info("no saved session to resume in %s", self.store.directory)
                    return False
                writer, record = opened
            elif session_id == self.session_id and self._read_only is None:
                return bool(self._messages)
            else:
                try:
                    writer, record = self.store.open(session_id)
                except FileNotFoundError:
                    logger.info("no saved session %s in %s", session_id, self.store.directory)
                    return False
                if not record.messages:
                    writer.close()
                    logger.info("session %s has no turns; nothing to resume", session_id)
                    return False
            self._switch_to(writer, record)
            logger.info("resumed %s: %d turns, %d messages in %.1f ms", record.session_id, record.turns,
                        len(record.messages), (time.perf_counter() - t0) * 1000)
            if record.llm_model not in ("unknown", self.llm_model):
                logger.info("session %s was recorded with %s; continuing with %s", record.session_id,
                            record.llm_model, self.llm_model)
            return True

    def _open_newest(self) -> tuple[SessionWriter, SessionRecord] | None:
        """Open the most recently updated session that loads, has turns and is not open elsewhere."""
        for _mtime, session_id in self.store.candidates():
            if session_id == self.session_id:
                continue
            try:
                writer, record = self.store.open(session_id)
            except FileNotFoundError:
                continue
            except SessionLockedError as exc:
                logger.info("skipping session %s: %s", session_id, exc)
                continue
            except SessionError as exc:
                logger.warning("skipping session %s: %s", session_id, exc)
                continue
            if record.messages:
                return writer, record
            writer.close()
        return None

    def _switch_to(self, writer: SessionWriter, record: SessionRecord) -> None:
        """Continue ``record`` through ``writer`` from now on."""
        self._adopt(writer, record.messages)
        self._start_warmup()

    def _adopt(self, writer: SessionWriter | None, messages: list[MessageDict],
               read_only: SessionRecord | None = None) -> None:
        """Make ``messages`` (saved through ``writer``, if any) the conversation.  The old one's
        background work is finished first and its writer closed; its figures go with it."""
        old = self._writer
        self._stop_warmup()
        self._flush_kv_save()
        self._writer = writer
        self._read_only = read_only
        self._messages = messages
        if writer is not None:
            writer.bind(messages)
        self._trim_start = 0
        self._warmup = None
        self._kv_stats = {}
        if old is not None:
            old.close()

    def _load_read_only(self, session_id: str) -> bool:
        try:
            record = self.store.load(session_id)
        except FileNotFoundError:
            logger.info("no saved session %s in %s", session_id, self.store.directory)
            return False
        self._adopt(None, record.messages, read_only=record)
        self._stateless_id = session_id
        logger.info("opened %s read-only: %d turns", session_id, record.turns)
        return bool(self._messages)

    def clear_history(self) -> None:
        """Start over: empty history and KV cache, new session id (the old file stays on disk).

        Raises:
            SessionError: the new session cannot be created (the current one then goes on).
        """
        with self._lock:
            if self._closed:
                raise SessionError("the session is closed")
            # Created first: if this fails, nothing has changed.
            new = self.store.create(self.llm_model) if self.enable_cache else None
            if self._speaker is not None:
                self._speaker.cancel()
            self._adopt(new, [])
            self.backend.reset_cache()
            self._last = None
            self._total_prompt = self._total_cached = 0
            self._stateless_id = f"session_{int(time.time())}"

    # -- reports -------------------------------------------------------------------------
    def get_history_summary(self) -> dict[str, Any]:
        """The seed's summary: ``session_id``, ``turns``, ``total_messages``, ``has_history_file``, ..."""
        with self._lock:
            writer = self._writer
            record = writer.record if writer is not None else self._read_only
            return {
                "session_id": self.session_id,
                "turns": self.turns,
                "total_messages": len(self._messages),
                "has_history_file": bool(writer is not None and writer.has_file) or self._read_only is not None,
                "created_at": record.created_at if record else None,
                "updated_at": (record.updated_at or record.created_at) if record else None,
                "llm_model": self.llm_model,
                "backend": self.backend.name,
                "path": str(self.path) if writer is not None or self._read_only else None,
                "read_only": self._read_only is not None,
                "enable_cache": self.enable_cache,
                "last_save_error": str(writer.last_error) if writer and writer.last_error else None,
            }

    def get_cache_stats(self) -> dict[str, Any]:
        """KV-cache and speed figures (the seed's ``stats`` command)."""
        with self._lock:
            last = self._last
            stats: dict[str, Any] = {
                "backend": self.backend.name,
                "llm_model": self.llm_model,
                "n_ctx": self.backend.context_length(),
                "tokens_in_cache": None,
                "state_bytes": None,
                "model_load_s": None,
                "prompt_tokens": last.prompt_tokens if last else None,
                "cached_tokens": last.cached_tokens if last else None,
                "completion_tokens": last.completion_tokens if last else None,
                "ttft_s": last.ttft_s if last else None,
                "tts_first_audio_s": last.tts_first_audio_s if last else None,
                "tokens_per_s": last.tokens_per_s if last else None,
                "total_prompt_tokens": self._total_prompt,
                "total_cached_tokens": self._total_cached,
                "cache_hit_ratio": (self._total_cached / self._total_prompt) if self._total_prompt else None,
                "trimmed_turns": self._trimmed_turns(),
            }
            stats.update(self.backend.cache_stats())
            stats["kv_persist"] = self.persist_kv_cache
            stats.update(self._kv_stats)
            if self._warmup is not None:
                stats.update(self._warmup.stats)
            return stats

    def __repr__(self) -> str:
        return (f"<ConversationSession {self.session_id} backend={self.backend.name} "
                f"model={self.llm_model} turns={self.turns}>")

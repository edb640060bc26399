"""ConversationSession: the synchronous session, as the original guide uses it.

A thin driver: the state and the operations live in ``SessionCore`` (``_core.py``), the turn in
``Turn`` (``_turn.py``), the history rules in ``Conversation`` (``_conversation.py``).  This class
adds what is particular to being called from threads: one turn at a time (a second thread
waits; the turn's own ``on_token`` callback gets a clear error instead of a deadlock), and
generation in the caller's thread.

A turn joins the history only once it is complete: the reply is generated from
``history + [user message]``, and only when the backend has finished are both messages added
(in one step) and journaled.  A timeout, a backend error or Ctrl-C therefore leaves memory,
file and KV cache exactly as they were after the previous turn.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._exceptions import SessionError
from .._result import ChatResult
from ..stores import validate_session_id
from ._core import SessionView, core_setting
from ._limits import check_max_tokens, check_timeout
from ._turn import Turn, _TurnSteps

__all__ = ["ConversationSession"]

logger = logging.getLogger("conversation_session")


class ConversationSession(SessionView):
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
        store: where sessions live: a store object or a URL (``postgresql://user@host/db``);
            default the folder ``sessions_dir`` (or ``$CONVERSATION_SESSIONS_STORE``).
        memory: what happens when the history outgrows the context window: ``"trim"`` leaves
            the oldest turns out of the prompt; ``"summary"`` folds them into a running summary
            kept after the system prompt (made in the background, in batches, so the prompt
            prefix and the KV cache stay stable between compactions).
        summarizer: the backend that writes summaries (default: this session's backend).
        durability: what a turn survives once ``chat()`` has returned it: ``"process"`` (the
            process dying) or ``"power"`` (the machine losing power too: its journal line is
            flushed to the disk first); default ``$CONVERSATION_SESSION_DURABILITY``, else the
            store's level, else ``"power"`` (docs/durability.md).
        tools: functions the model may call (plain functions with type hints and a docstring,
            or ``tool(...)``-wrapped); see docs/tools.md.  Each call is recorded before it runs
            and its result before the model sees it; a recorded call is never run again.
        max_tool_rounds: rounds of tool calls a turn may make; at the bound the model is asked
            once more without tools, so the user still gets an answer.
        encryption_key: encrypt new sessions at rest: the 32 key bytes or a key file's path
            (``conversation-session keygen PATH``); default ``$CONVERSATION_SESSION_KEY_FILE``,
            else none (plain JSON).  The file store only (docs/encryption.md).
        approve: asked before each call of a tool not marked ``idempotent``, in the thread
            running the turn, with ``{"id", "name", "arguments"}``; anything but ``True`` (or an
            exception) and the call is not run: its result is ``"error: not approved: <why>;
            it was not run"`` (a string answer is the why).  On ``AsyncConversationSession`` it
            may be ``async def``.  The call's intent is recorded before the question.
        keystore: the folder keeping encrypted sessions' data keys, so that deleting a session
            makes its copies in backups unreadable; default ``$CONVERSATION_SESSION_KEYSTORE``,
            else ``<key file>.keystore`` beside a key file, else ``<sessions_dir>/.keystore``
            for a key given as bytes (docs/encryption.md).

    Raises:
        BackendError: the backend cannot be set up (model file missing, ...).
        SessionError: the sessions folder cannot be created.
    """

    def _init_driver(self) -> None:
        self._lock = threading.Lock()        # guards the session's state; never held across a turn
        self._turn_free = threading.Condition(self._lock)
        self._turn_owner: int | None = None  # the thread whose turn is running
        self._open_turn: weakref.ref[Turn] | None = None  # that turn (weak: dropping it ends it)
        logger.debug("session %s started (backend %s, model %s)", self.session_id, self.backend.name,
                     self.llm_model)

    # -- settings the caller may change between turns ---------------------------------------
    tts = property(lambda self: self._core.speaker)
    tts_wait_timeout = core_setting("tts_wait_timeout", "seconds to wait for speech once the text is complete",
                                    lambda v: check_timeout(v, "tts_wait_timeout"))
    max_tokens = core_setting("max_tokens", "reply length limit in tokens", check_max_tokens)
    temperature = core_setting("temperature", "sampling temperature")
    sampling = core_setting("sampling", "extra sampling options sent with each request (top_p, seed, ...)")
    kv_cache_max_bytes = property(lambda self: self._core.kv.cap)

    @property
    def system_prompt(self) -> str | None:
        return self._core.conversation.system_prompt

    @system_prompt.setter
    def system_prompt(self, value: str | None) -> None:
        """Change the persona from the next turn on; saved with the session."""
        with self._state():
            self._core.set_system_prompt(value)

    # -- context manager -----------------------------------------------------------------
    def __enter__(self) -> ConversationSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush the session file, release the session lock and a backend this session created
        (a backend passed in stays the caller's).  Idempotent."""
        if not self._core.closed:
            self._end_own_turn("cannot close the session from inside on_token: the turn is still running")
        with self._state(wait_turn=True, allow_closed=True):
            self._core.close()

    @contextmanager
    def _state(self, *, wait_turn: bool = True, allow_closed: bool = False) -> Iterator[None]:
        """Hold the session: wait for another thread's turn to end (never our own: see
        ``_end_own_turn``)."""
        if wait_turn:
            self._end_own_turn("cannot do that from inside on_token: the turn is still running; "
                               "act after chat() returns")
        with self._lock:
            if wait_turn:
                while self._turn_owner is not None:
                    self._turn_free.wait()
            if not allow_closed:
                self._core.check_open()
            yield

    # -- the turn ------------------------------------------------------------------------
    def stream(self, text: str, *, on_token: Callable[[str], None] | None = None,
               tools: Sequence[Callable[..., Any]] | None = None, max_tool_rounds: int | None = None,
               client_tools: Sequence[dict[str, Any]] | None = None,
               tool_choice: str | None = None) -> Turn:
        """Start a turn and return it: iterate it for the reply's pieces, then ``result()``.

        The session is busy until the turn ends (iterated to the end, ``cancel()``ed, or closed
        by its ``with`` block); other threads' calls wait for it.  An empty message sends
        nothing and completes at once with no new turn.  ``client_tools``: schemas of tools
        the caller runs itself (``AsyncConversationSession.stream``; docs/compat.md).
        """
        return self._start(text, on_token, retry=False, tools=tools, max_tool_rounds=max_tool_rounds,
                           client_tools=client_tools, tool_choice=tool_choice)

    def stream_tool_results(self, results: Sequence[dict[str, Any]], *,
                            on_token: Callable[[str], None] | None = None,
                            client_tools: Sequence[dict[str, Any]] | None = None) -> Turn:
        """Record the results of the client's pending calls, then let the model continue the
        turn (``AsyncConversationSession.stream_tool_results``)."""
        return self._start("", on_token, retry=False, client_tools=client_tools, results=list(results))

    def stream_retry(self, *, on_token: Callable[[str], None] | None = None) -> Turn:
        """Ask the last user message again: a turn (as ``stream()``) whose completed reply
        replaces the last one.  The old turn is kept in the file's ``undone`` list, and the
        swap is one durable write: if the store cannot take it, the previous reply stays and the
        result says ``saved=False``.  ``SessionError`` if there is no reply to retry."""
        return self._start("", on_token, retry=True)

    def _start(self, text: str, on_token: Callable[[str], None] | None, *, retry: bool, tools: Any = None,
               max_tool_rounds: int | None = None, client_tools: Sequence[dict[str, Any]] | None = None,
               results: list[dict[str, Any]] | None = None, tool_choice: str | None = None) -> Turn:
        core = self._core
        if tools is not None or max_tool_rounds is not None or tool_choice is not None:
            # bad tools: an error before the turn starts
            _TurnSteps.check_tools(core, tools, max_tool_rounds, tool_choice)
        core.check_can_chat(text)
        me = threading.get_ident()
        self._end_own_turn("cannot start a turn from inside on_token: the turn is still running; "
                           "send it after chat() returns")
        with self._lock:
            while self._turn_owner is not None:
                self._turn_free.wait()
            core.check_can_chat(text)
            self._turn_owner = me

        def release() -> None:
            with self._lock:
                if self._turn_owner is not None:
                    self._turn_owner = None
                    self._open_turn = None
                    self._turn_free.notify_all()

        try:
            if results is not None:
                core.add_tool_results(results)  # durable before the model sees them
            steps = _TurnSteps(core, text, on_token, release, retry=retry, tools=tools,
                               max_tool_rounds=max_tool_rounds, client_tools=list(client_tools or []),
                               resume=results is not None, tool_choice=tool_choice)
        except BaseException:
            release()
            raise
        turn = Turn(steps)
        self._open_turn = weakref.ref(turn)
        return turn

    def _end_own_turn(self, in_callback_error: str) -> None:
        """Before this thread waits for the turn to be free.  From inside on_token, waiting
        would never end: an error.  If the turn is this thread's own and no callback runs, it
        was left open (its loop left early, no ``with`` block): it is ended as its ``with`` block
        would end it (a reply being spoken keeps what was heard, an unfinished one is dropped)."""
        if self._core.in_callback_now():
            raise SessionError(in_callback_error)
        me = threading.get_ident()
        if self._turn_owner != me:
            return
        turn = self._open_turn() if self._open_turn is not None else None
        if turn is not None:
            logger.info("the previous turn was left open; ending it as its with block would")
            turn.close()
        if self._turn_owner == me:
            raise SessionError("this thread's previous turn is still open; end it first (iterate it to the end, "
                               "or call its result(), interrupt() or cancel())")

    def chat(self, text: str, *, on_token: Callable[[str], None] | None = None,
             tools: Sequence[Callable[..., Any]] | None = None, max_tool_rounds: int | None = None,
             tool_choice: str | None = None) -> ChatResult:
        """Send ``text`` and return the completed reply; the turn is saved before returning.

        Args:
            text: the user's message.  An empty or blank one sends nothing and returns a result
                with no new turn (``finish_reason="empty"``).
            on_token: called with each streamed piece of the reply, as it arrives.
            tools: more tools for this call only, offered beside the session's.
            max_tool_rounds: this call's bound on rounds of tool calls (default: the session's).
            tool_choice: this call's first round must call a tool: ``"required"`` (any) or a
                tool's name (that one); ``"none"``: no tools that round; ``"auto"``/None: the
                model decides.  Later rounds are ``"auto"``.  The embedded backend forces the
                call with a grammar; Ollama has no such option (the model decides).

        Raises:
            SessionTimeoutError: the turn took longer than ``timeout``; nothing of it is kept,
                the session stays usable and its KV cache valid.
            TTSTimeoutError: the reply is complete and saved (``.result``), but speaking it took
                longer than ``tts_wait_timeout``; the speech was stopped.
            BackendError: the backend failed (server down, model missing, ...).
            SessionError: the session is closed, read-only, or called from inside ``on_token``.
        """
        return self._run(self.stream(text, on_token=on_token, tools=tools, max_tool_rounds=max_tool_rounds,
                                     tool_choice=tool_choice))

    def retry(self, *, on_token: Callable[[str], None] | None = None) -> ChatResult:
        """Regenerate the reply to the last user message (see ``stream_retry()``); raises what
        ``chat()`` raises, and ``SessionError`` if there is no reply to retry."""
        return self._run(self.stream_retry(on_token=on_token))

    @staticmethod
    def _run(turn: Turn) -> ChatResult:
        with turn:
            for _ in turn:
                pass
            return turn.result()

    def undo(self) -> bool:
        """Withdraw the last turn (the user's message and the reply) from the conversation.

        The store records it (the file's ``undone`` list, a journal line; PostgreSQL likewise):
        nothing is silently rewritten, and it survives a restart.  Returns False if there is no
        turn to undo.

        Raises:
            SessionError: the store could not record the undo (nothing changed), or the session
                is closed or read-only.
        """
        with self._state():
            return self._core.undo()

    def cut_last_reply(self, heard: str | int) -> bool:
        """Barge-in after the reply was saved (its audio was still playing elsewhere): keep only
        ``heard`` (the start of the last reply, or a number of characters), marked interrupted;
        nothing heard withdraws the turn.  Durable like ``undo()`` (the full reply is kept under
        ``undone``).  False if there is no reply or it was all heard.

        Raises:
            ValueError: ``heard`` is not the start of the last reply.
            SessionError: the store could not record it (nothing changed).
        """
        with self._state():
            return self._core.cut_last_reply(heard)

    def set_title(self, title: str | None) -> bool:
        """Name the session (shown by listings; None or blank removes the name).  Returns True
        when saved; False when it will be saved with the next turn."""
        with self._state():
            return self._core.set_title(title)

    # -- persistence ---------------------------------------------------------------------
    def save_history(self) -> Path | str:
        """Write the session now (it is also written after every turn) and return where.

        Raises:
            SessionError: ``enable_cache=False`` (nothing is kept to save), or the write failed.
        """
        with self._state():
            return self._core.save_now()

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
            SessionError: the session is closed.
        """
        if session_id is not None:
            validate_session_id(session_id)
        with self._state():
            return self._core.load_history(session_id, read_only)

    def clear_history(self) -> None:
        """Start over: empty history and KV cache, new session id (the old file stays).

        Raises:
            SessionError: the new session cannot be created (the current one then goes on).
        """
        with self._state():
            self._core.clear()

    # -- reports -------------------------------------------------------------------------
    def get_history_summary(self) -> dict[str, Any]:
        """The seed's summary: ``session_id``, ``turns``, ``total_messages``, ``has_history_file``, ..."""
        with self._lock:
            return self._core.summary()

    def get_cache_stats(self) -> dict[str, Any]:
        """KV-cache and speed figures of this conversation (the seed's ``stats`` command)."""
        with self._lock:
            return self._core.stats()

    def __repr__(self) -> str:
        return (f"<ConversationSession {self.session_id} backend={self.backend.name} "
                f"model={self.llm_model} turns={self.turns}>")

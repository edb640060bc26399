"""What a session holds, shared by the sync and the async driver.

``SessionCore`` owns the session's collaborators (backend, store writer, conversation, speaker,
KV file, warm-up) and the operations that are not a turn (resume, clear, reports, close).  It
holds no thread and no event loop of its own: ``ConversationSession`` calls it under a thread
lock, ``AsyncConversationSession`` under an asyncio lock, with blocking store reads sent to the
shared pool.  Turn logic lives in ``_turn.py`` and ``_conversation.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .._exceptions import SessionError, SessionLockedError, SessionNotFoundError
from .._result import ChatResult
from .._runtime import run_in_background, schedule
from ..backends import Backend, GenerationRequest, create_backend
from ..memory._kvcache import JOIN_TIMEOUT_S, KV_CACHE_MAX_BYTES, KVFile, Warmup, kv_file_path
from ..memory._summary import SUMMARY_MAX_TOKENS, SummaryPolicy, SummaryState
from ..memory._window import TrimPolicy
from ..speech import create_speaker
from ..stores import open_store, validate_session_id
from ..stores._api import SessionWriterAPI, StoreAPI
from ..stores._durability import resolve_durability
from ..stores._keystore import store_options
from ..stores._record import MessageDict, SessionRecord, clean_title, is_utf8_text
from ..tools import NO_CLIENT_RESULT, UNKNOWN_OUTCOME, as_tools, orphan_calls, pending_client_calls, result_message
from ._conversation import Conversation, Plan
from ._limits import DEFAULT_TIMEOUT_S, DEFAULT_TOOL_ROUNDS, SUMMARY_TIMEOUT_S, check_timeout
from ._options import SessionOptions

__all__ = ["SessionCore", "SessionView", "core_setting"]

logger = logging.getLogger("conversation_session")

_keys = itertools.count(1)


class SessionCore:
    """The state of one session (see the module docstring)."""

    def __init__(self, options: SessionOptions):
        o = options
        self.options = options
        llm_model, backend, enable_cache, memory, summarizer = (o.llm_model, o.backend, o.enable_cache, o.memory,
                                                                o.summarizer)
        system_prompt, store = o.system_prompt, o.store
        self.enable_cache = enable_cache
        self.tools = as_tools(o.tools)
        self.max_tool_rounds = o.max_tool_rounds
        self.approve = o.approve
        self.timeout = o.timeout
        self.tts_wait_timeout = o.tts_wait_timeout
        self.max_tokens = o.max_tokens
        self.temperature = o.temperature
        self.sampling: dict[str, Any] = {}
        self.owns_backend = not isinstance(backend, Backend)  # close only what we created
        if isinstance(backend, Backend):
            self.backend = backend
        else:
            self.backend = create_backend(backend, None if llm_model is None else str(llm_model),
                                          base_url=o.base_url, **(o.backend_options or {}))
        self.llm_model = self.backend.model_name
        self.closed = False
        self.last: ChatResult | None = None
        self.turn_seq = 0
        self.interruptions = 0
        self.warmup: Warmup | None = None
        self.read_only: SessionRecord | None = None
        self._callback_thread: int | None = None
        self._stateless_id = f"session_{int(time.time())}"
        self._pending_meta: dict[str, Any] | None = None
        backend_ = self.backend
        self.memory = memory
        self._summarizer = summarizer
        policy: TrimPolicy
        if memory == "summary":
            policy = SummaryPolicy(backend_.context_length, lambda: self.max_tokens, backend_.count_tokens,
                                   backend_.exact_token_count, summarize=self._summarize,
                                   model_name=(summarizer or backend_).model_name, run=run_in_background,
                                   on_compaction=self._compacted)
        else:
            policy = TrimPolicy(backend_.context_length, lambda: self.max_tokens, backend_.count_tokens,
                                backend_.exact_token_count)
        self.policy = policy
        self.conversation = Conversation(policy, system_prompt=system_prompt, stateless=not enable_cache)
        self._requested_system = system_prompt
        self.cache_key = f"cs{next(_keys)}"
        self.speaker = None
        self.writer: SessionWriterAPI | None = None
        try:
            self.store = open_store(store, o.sessions_dir, encryption_key=o.encryption_key,
                                    **store_options(store, o.sessions_dir, o.keystore))
            # Asked for, else the store's own level (a store object may carry one), else the
            # environment's or the default.
            self.durability = (o.durability or getattr(self.store, "durability", None)
                               or resolve_durability(None))
            self.persist_kv_cache = bool(o.persist_kv_cache and enable_cache and backend_.can_persist_state)
            self.kv = KVFile(backend_, lambda: self.kv_path, o.kv_cache_max_bytes, self.cache_key)
            self.speaker = create_speaker(o.tts, output_dir=o.tts_output_dir, **(o.tts_options or {}))
            if enable_cache:
                self.writer = self._leveled(self.store.create(self.llm_model))
                if system_prompt:
                    self._pending_meta = {"system_prompt": system_prompt}
        except BaseException:
            self._release_resources()
            raise

    def _leveled(self, writer: SessionWriterAPI | None) -> SessionWriterAPI | None:
        """``writer`` set to save at this session's durability level (when its store has levels)."""
        if writer is not None and hasattr(writer, "durability"):
            writer.durability = self.durability
        return writer

    @property
    def saved_level(self) -> str | None:
        """The level the writer saves at (``ChatResult.durability`` of a saved turn)."""
        return getattr(self.writer, "durability", None) if self.writer is not None else None

    # -- identity -------------------------------------------------------------------------
    @property
    def session_id(self) -> str:
        return self.writer.session_id if self.writer is not None else self._stateless_id

    @property
    def kv_path(self) -> Path:
        return kv_file_path(self.store, self.session_id)

    @property
    def location(self) -> str | None:
        snapshot_path = getattr(self.store, "snapshot_path", None)
        if snapshot_path is not None:
            return str(snapshot_path(self.session_id))
        return f"{self.store.description}#{self.session_id}"

    # -- guards ---------------------------------------------------------------------------
    def set_system_prompt(self, value: str | None) -> None:
        """The persona from the next turn on, saved with the next turn (the caller holds the
        session between turns: the sync lock, or no turn running on the loop)."""
        if value is not None and not isinstance(value, str):
            raise TypeError(f"system_prompt must be a str or None, not {type(value).__name__}")
        self.check_open("change")
        self._requested_system = value
        self.conversation.system_prompt = value
        self.conversation.policy.reset()
        self._pending_meta = {"system_prompt": value}

    def check_open(self, action: str = "use") -> None:
        if self.closed:
            raise SessionError(f"the session is closed; cannot {action} it (start a new session)")
        if self._callback_thread == threading.get_ident():
            raise SessionError(f"cannot {action} the session from inside on_token: the turn is still "
                               "running; act after chat() returns")

    def in_callback_now(self) -> bool:
        """Whether this thread is inside the turn's on_token callback."""
        return self._callback_thread == threading.get_ident()

    @contextlib.contextmanager
    def in_callback(self) -> Iterator[None]:
        previous, self._callback_thread = self._callback_thread, threading.get_ident()
        try:
            yield
        finally:
            self._callback_thread = previous

    def check_can_chat(self, text: object) -> None:
        if not isinstance(text, str):
            raise TypeError(f"the message must be a str, not {type(text).__name__}")
        self.check_open("chat in")
        if not is_utf8_text(text):
            raise ValueError("the message contains a lone surrogate character and cannot be saved as UTF-8")
        if self.read_only is not None:
            raise SessionError(
                f"session {self.read_only.session_id} was opened read-only; call clear_history() to start a new "
                "session, or load it without read_only once no other process has it open")
        ensure_room = getattr(self.writer, "ensure_room", None)
        if ensure_room is not None and text.strip():
            # The reply can add up to max_tokens tokens (a few bytes each): refuse now rather than
            # write a session the loader would then refuse.
            ensure_room(len(text.encode()) + self.max_tokens * 8 + 256)

    # -- memory (summaries) ----------------------------------------------------------------
    def _summarize(self, prompt: list[MessageDict]) -> str:
        """Run a summary request on the summariser (default: the session's backend), on a cache
        key of its own so the embedded model never evicts the conversation's cache for it."""
        backend = self._summarizer or self.backend
        request = GenerationRequest(messages=prompt, max_tokens=SUMMARY_MAX_TOKENS, temperature=0.2,
                                    cache_key=f"{self.cache_key}:summary")
        deadline = schedule(self.timeout or SUMMARY_TIMEOUT_S, request.cancel.cancel)
        try:
            text = "".join(backend.generate(request))
        finally:
            deadline.cancel()
        if request.cancel.cancelled:
            raise TimeoutError("the summariser did not finish in time")
        return text

    def _compacted(self, state: SummaryState) -> None:
        # Journaled with the next turn's commit (the turn that uses it), like the turn itself.
        meta = dict(self._pending_meta or {})
        meta["summary"] = state.to_meta()
        self._pending_meta = meta

    # -- the turn's commit ---------------------------------------------------------------
    def commit(self, plan: Plan, reply: MessageDict | list[MessageDict], *, continued: bool = False,
               before: list[MessageDict] | None = None) -> bool:
        """Append a completed turn to the conversation and journal it; True if durable.

        A tool-using turn is committed in steps: ``reply`` a list (the call request, a result),
        ``continued`` once the turn's first step is in; ``before``: the turn's messages already
        committed (for the KV file of the completed turn).  A retry (``plan.replaces``) is all or
        nothing: its first store write withdraws the old turn and appends the new one; if the
        store cannot take it, the previous reply stays."""
        after = reply if isinstance(reply, list) else [reply]
        if plan.replaces is not None and not continued:
            if not self._record_rewind(plan.replaces, [plan.user, *after]):
                logger.warning("the new reply of session %s could not be saved (%s); the previous reply stays",
                               self.session_id, getattr(self.writer, "last_error", None))
                return False
            self.conversation.commit(plan, reply)
            saved = self.enable_cache and self.writer is not None
        else:
            start, new = self.conversation.commit(plan, reply, continued=continued)
            if not self.enable_cache or self.writer is None:
                return False
            saved = self._append(start, new)
        if self.persist_kv_cache and not isinstance(reply, list):
            seq = self.turn_seq
            self.kv.schedule([*plan.prompt, *(before or []), reply], lambda: self.turn_seq == seq)
        return saved

    def repair_orphans(self) -> None:
        """Give each call left without a result (a process stopped while it ran) the result
        ``UNKNOWN_OUTCOME``, recorded (in memory only for a read-only view): the history then
        has no orphan call, and the call is never run again.  A client's call (``"client":
        true``) is not an orphan: it waits for the client's result (``add_tool_results``)."""
        orphans = [c for c in orphan_calls(self.conversation.messages) if not c.get("client")]
        if not orphans:
            return
        results = [result_message(c, UNKNOWN_OUTCOME) for c in orphans]
        logger.warning("session %s: %d tool call(s) had no result (the process stopped while they ran); "
                       "recorded as of unknown outcome: %s", self.session_id, len(orphans),
                       ", ".join(c["function"]["name"] for c in orphans))
        start = len(self.conversation.messages)
        self.conversation.messages.extend(results)
        if self.read_only is None and self.enable_cache and self.writer is not None:
            self._append(start, results)

    # -- calls the API client runs (docs/compat.md) --------------------------------------------
    def add_tool_results(self, results: list[dict[str, Any]]) -> int:
        """Record the client's results of its pending calls (``{"content", "tool_call_id"?}``),
        durably, before the model sees them; returns how many were recorded.

        A result with ``tool_call_id`` answers that call; one without answers the first pending
        call not yet answered (the Ollama API has no ids: results come in the calls' order).  A
        result for a call already answered is skipped (a client resending after a failed
        request).  Pending calls the client did not answer get ``NO_CLIENT_RESULT``.  Raises
        ``ValueError`` (nothing recorded) for a result that answers no call."""
        self.check_open("append to")
        pending = pending_client_calls(self.conversation.messages)
        answered = {m.get("tool_call_id") for m in self.conversation.messages if m["role"] == "tool"}
        by_id = {c["id"]: c for c in pending}
        texts: dict[str, str] = {}
        for i, r in enumerate(results):
            content = r.get("content")
            if not isinstance(content, str) or not is_utf8_text(content):
                raise ValueError(f"tool result {i}: its content must be text")
            call_id = r.get("tool_call_id")
            if call_id:
                if call_id in answered:
                    continue
                if call_id not in by_id or call_id in texts:
                    raise ValueError(f"tool result {i}: {call_id!r} is not a call waiting for its result")
            else:
                free = [c["id"] for c in pending if c["id"] not in texts]
                if not free:
                    if not pending:
                        continue  # all answered already: a resent request
                    raise ValueError(f"tool result {i}: there are more results than calls ({len(pending)})")
                call_id = free[0]
            texts[call_id] = content
        if not pending:
            return 0
        new = [result_message(c, texts.get(c["id"], NO_CLIENT_RESULT)) for c in pending]
        start = len(self.conversation.messages)
        self.conversation.messages.extend(new)
        self.turn_seq += 1
        if self.enable_cache and self.writer is not None:
            self._append(start, new)
        return len(texts)

    def settle_client_calls(self) -> None:
        """The conversation moves on (a new user message) without the client's results: each
        pending call gets ``NO_CLIENT_RESULT``, so the history has no orphan call."""
        if pending_client_calls(self.conversation.messages):
            logger.info("session %s: the client's pending tool call(s) got no result; recorded as such",
                        self.session_id)
            self.add_tool_results([])

    def _append(self, start: int, new: list[MessageDict]) -> bool:
        assert self.writer is not None
        t0 = time.perf_counter()
        meta, self._pending_meta = self._pending_meta, None
        try:
            saved = self.writer.append(start, new, meta)
        except (OSError, SessionError) as exc:  # a store must not lose the reply by raising
            logger.warning("could not save turn %d of %s: %s; it is kept in memory and saved with the next "
                           "successful save", self.conversation.turns, self.session_id, exc)
            saved = False
        if not saved and meta:
            self._pending_meta = meta
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("turn %d committed in %.3f ms", self.conversation.turns, (time.perf_counter() - t0) * 1000)
        return saved

    def _record_rewind(self, start: int, new: list[MessageDict]) -> bool:
        """Have the store withdraw the messages from ``start`` on and append ``new`` (one durable
        write); True when done.  Nothing to record without a store."""
        if not self.enable_cache or self.writer is None:
            return True
        rewind = getattr(self.writer, "rewind", None)
        if rewind is None:
            raise SessionError(f"the {type(self.store).__name__} store cannot undo turns")
        meta, self._pending_meta = self._pending_meta, None
        try:
            ok = bool(rewind(start, new, meta))
        except (OSError, SessionError) as exc:
            logger.warning("session %s: the store refused the undo: %s", self.session_id, exc)
            ok = False
        if not ok and meta:
            self._pending_meta = meta
        return ok

    # -- undo and titles ---------------------------------------------------------------------
    def undo(self) -> bool:
        """Withdraw the last turn (recorded by the store as undone); False if there is none."""
        self.check_open("undo in")
        if self.read_only is not None:
            raise SessionError(f"session {self.read_only.session_id} was opened read-only; nothing can be undone")
        at = self.conversation.last_turn_start()
        if at is None:
            return False
        self._rewind_last_turn(at, [], "undo the last turn")
        self.last = None
        logger.info("session %s: the last turn was undone (%d turn(s) left; the file keeps it under 'undone')",
                    self.session_id, self.conversation.turns)
        return True

    def rewind_to(self, n: int) -> int:
        """Keep only the first ``n`` messages (an edit or a regenerate made by a client that
        resends the whole conversation): the rest leave through the store's undo record (kept
        under ``undone``), never silently.  Returns how many messages were withdrawn."""
        self.check_open("rewind")
        if self.read_only is not None:
            raise SessionError(f"session {self.read_only.session_id} was opened read-only; nothing can be undone")
        gone = len(self.conversation.messages) - n
        if n < 0 or gone < 0:
            raise ValueError(f"cannot rewind to message {n}: the session holds {len(self.conversation.messages)}")
        if gone:
            self._rewind_last_turn(n, [], "rewind the history")
            self.last = None
        return gone

    def import_turns(self, messages: list[MessageDict]) -> bool:
        """Append completed turns the client holds and the session does not (user, assistant,
        ...), journaled like a turn; True when durable (False: kept in memory, saved later)."""
        self.check_open("append to")
        if self.read_only is not None:
            raise SessionError(f"session {self.read_only.session_id} was opened read-only")
        roles = [m["role"] for m in messages]
        if not messages or roles != ["user", "assistant"] * (len(roles) // 2):
            raise ValueError("turns to add must alternate user, assistant, ... and end with the assistant")
        for m in messages:
            if not isinstance(m.get("content"), str) or not is_utf8_text(m["content"]):
                raise ValueError("a message's content must be text")
        start = len(self.conversation.messages)
        new: list[MessageDict] = [{"role": m["role"], "content": m["content"]} for m in messages]
        self.conversation.messages.extend(new)
        self.conversation.turns += len(new) // 2
        self.turn_seq += 1
        if not self.enable_cache or self.writer is None:
            return False
        return self._append(start, new)

    def _rewind_last_turn(self, at: int, kept: list[MessageDict], what: str) -> None:
        """Replace the last turn (from message ``at``) by ``kept``: recorded by the store first
        (else ``SessionError``, nothing changed), then in the conversation and the KV file."""
        if not self._record_rewind(at, kept):
            raise SessionError(f"could not {what} of session {self.session_id}: "
                               f"{getattr(self.writer, 'last_error', None) or 'the store refused it'}; nothing "
                               "was changed")
        self.conversation.rewind(at, kept)
        self.turn_seq += 1  # a KV save pending for the old turn is stale
        if self.persist_kv_cache and self.conversation.messages:
            seq = self.turn_seq
            self.kv.schedule(self.conversation.warm_prompt(), lambda: self.turn_seq == seq)

    def cut_last_reply(self, heard: str | int) -> bool:
        """The user stopped listening after the last reply was saved (a barge-in while its audio
        still played): keep only ``heard`` of it (a prefix, or a number of characters), marked
        interrupted; nothing heard withdraws the turn.  Recorded like an undo (the whole reply
        goes to ``undone``).  False if there is no reply or it was all heard."""
        self.check_open("cut a reply in")
        at = self.conversation.last_turn_start()
        if at is None or self.read_only is not None:
            return False
        messages = self.conversation.messages
        full = messages[-1]["content"]
        if isinstance(heard, bool) or not isinstance(heard, (str, int)):
            raise TypeError(f"heard must be a str or a number of characters, not {type(heard).__name__}")
        text = full[:max(heard, 0)] if isinstance(heard, int) else heard
        if not full.startswith(text):
            raise ValueError("heard must be the start of the last reply")
        if text == full:
            return False
        kept: list[MessageDict] = []
        if text.strip():
            kept = [messages[at], {"role": "assistant", "content": text, "interrupted": True}]
        self._rewind_last_turn(at, kept, "cut the last reply")
        self.interruptions += 1
        logger.info("session %s: the last reply was cut to the %d of %d characters the user heard", self.session_id,
                    len(text), len(full))
        return True

    @property
    def title(self) -> str | None:
        record = self.writer.record if self.writer is not None else self.read_only
        return getattr(record, "title", None)

    def set_title(self, title: str | None) -> bool:
        """Name the session; True when saved (False: kept and saved with the next turn)."""
        self.check_open("rename")
        if self.read_only is not None:
            raise SessionError(f"session {self.read_only.session_id} was opened read-only; it cannot be renamed")
        clean = clean_title(title)
        if self.writer is None:
            return False
        meta = dict(self._pending_meta or {})
        meta["title"] = clean
        self._pending_meta = meta
        return self._append(len(self.conversation.messages), [])

    def after_abort(self, completed_prompt: list[MessageDict]) -> None:
        # The cache still holds the completed conversation (plus the abandoned turn's tokens,
        # which a save drops): keep it on disk too, if a save was skipped.
        if self.persist_kv_cache and self.conversation.messages:
            seq = self.turn_seq
            self.kv.schedule(completed_prompt, lambda: self.turn_seq == seq)

    # -- switching conversations ----------------------------------------------------------
    def adopt(self, writer: SessionWriterAPI | None, record: SessionRecord | None, *, read_only: bool = False) -> None:
        """Make ``record`` (saved through ``writer``, if any) the conversation.  The old one's
        background work is finished first, its writer closed, its figures and cache dropped."""
        old = self.writer
        self.stop_warmup()
        self.kv.flush()
        self.kv.cancel_pending()
        old_key = self.cache_key
        self.cache_key = f"cs{next(_keys)}"
        self.kv = KVFile(self.backend, lambda: self.kv_path, self.kv.cap, self.cache_key)
        self.writer = self._leveled(writer)
        self.read_only = record if read_only else None
        messages = list(record.messages) if record is not None else []
        system = self._requested_system
        self._pending_meta = None
        saved_system = getattr(record, "system_prompt", None) if record is not None else None
        if record is not None and saved_system and system is None:
            system = saved_system  # the persona comes back with the session
        elif record is not None and system and saved_system != system:
            if saved_system:
                logger.warning("session %s had another system prompt; the new one replaces it from now on",
                               record.session_id)
            self._pending_meta = {"system_prompt": system}
        elif record is None and system:
            self._pending_meta = {"system_prompt": system}
        self.conversation.replace(messages, system)
        if isinstance(self.policy, SummaryPolicy) and record is not None:
            self.policy.restore(SummaryState.from_meta(getattr(record, "summary", None)), len(messages))
        self.warmup = None
        self.last = None
        self.interruptions = 0
        with contextlib.suppress(Exception):
            forget = getattr(self.backend, "forget", None)
            if forget is not None:
                forget(old_key)
        if old is not None:
            old.close()

    def start_warmup(self) -> None:
        """Load the restored conversation into the backend's cache while the user types:
        from the saved KV cache when there is a valid one, else by prefilling it."""
        backend = self.backend
        if not (backend.can_warm or self.persist_kv_cache) or not self.conversation.messages:
            return
        try:
            messages = self.conversation.warm_prompt()
        except SessionError:
            return
        restore = None
        if self.persist_kv_cache:
            path, cap, key = self.kv_path, self.kv.cap, self.cache_key

            def restore() -> dict[str, Any]:
                return backend.restore_state(path, messages, max_bytes=cap, cache_key=key)
        self.warmup = Warmup(backend, messages, restore, self.cache_key)

    def stop_warmup(self) -> None:
        if self.warmup is not None:
            self.warmup.stop()

    def load_history(self, session_id: str | None, read_only: bool) -> bool:
        """``load_history()`` for both drivers (blocking store I/O; the caller holds the session)."""
        if not self.enable_cache:
            logger.warning("load_history() ignored: enable_cache=False keeps no history")
            return False
        t0 = time.perf_counter()
        if read_only:
            record = self.load_read_only(session_id)
            return False if record is None else self.viewed(record)
        if session_id is not None and session_id == self.session_id and self.read_only is None:
            return bool(self.conversation.messages)
        opened = self.open_for_resume(session_id)
        if opened is None:
            return False
        self.resumed(*opened, t0)
        return True

    def open_for_resume(self, session_id: str | None) -> tuple[SessionWriterAPI, SessionRecord] | None:
        """Open a saved session for writing (``None``: the newest that loads, has turns and is not
        open elsewhere); None if there is none.  Blocking store I/O."""
        if session_id is not None:
            try:
                writer, record = self.store.open(session_id)
            except (SessionNotFoundError, FileNotFoundError):
                logger.info("no saved session %s in %s", session_id, self.store.description)
                return None
            if not record.messages:
                writer.close()
                logger.info("session %s has no turns; nothing to resume", session_id)
                return None
            return writer, record
        for candidate in self.store.newest_first():
            if candidate == self.session_id:
                continue
            try:
                writer, record = self.store.open(candidate)
            except (SessionNotFoundError, FileNotFoundError):
                continue
            except SessionLockedError as exc:
                logger.info("skipping session %s: %s", candidate, exc)
                continue
            except SessionError as exc:
                logger.warning("skipping session %s: %s", candidate, exc)
                continue
            if record.messages:
                return writer, record
            writer.close()
        logger.info("no saved session to resume in %s", self.store.description)
        return None

    def load_read_only(self, session_id: str | None) -> SessionRecord | None:
        if session_id is None:
            record = self.store.load_newest(exclude={self.session_id})
            if record is None:
                logger.info("no saved session to view in %s", self.store.description)
            return record
        validate_session_id(session_id)
        try:
            return self.store.load(session_id)
        except (SessionNotFoundError, FileNotFoundError):
            logger.info("no saved session %s in %s", session_id, self.store.description)
            return None

    def resumed(self, writer: SessionWriterAPI, record: SessionRecord, t0: float) -> None:
        self.adopt(writer, record)
        self.repair_orphans()
        self.start_warmup()
        logger.info("resumed %s: %d turns, %d messages in %.1f ms", record.session_id, record.turns,
                    len(record.messages), (time.perf_counter() - t0) * 1000)
        if record.llm_model not in ("unknown", self.llm_model):
            logger.info("session %s was recorded with %s; continuing with %s", record.session_id,
                        record.llm_model, self.llm_model)

    def viewed(self, record: SessionRecord) -> bool:
        self.adopt(None, record, read_only=True)
        self.repair_orphans()
        self._stateless_id = record.session_id
        logger.info("opened %s read-only: %d turns", record.session_id, record.turns)
        return bool(self.conversation.messages)

    def clear(self) -> None:
        self.check_open("clear")
        # Created first: if this fails, nothing has changed.
        new = self.store.create(self.llm_model) if self.enable_cache else None
        if self.speaker is not None:
            self.speaker.cancel()
        old_key = self.cache_key
        self.adopt(new, None)
        with contextlib.suppress(TypeError):
            self.backend.reset_cache(cache_key=old_key)
        self._stateless_id = f"session_{int(time.time())}"

    def save_now(self) -> Path | str:
        if self.read_only is not None:
            raise SessionError(f"session {self.read_only.session_id} was opened read-only; it is not saved from here")
        if not self.enable_cache or self.writer is None:
            raise SessionError(
                "this session was created with enable_cache=False, so it keeps no history to "
                "save; create it with enable_cache=True to persist conversations")
        write_snapshot = getattr(self.writer, "write_snapshot", None)
        try:
            if self._pending_meta is not None or write_snapshot is None:
                # Nothing to append: an empty append makes the pending state durable.
                ok = self.writer.append(len(self.conversation.messages), [], self._pending_meta) \
                    if self._pending_meta is not None else self.writer.flush()
                self._pending_meta = None if ok else self._pending_meta
            if write_snapshot is not None:
                return write_snapshot()  # type: ignore[no-any-return,unused-ignore]
            if not self.writer.flush():
                raise SessionError(f"could not save {self.location}: {self.writer.last_error}")
            return self.location or self.session_id
        except OSError as exc:
            raise SessionError(
                f"could not save {self.location}: {exc.strerror or exc}; the conversation is kept in "
                "memory, free some space or fix the folder's permissions and save again") from exc

    # -- reports -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        writer = self.writer
        record = writer.record if writer is not None else self.read_only
        conv = self.conversation
        persisted = bool(writer is not None and getattr(writer, "persisted", getattr(writer, "has_file", False)))
        last_error = getattr(writer, "last_error", None) if writer is not None else None
        return {
            "session_id": self.session_id,
            "turns": conv.turns,
            "total_messages": len(conv.messages),
            "has_history_file": persisted or self.read_only is not None,
            "created_at": record.created_at if record else None,
            "updated_at": (record.updated_at or record.created_at) if record else None,
            "llm_model": self.llm_model,
            "backend": self.backend.name,
            "path": self.location if writer is not None or self.read_only else None,
            "store": self.store.description,
            "read_only": self.read_only is not None,
            "enable_cache": self.enable_cache,
            "system_prompt": conv.system_prompt,
            "memory": self.memory,
            "title": self.title,
            "summary": self.policy.summary_text() if isinstance(self.policy, SummaryPolicy) else None,
            "summarized_turns": self._summarized_turns(),
            "last_save_error": str(last_error) if last_error else None,
        }

    def _summarized_turns(self) -> int:
        if not isinstance(self.policy, SummaryPolicy) or self.policy.state is None:
            return 0
        covers = self.policy.state.covers
        return sum(1 for m in self.conversation.messages[:covers] if m["role"] == "user")

    def stats(self) -> dict[str, Any]:
        last = self.last
        conv = self.conversation
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
            "total_prompt_tokens": conv.figures.total_prompt,
            "total_cached_tokens": conv.figures.total_cached,
            "cache_hit_ratio": conv.figures.cache_hit_ratio,
            "trimmed_turns": conv.trimmed_turns,
            "interruptions": self.interruptions,
            "last_interrupted": last.interrupted if last else None,
            "last_heard_fraction": last.heard_fraction if last else None,
            "last_interrupt_to_silence_s": last.interrupt_to_silence_s if last else None,
        }
        try:
            stats.update(self.backend.cache_stats(cache_key=self.cache_key))
        except TypeError:  # a third-party backend without per-session figures
            stats.update(self.backend.cache_stats())
        stats["memory"] = self.memory
        if isinstance(self.policy, SummaryPolicy):
            summarized = self._summarized_turns()
            text = self.policy.summary_text()
            stats["summarized_turns"] = summarized
            stats["verbatim_turns"] = self.conversation.turns - sum(
                1 for m in self.conversation.messages[:self.policy.start] if m["role"] == "user")
            stats["summary_tokens"] = self.backend.count_tokens([{"role": "system", "content": text}]) if text else 0
            stats["compactions"] = self.policy.compactions
            stats["summary_error"] = self.policy.last_error
        stats["kv_persist"] = self.persist_kv_cache
        if self.persist_kv_cache:
            with contextlib.suppress(OSError):
                stats["kv_file_bytes"] = self.kv_path.stat().st_size
        stats.update(self.kv.stats)
        if self.warmup is not None:
            stats.update(self.warmup.stats)
        return stats

    # -- the end -------------------------------------------------------------------------
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stop_warmup()
        self.kv.flush(JOIN_TIMEOUT_S)
        try:
            if self.speaker is not None:
                self.speaker.close()
            if self.writer is not None:
                if self._pending_meta is not None:
                    with contextlib.suppress(Exception):
                        self.writer.append(len(self.conversation.messages), [], self._pending_meta)
                self.writer.close()
        finally:
            with contextlib.suppress(Exception):
                forget = getattr(self.backend, "forget", None)
                if forget is not None:
                    forget(self.cache_key)
            if self.owns_backend:
                self.backend.close()

    def _release_resources(self) -> None:
        if self.speaker is not None:
            self.speaker.close()
        if self.owns_backend:
            self.backend.close()


def core_setting(name: str, doc: str, check: Callable[[Any], Any] | None = None) -> Any:
    """A read-write attribute kept on the session's core (changeable between turns), checked
    by ``check`` when it is set, as the constructor checks it."""
    def set_(self: Any, value: Any) -> None:
        setattr(self._core, name, value if check is None else check(value))
    return property(lambda self: getattr(self._core, name), set_, doc=doc)


class SessionView:
    """What the sync and the async session show of their core, the same way: read without I/O
    and without the session's lock (each is one attribute read)."""

    _core: SessionCore

    def __init__(
        self,
        llm_model: str | os.PathLike[str] | None = None,
        *,
        backend: str | Backend = "llama-cpp",
        base_url: str | None = None,
        enable_cache: bool = True,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        tts_wait_timeout: float | None = 30.0,
        tts: Any = None,
        sessions_dir: str | os.PathLike[str] | None = None,
        system_prompt: str | None = None,
        max_tokens: int = 512,
        temperature: float = 0.7,
        backend_options: dict[str, Any] | None = None,
        persist_kv_cache: bool = True,
        kv_cache_max_bytes: int = KV_CACHE_MAX_BYTES,
        tts_output_dir: str | os.PathLike[str] | None = None,
        tts_options: dict[str, Any] | None = None,
        store: StoreAPI | str | None = None,
        memory: str = "trim",
        summarizer: Backend | None = None,
        durability: str | None = None,
        tools: Sequence[Callable[..., Any]] | None = None,
        max_tool_rounds: int = DEFAULT_TOOL_ROUNDS,
        encryption_key: bytes | str | os.PathLike[str] | None = None,
        approve: Callable[[dict[str, Any]], Any] | None = None,
        keystore: str | os.PathLike[str] | None = None,
    ):
        """The one signature of both sessions (the arguments: ``ConversationSession``'s docs)."""
        # Every argument, by name, into one frozen options object checked once (_options.py).
        given = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        self._core = SessionCore(SessionOptions(**given))
        self._init_driver()

    def _init_driver(self) -> None:
        """What the sync or the async driver adds to a new session (its locks)."""
        raise NotImplementedError

    enable_cache = property(lambda self: self._core.enable_cache)
    backend = property(lambda self: self._core.backend)
    llm_model = property(lambda self: self._core.llm_model)
    store = property(lambda self: self._core.store)
    persist_kv_cache = property(lambda self: self._core.persist_kv_cache)
    timeout = core_setting("timeout", "seconds a whole turn may take (None: no limit)", check_timeout)

    @property
    def session_id(self) -> str:
        return self._core.session_id

    @property
    def durability(self) -> str:
        """What a turn survives once returned: ``"process"`` or ``"power"`` (docs/durability.md)."""
        return self._core.durability

    @property
    def history(self) -> list[MessageDict]:
        """A copy of the kept conversation (completed turns only)."""
        return [dict(m) for m in self._core.conversation.messages]  # type: ignore[misc]

    @property
    def turns(self) -> int:
        return self._core.conversation.turns

    @property
    def tools(self) -> list[Any]:
        """The session's tools (``Tool`` objects), offered to the model on every turn."""
        return list(self._core.tools.values())

    @property
    def title(self) -> str | None:
        """The session's name (``set_title()``), or None."""
        return self._core.title

    @property
    def path(self) -> Path | str | None:
        """Where the session is saved (a file for the file store)."""
        store_path = getattr(self._core.store, "snapshot_path", None)
        return store_path(self.session_id) if store_path is not None else self._core.location

    @property
    def _writer(self) -> Any:  # for tests that look at the store writer
        return self._core.writer

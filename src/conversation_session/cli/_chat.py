"""The chat: the seed's ``python main.py`` and its commands, piped line by line, or one-shot.

Three modes, chosen by what the app is connected to:

* interactive (stdin and stdout are terminals): prompt_toolkit prompt, colour, spinner;
* piped (no PROMPT, stdin not a terminal): one message or command per line, replies on
  stdout, everything else on stderr, exit status 1 if any turn failed, 130 on Ctrl-C;
* one-shot (a PROMPT on the command line): answer it (with piped stdin added) and exit.

Barge-in (interactive, with speech on): the reply is streamed through ``session.stream()`` in a
worker thread, and the prompt comes back as soon as the text is complete, while it is still
being spoken.  Pressing Ctrl-C, or typing anything at that prompt, interrupts it
(``turn.interrupt()``): the speech stops and the reply is kept cut to what was spoken, marked
interrupted; the typed text is the next message.  With speech off (or piped), Ctrl-C during a
reply keeps the seed's meaning: the reply is stopped and nothing of it is kept.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .. import ConversationSession
from .._exceptions import SessionError, SessionLockedError, SessionTimeoutError, TTSTimeoutError
from .._result import ChatResult
from ..backends import Backend, FakeBackend
from ..session._limits import check_max_tokens, parse_timeout
from ..session._turn import Turn
from ..tools import readable
from ..tools._builtin import builtin_tools, tools_from_file
from ._args import store_from
from ._commands import SETTINGS, Command, command_help, parse_line
from ._confirm import NotConfirmed, confirm
from ._console import Console, ConsoleLogHandler
from ._export import PlaintextNeeded, write_export
from ._listing import NothingDeleted, delete_saved, search_lines, session_table
from ._models import find_local_model, list_models, print_models
from ._prompt import make_prompt
from ._text import escape_controls, format_bytes, printable

__all__ = ["ChatApp", "backend_options"]

logger = logging.getLogger("conversation_session.cli")

# What the library logs when it trims the prompt; the app says it in its own notice instead.
_TRIM_LOG_TEXT = "left out of the prompt"
_HINT_FILE = ".last_hint"
_CHECK_TIMEOUT_S = 5.0
_SEARCH_LIMIT = 20       # hits /search prints (the command has --limit)
_MODEL_LIST_TIMEOUT_S = 2.0  # Tab after `/model `: a stuck server must not freeze the prompt
# How long a barge-in waits for the turn to be committed (speech stops within milliseconds;
# the bound only keeps a stuck speech engine from hanging the prompt).
_BARGE_WAIT_S = 10.0

# Sampling flags -> the backend keyword that takes them (first one the backend accepts).
_SAMPLING = {"seed": ("seed",), "top_p": ("top_p",), "top_k": ("top_k",),
             "repeat_penalty": ("repeat_penalty",), "threads": ("n_threads", "num_thread", "threads"),
             "kv_type": ("kv_cache_type",)}
_CONTEXT_KEY = {"llama-cpp": "n_ctx", "ollama": "num_ctx", "openai": "context_length", "fake": "context_length"}


def _backend_params(name: str) -> set[str] | None:
    """Keyword arguments the backend's constructor takes (None: any, or unknown)."""
    try:
        if name == "llama-cpp":
            from ..backends._llama_cpp import LlamaCppBackend as cls
        elif name == "ollama":
            from ..backends._ollama import OllamaBackend as cls  # type: ignore[assignment]
        elif name == "openai":
            from ..backends._openai import OpenAIBackend as cls  # type: ignore[assignment]
        else:
            from ..backends import FakeBackend as cls  # type: ignore[assignment]
    except ImportError:
        return None  # creating it will say what is missing
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def backend_options(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """``backend_options`` for the chosen backend, and the flags it does not take (ignored)."""
    options: dict[str, Any] = {}
    if args.context_length is not None:
        options[_CONTEXT_KEY.get(args.backend, "context_length")] = args.context_length
    wanted = {flag: getattr(args, flag, None) for flag in _SAMPLING}
    if not any(v is not None for v in wanted.values()):
        return options, []
    params = _backend_params(args.backend)
    ignored = []
    for flag, value in wanted.items():
        if value is None:
            continue
        key = next((k for k in _SAMPLING[flag] if params is None or k in params), None)
        if key is None:
            ignored.append("--" + flag.replace("_", "-"))
        else:
            options[key] = value
    return options, ignored


def _where(store: Any) -> str:
    return str(getattr(store, "description", None) or getattr(store, "directory", "") or "the store")


def _state_dir(store: Any) -> Path | None:
    """Where the app keeps its own small files (input history, the hint marker): the sessions
    folder, or for a store without one (PostgreSQL) a per-user folder named after the store."""
    directory = getattr(store, "directory", None)
    if directory is not None:
        return Path(directory)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    if not os.path.isabs(base):
        return None
    key = hashlib.sha256(_where(store).encode()).hexdigest()[:16]
    return Path(base) / "conversation-session" / key


def _session_ids(store: Any) -> list[str]:
    """Saved session ids, newest first, without loading them."""
    try:
        if hasattr(store, "newest_first"):
            return list(store.newest_first())
        return [sid for _mtime, sid in store.candidates()]
    except (OSError, SessionError):
        return []


def _skipped_text(held: list[tuple[str, SessionLockedError]]) -> str:
    """Why newer sessions were passed over by ``-c``: who holds the newest of them."""
    if not held:
        return ""
    sid, exc = held[0]
    more = f" (and {len(held) - 1} more in use)" if len(held) > 1 else ""
    return f"; the newer {sid} is open in {_holder(exc.holder)}{more}"


def _holder(holder: str | None) -> str:
    """``the session service (process 4242)`` or ``process 4243 (python main.py)``."""
    from ..service._handoff import holder_pid, is_worker
    from ..stores._fileio import process_label

    pid = holder_pid(holder)
    if pid is None:
        return f"another process ({holder})" if holder else "another process"
    if pid == os.getpid():
        return "this process"
    if is_worker(pid):
        return f"the session service (process {pid})"
    label = process_label(pid)
    return f"process {pid}" + (f" ({label})" if label else "")


def describe(call: dict[str, Any]) -> str:
    """A call of ``ChatResult.tool_calls`` (or of ``approve``) as one line: ``name(k=v, ...)``."""
    return f"{call['name']}({', '.join(f'{k}={v!r}' for k, v in call['arguments'].items())})"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or minimal stream
        return False


def _is_current_model(session: ConversationSession, name: str) -> bool:
    """``/model NAME`` names the model in use: its name, or (embedded) its file by any path."""
    if name == session.llm_model:
        return True
    current = getattr(session.backend, "path", None)
    if current is None:
        return False
    try:
        return os.path.samefile(Path(name).expanduser(), current)
    except (OSError, ValueError):
        return False


@dataclass
class _Spoken:
    """A reply being generated and spoken by a worker thread (see the module docstring)."""

    turn: Turn
    text_done: threading.Event = field(default_factory=threading.Event)   # generation over
    done: threading.Event = field(default_factory=threading.Event)        # committed, notices said
    generation_error: BaseException | None = None
    barged: bool = False
    thread: threading.Thread | None = None
    barge_thread: threading.Thread | None = None

    @property
    def speaking(self) -> bool:
        return self.text_done.is_set() and not self.done.is_set()


class ChatApp:
    """One run of the chat (see the module docstring for the modes).

    ``backend`` replaces the one ``--backend`` names (tests pass a ``FakeBackend``), and
    ``summarizer`` the backend that writes summaries with ``--memory summary`` (default: the
    chat's own).
    """

    def __init__(self, args: argparse.Namespace, *, stdin: TextIO | None = None,
                 stdout: TextIO | None = None, stderr: TextIO | None = None,
                 interactive: bool | None = None, backend: Backend | None = None,
                 summarizer: Backend | None = None):
        self.args = args
        self.summarizer = summarizer
        self.stdin = stdin or sys.stdin
        self.one_shot = bool(getattr(args, "prompt", None))
        if interactive is None:
            interactive = not self.one_shot and self.stdin.isatty() and (stdout or sys.stdout).isatty()
        self.interactive = interactive
        # Notices share the screen with replies on a terminal; piped, they go to stderr.
        self.console = Console(stdout, stdout if interactive else (stderr or sys.stderr),
                               tty=None if interactive else False)
        self.backend = backend
        self.session: ConversationSession | None = None
        self.verbose = bool(getattr(args, "verbose", False))
        self.markdown = bool(getattr(args, "markdown", True))
        self._prompt: Callable[[str], str] | None = None
        self._approved: set[str] = set()  # the ids of the calls --approve let run
        self._interrupts = 0
        self._failed = False              # a turn failed: piped and one-shot runs exit 1
        self._interrupted_piped = False   # Ctrl-C ended a piped or one-shot run: exit 130
        self._trimmed_seen = 0
        self._log_handler = ConsoleLogHandler(self.console, interactive=interactive)
        self._log_handler.drop.append(_TRIM_LOG_TEXT)
        self.summary: dict[str, Any] | None = None  # the session's summary, once run() ends
        self._spoken: _Spoken | None = None        # the last spoken reply, until it is settled
        self._barge_lock = threading.Lock()
        self._highlight: Any = False               # code highlighter: not looked for yet
        self._models_cache: list[str] | None = None  # the backend's models, for Tab after /model

    # -- set-up ----------------------------------------------------------------------------
    def _route_logging(self) -> None:
        """Library log lines go through the console (never over the spinner or a reply)."""
        log = logging.getLogger("conversation_session")
        for h in list(log.handlers):
            if type(h) is logging.StreamHandler and getattr(h, "_conversation_session", False):
                self._log_handler.setFormatter(h.formatter)
                self._log_handler.setLevel(h.level)
                log.removeHandler(h)
        self._log_handler._conversation_session = True  # type: ignore[attr-defined]
        if not log.handlers or self._log_handler not in log.handlers:
            log.addHandler(self._log_handler)
            log.propagate = False

    def _open_session(self, args: argparse.Namespace | None = None, **settings: Any) -> ConversationSession:
        """A session built from the flags (``args``: other flags, as ``/model`` makes);
        ``settings`` override the flags' system prompt, temperature, ... (carried over by ``/model``)."""
        a = args or self.args
        tts = None if a.tts == "none" else a.tts
        options, ignored = backend_options(a)
        for flag in ignored:
            self.console.notice(f"{flag} is not supported by the {a.backend} backend; ignored", "yellow")
        what = "the bundled model" if a.backend == "llama-cpp" and not a.model else (a.model or a.backend)
        extra: dict[str, Any] = {}
        if getattr(a, "kv_cache_max", None) is not None:
            extra["kv_cache_max_bytes"] = a.kv_cache_max
        self.console.start_spinner(f"loading {what}…")
        try:
            chosen = {"timeout": a.timeout, "system_prompt": a.system, "max_tokens": a.max_tokens,
                      "temperature": a.temperature, **settings}
            tools = self._tools(a)
            backend: Any = self.backend or a.backend
            if backend == "fake" and tools:
                # The fake model follows the !call convention, so tools can be tried without a model.
                backend = FakeBackend(**options, script_calls=True)
            return ConversationSession(
                a.model, backend=backend, base_url=a.base_url,
                tts_wait_timeout=a.tts_wait_timeout, tts=tts, store=store_from(a), **chosen,
                backend_options=options, tts_output_dir=a.tts_output_dir,
                tts_options={k: v for k, v in (("rate", a.tts_rate), ("voice", a.tts_voice),
                                               ("playback", getattr(a, "tts_playback", None))) if v is not None},
                persist_kv_cache=a.persist_kv, memory=getattr(a, "memory", "trim"),
                summarizer=self.summarizer, durability=getattr(a, "durability", None),
                tools=tools, approve=self._approve if getattr(a, "approve", False) else None,
                encryption_key=getattr(a, "key_file", None), keystore=getattr(a, "keystore", None), **extra,
            )
        finally:
            self.console.stop_spinner()

    def _approve(self, call: dict[str, Any]) -> bool | str:
        """``--approve``: y/N on the terminal before a call that is not idempotent; piped, no."""
        if not self.interactive:
            return "no terminal to ask on (--approve refuses such calls when piped)"
        c = self.console
        c.stop_spinner()
        c.end_line()
        assert self._prompt is not None
        go = confirm(f"🔧 run {describe(call)}?", yes=False, terminal=True, ask=self._prompt)
        if go:
            self._approved.add(call["id"])
        return go or "the user answered no"

    @staticmethod
    def _tools(a: argparse.Namespace) -> list[Any]:
        """The tools the flags offer (``--tool``, ``--tools-file``); ValueError names a bad file."""
        tools = builtin_tools(getattr(a, "tools", None))
        if getattr(a, "tools_file", None):
            tools += tools_from_file(a.tools_file)
        return tools

    def _check_backend(self, session: ConversationSession) -> bool:
        """Fail at start, in a few seconds, if the backend cannot serve (not at the first message)."""
        timeout = min(_CHECK_TIMEOUT_S, self.args.timeout or _CHECK_TIMEOUT_S)
        self.console.start_spinner(f"connecting to {session.backend.name}…")
        try:
            session.backend.check(timeout)
        except SessionError as exc:  # BackendError, ModelNotFoundError
            self.console.error(str(exc))
            return False
        finally:
            self.console.stop_spinner()
        return True

    def _make_prompt(self) -> Callable[[str], str]:
        if not self.interactive:
            def read(prompt: str) -> str:
                line = self.stdin.readline()
                if not line:
                    raise EOFError
                return line.rstrip("\r\n")
            return read

        assert self.session is not None
        # Through self.session each time: `/model` replaces the session (and its store object).
        # With a key, the lines typed are not written to disk either (docs/encryption.md).
        history_dir = None if getattr(self.session.store, "encrypted", False) else _state_dir(self.session.store)
        return make_prompt(history_dir, lambda: _session_ids(self._current().store),
                           on_typing=self._on_typing, model_names=self._model_names)

    def _model_names(self) -> list[str]:
        """What `/model ` completes to: the backend's models, asked once (a failure: none)."""
        if self._models_cache is None:

            a = self.args
            try:
                entries = list_models(a.backend, base_url=a.base_url, model=a.model, timeout=_MODEL_LIST_TIMEOUT_S)
            except SessionError as exc:
                logger.debug("no model names to complete: %s", exc)
                entries = []
            self._models_cache = [e.name for e in entries]
        return self._models_cache

    def _current(self) -> ConversationSession:
        assert self.session is not None
        return self.session

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        c = self.console
        self._route_logging()
        try:
            self.session = self._open_session()
        except (SessionError, ValueError) as exc:
            c.error(str(exc))
            return 1
        status = 0
        session = self.session
        try:
            if not self._check_backend(session) or not self._start(session):
                return 1
            if self.one_shot:
                status = self._one_shot()
            else:
                self._prompt = self._make_prompt()
                try:
                    status = self._loop()
                except KeyboardInterrupt:
                    # A Ctrl-C outside a reply and outside the prompt (say, while a hint prints)
                    # means the user is pressing it repeatedly: leave, cleanly, like the second one.
                    if self.interactive:
                        c.line()
                    status = 0 if self.interactive else 130
                finally:
                    self._settle()  # leaving while a reply is spoken: stop it, keep what was heard
            session = self._current()  # `/model` may have replaced it
            summary = self.summary = session.get_history_summary()
        finally:
            self._current().close()
        if summary["turns"] and not self.one_shot:
            c.notice(f"👋 saved {summary['turns']} turn(s) in {summary['path']}", "dim")
        if status == 0 and self._failed and not self.interactive:
            status = 1
        return status

    def _one_shot(self) -> int:
        text = " ".join(self.args.prompt)
        if not self.stdin.isatty():
            piped = self.stdin.read()
            if piped.strip():
                text = f"{text}\n\n{piped}"
        try:
            self._turn(text)
        except KeyboardInterrupt:
            return 130
        if self._interrupted_piped:
            return 130
        return 1 if self._failed else 0

    def _loop(self) -> int:
        """Read and run lines until quit or end of input; returns the exit status."""
        c = self.console
        assert self._prompt is not None
        while True:
            try:
                text, is_message = self._read()
            except EOFError:
                if self.interactive:
                    c.line()
                return 0
            except KeyboardInterrupt:
                if not self.interactive:
                    return 130  # piped: nobody to return to; completed turns are saved
                if self._spoken is not None and self._spoken.speaking:
                    self._settle()  # Ctrl-C while the reply is being spoken: a barge-in
                    continue
                self._interrupts += 1
                if self._interrupts >= 2:
                    c.line()
                    return 0
                c.notice("(Ctrl-C again, Ctrl-D or `quit` to leave)", "dim")
                continue
            self._interrupts = 0
            if text.strip():
                self._settle()  # typed while the last reply was spoken: it was a barge-in
            try:
                go_on = self._turn(text) if is_message else self._handle(text)
            except KeyboardInterrupt:
                if not self.interactive:
                    return 130
                raise
            if not go_on:
                return 130 if self._interrupted_piped else 0

    def _read(self) -> tuple[str, bool]:
        """One input: ``(text, is_message)``.  A line starting with triple quotes begins a
        message of several lines, up to the line ending with them (as in ``ollama run``)."""
        assert self._prompt is not None
        line = self._prompt("💬 您: " if self.interactive else "")
        if "\n" in line:  # Alt-Enter made it several lines: a message
            return line, True
        start = line.lstrip()
        if not start.startswith('"""'):
            return line, False
        body = start[3:]
        if body.rstrip().endswith('"""'):
            return body.rstrip()[:-3], True
        parts = [body]
        while True:
            try:
                more = self._prompt("... " if self.interactive else "")
            except EOFError:
                break
            if more.rstrip().endswith('"""'):
                parts.append(more.rstrip()[:-3])
                break
            parts.append(more)
        return "\n".join(parts).strip("\n"), True

    def _start(self, session: ConversationSession) -> bool:
        c = self.console
        a = self.args
        if a.resume is not None:
            skipped: list[tuple[str, SessionLockedError]] = []
            try:
                if a.resume:
                    resumed = session.load_history(a.resume)
                else:
                    resumed, skipped = self._continue_latest(session)
            except (SessionError, ValueError) as exc:
                c.error(str(exc))
                return False
            why = _skipped_text(skipped)
            if resumed:
                if not self.one_shot:
                    c.notice(f"✅ resumed {session.session_id}: {session.turns} turn(s){why}", "green")
                elif skipped:  # a script continuing "the latest" gets an older one: say so
                    c.notice(f"continuing {session.session_id} ({session.turns} turn(s)){why}", "yellow")
                self._trimmed_seen = 0
            elif a.resume:
                c.error(f"no saved session {a.resume} in {_where(session.store)}")
                return False
            elif not self.one_shot or skipped:
                c.notice(f"No saved session to resume{why}; starting a new one, {session.session_id}.",
                         "yellow" if skipped else "dim")
        if self.interactive:
            c.notice(f"conversation-session · {session.backend.name} · {session.llm_model} · "
                     f"session {session.session_id}", "bold")
            c.notice("Type a message, or `help` for commands.", "dim")
        if a.resume is None and not self.one_shot:
            self._hint_earlier(session)
        return True

    @staticmethod
    def _continue_latest(session: ConversationSession) -> tuple[bool, list[tuple[str, SessionLockedError]]]:
        """``-c``: the newest saved session that has turns and can be opened, and the newer ones
        passed over because another process holds them (the service, another chat), so the
        user is told which session goes on and why not the newest."""
        held: list[tuple[str, SessionLockedError]] = []
        for sid in _session_ids(session.store):
            if sid == session.session_id:
                continue
            try:
                if session.load_history(sid):
                    return True, held
            except SessionLockedError as exc:
                held.append((sid, exc))
            except (SessionError, ValueError) as exc:  # damaged: said, and the next one is tried
                logger.warning("skipping session %s: %s", sid, exc)
        return False, held

    def _hint_earlier(self, session: ConversationSession) -> None:
        """Say that an earlier session exists, once per earlier session (not at every start)."""
        store = session.store
        directory = _state_dir(store)
        marker = directory / _HINT_FILE if directory is not None else None
        newest_id = next((sid for sid in _session_ids(store) if sid != session.session_id), None)
        if newest_id is None:
            return
        try:
            if marker is not None and marker.read_text(encoding="utf-8").strip() == newest_id:
                return
        except (OSError, UnicodeDecodeError):
            pass
        newest = store.load_newest(exclude={session.session_id})
        if newest is None:
            return
        self.console.notice(f"An earlier session exists: {newest.session_id} ({newest.turns} turn(s), "
                            f"updated {newest.updated_at}). Continue it with `/resume {newest.session_id}`"
                            " or start with -c.", "dim")
        if marker is not None:
            try:
                marker.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                marker.write_text(newest.session_id + "\n", encoding="utf-8")
                marker.chmod(0o600)
            except OSError as exc:
                logger.debug("cannot remember the hint in %s: %s", marker, exc)

    def _handle(self, line: str) -> bool:
        """Run one input line; False to quit."""
        session = self.session
        assert session is not None
        parsed = parse_line(line, lambda sid: sid in _session_ids(session.store))
        if parsed.kind == "empty":
            return True
        if parsed.kind == "unknown":
            self.console.error(f"unknown command {parsed.text}; type help (a leading \\ sends it as a message)")
            return True
        if parsed.kind == "message":
            return self._turn(parsed.text)
        assert parsed.command is not None
        return self._command(parsed.command, parsed.arg)

    def _turn(self, text: str, *, retry: bool = False) -> bool:
        """Send one message and show the reply; False to stop (Ctrl-C when piped).  ``retry``:
        ask the last user message again (``text`` unused); the new reply replaces the last one."""
        c = self.console
        session = self.session
        assert session is not None
        if not retry and not text.strip():
            return True
        if self.interactive:
            c.start_spinner("thinking…")
        started = False
        shown: list[str] = []  # the reply as streamed, for rendering it as Markdown afterwards
        # One-shot into a pipe or a file: the reply is written once it is complete, so a turn
        # that fails (timeout, Ctrl-C, server error) leaves nothing on stdout for the script.
        withhold = self.one_shot and not _is_tty(c.out)

        def on_token(piece: str) -> None:
            nonlocal started
            if withhold:
                shown.append(piece)
                return
            if not started:
                c.stop_spinner()
                if self.interactive:
                    c.write(c.style("🤖 ", "cyan"))
                started = True
            c.reply(piece)
            shown.append(piece)

        turns_before = session.turns
        tail_before = session.history[-1:]
        result: ChatResult | None = None
        tts_note = ""
        spoken = self.interactive and session.tts is not None
        c.hold()
        try:
            if spoken:
                if self._speak(session, text, on_token, retry=retry):  # cut by Ctrl-C while being written
                    c.stop_spinner()
                    self._end_reply(started)
                    c.release()
                    return True
            elif retry:
                result = session.retry(on_token=on_token)
            else:
                result = session.chat(text, on_token=on_token)
        except KeyboardInterrupt:
            c.stop_spinner()
            self._end_reply(started)
            c.release()
            if session.turns > turns_before or (retry and session.history[-1:] != tail_before):
                # the text was complete: Ctrl-C stopped its speech
                c.notice(self._interrupted_text(session.get_cache_stats().get("last_heard_fraction")), "yellow")
            else:
                c.notice("⏹️  interrupted: this reply was not saved"
                         + ("; the previous one stays" if retry else ""), "yellow")
            if not self.interactive:
                self._interrupted_piped = True
                return False
            return True
        except TTSTimeoutError as exc:  # the turn is complete and saved; only speech was cut
            tts_note = f"🔇 speech stopped after {exc.timeout:g} s (--tts-wait-timeout); the reply is saved"
            result = exc.result
        except SessionTimeoutError as exc:
            c.stop_spinner()
            self._end_reply(started)
            c.release()
            c.notice(self._timeout_text(session, exc.timeout, started), "yellow")
            self._failed = True
            return True
        except SessionError as exc:  # BackendError included
            c.stop_spinner()
            self._end_reply(started)
            c.release()
            c.error(str(exc))
            self._failed = True
            return True
        finally:
            c.stop_spinner()
        if withhold and shown:
            c.reply("".join(shown))
            started = True
        if not started and self.interactive:
            c.write(c.style("🤖 (empty reply)", "dim"))
        elif self.interactive and self.markdown:
            self._render_markdown("".join(shown))
        if started or self.interactive:
            c.write("\n")
        c.release()
        if spoken:
            return True  # still being spoken: the worker reports the end (_spoken_done)
        if tts_note:
            c.notice(tts_note, "yellow")
        assert result is not None
        self._after_reply(session, result)
        return True

    def _timeout_text(self, session: ConversationSession, timeout: float | None, started: bool) -> str:
        after = f"{timeout:g} s" if timeout is not None else "the time limit"
        if self.one_shot:
            # The process is exiting: say what was saved and how to go on, not "carry on".
            earlier = (f"; session {session.session_id} keeps its {session.turns} earlier turn(s) "
                       f"(--resume {session.session_id} continues it)" if session.turns else "")
            return f"⏱️  timed out after {after} (--timeout): no reply, nothing of it saved{earlier}"
        kept = "the partial reply above was not kept; " if started else ""
        return f"⏱️  timed out after {after}; {kept}the conversation so far is kept, carry on"

    # -- a spoken reply: barge-in ----------------------------------------------------------
    def _speak(self, session: ConversationSession, text: str, on_token: Callable[[str], None], *,
               retry: bool = False) -> bool:
        """Start a spoken reply in a worker thread and wait until its text is complete (the
        speech goes on while the prompt is back).  True if Ctrl-C cut it while it was being
        written (a barge-in: what was already spoken is kept).  Raises what ``chat()`` raises
        for a failure while generating (timeout, backend error)."""
        self._settle()
        sp = _Spoken(session.stream_retry(on_token=on_token) if retry else session.stream(text, on_token=on_token))
        self._spoken = sp
        sp.thread = threading.Thread(target=self._speak_worker, args=(session, sp), name="spoken-reply",
                                     daemon=True)
        sp.thread.start()
        try:
            while not sp.text_done.wait(0.05):
                pass
        except KeyboardInterrupt:
            self._barge_in(sp)
            return True
        if sp.generation_error is not None:
            self._join(sp)
            raise sp.generation_error
        return False

    def _speak_worker(self, session: ConversationSession, sp: _Spoken) -> None:
        try:
            try:
                for _ in sp.turn:
                    pass
            except BaseException as exc:  # noqa: BLE001 - handed to the chat thread, which reports it
                sp.generation_error = exc
                return
            finally:
                sp.text_done.set()
            note = ""
            try:
                result = sp.turn.result()  # waits for the speech to end (or be interrupted)
            except TTSTimeoutError as exc:
                note = f"🔇 speech stopped after {exc.timeout:g} s (--tts-wait-timeout); the reply is saved"
                result = exc.result
            except SessionError as exc:
                self.console.error(str(exc))
                self._failed = True
                return
            self._spoken_done(session, result, note)
        except Exception:  # a failure in this thread must be seen, not lost
            logger.exception("the spoken reply failed")
        finally:
            sp.done.set()

    def _spoken_done(self, session: ConversationSession, result: ChatResult | None, note: str) -> None:
        """The end of a spoken reply (from the worker: notices print above the prompt)."""
        c = self.console
        if result is None:
            return
        if result.interrupted:
            c.notice(self._interrupted_text(result.heard_fraction if result.response else 0.0), "yellow")
            if not result.response:
                return  # nothing kept: no turn to report on
        if note:
            c.notice(note, "yellow")
        self._after_reply(session, result)

    @staticmethod
    def _interrupted_text(fraction: float | None) -> str:
        if not fraction:
            return "⏹️  interrupted before any of the reply was heard: nothing of it was kept"
        return f"⏹️  interrupted — kept what was spoken ({fraction:.0%})"

    def _barge_in(self, sp: _Spoken) -> None:
        """Interrupt the reply (once) and wait until it is committed and reported."""
        with self._barge_lock:
            if sp.barged or sp.done.is_set():
                return
            sp.barged = True
        try:
            sp.turn.interrupt()  # the speaker's playback clock says what was heard
        except SessionError:
            pass  # the turn had failed meanwhile: its worker reports how
        try:
            sp.done.wait(_BARGE_WAIT_S)
        except KeyboardInterrupt:
            pass

    def _on_typing(self) -> None:
        """A key at the prompt while the last reply is still spoken: barge in.  Off the prompt's
        own thread, so typing never waits for the speech to stop."""
        sp = self._spoken
        if sp is None or not sp.speaking or sp.barged or sp.barge_thread is not None:
            return
        sp.barge_thread = threading.Thread(target=self._barge_in, args=(sp,), name="barge-in", daemon=True)
        sp.barge_thread.start()

    def _join(self, sp: _Spoken) -> None:
        for thread in (sp.barge_thread, sp.thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(_BARGE_WAIT_S)
        if self._spoken is sp:
            self._spoken = None

    def _settle(self) -> None:
        """Before the next input is acted on: a reply still being spoken is interrupted (the
        user has moved on), and its worker has finished and said how it ended."""
        sp = self._spoken
        if sp is None:
            return
        if not sp.done.is_set():
            self._barge_in(sp)
        self._join(sp)

    def _render_markdown(self, reply: str) -> None:
        """Rewrite the streamed reply in place with its Markdown styled (terminals only)."""
        from ._markdown import looks_like_markdown, pygments_highlighter, render_markdown

        if "\t" in reply or not looks_like_markdown(reply):
            return  # a tab's width is the terminal's to choose: the rows cannot be counted
        c = self.console
        text = escape_controls(reply)
        if self._highlight is False:
            self._highlight = pygments_highlighter()  # once: None when Pygments is not installed
        c.rewrite("🤖 " + text, c.style("🤖 ", "cyan") + render_markdown(text, c.style, self._highlight or None))

    def _end_reply(self, started: bool) -> None:
        """End the line of a reply cut short (the notice that follows goes on its own line)."""
        if started:
            self.console.write("\n")

    def _after_reply(self, session: ConversationSession, result: ChatResult) -> None:
        c = self.console
        for call in result.tool_calls:  # one line each, where notices go (stderr when piped)
            done = call.get("result", call.get("error", ""))
            mark = " ✓ approved" if call["id"] in self._approved else ""
            c.notice(printable(f"🔧 {describe(call)}{mark} → {' '.join(str(done).split())[:200]}",
                               keep_newlines=False), "dim")
        if result.finish_reason == "length":
            c.notice(f"✂️  the reply reached the {session.max_tokens}-token limit (--max-tokens) and was cut",
                     "dim")
        if result.trimmed_turns > self._trimmed_seen:
            memory = session.get_history_summary()
            summarized = memory["summarized_turns"] if memory["memory"] == "summary" else 0
            if summarized >= result.trimmed_turns:
                c.notice(f"🧠 the oldest {summarized} turn(s) are now carried by a running summary "
                         "(`memory` shows it; they stay saved)", "dim")
            else:
                folded = "" if memory["memory"] != "summary" else (
                    f"; {summarized} of them are in the running summary so far" if summarized else
                    "; the running summary that will carry them is not ready yet")
                c.notice(f"ℹ️  the conversation no longer fits the context window: the oldest "
                         f"{result.trimmed_turns} turn(s) are left out of what the model sees (they stay saved)"
                         + folded, "dim")
        self._trimmed_seen = result.trimmed_turns
        if not result.saved and session.enable_cache:
            c.notice("⚠️  this turn could not be saved to disk (see the log); it is kept in memory and "
                     "will be saved with the next one", "yellow")
        if self.verbose:
            self._show_timing(result)

    def _show_timing(self, r: ChatResult) -> None:
        """``ollama run --verbose``: durations, token counts and rates of the reply."""
        rows = [("total duration", f"{r.total_s:.3f} s")]
        if r.prompt_tokens is not None:
            computed = r.prompt_tokens - (r.cached_tokens or 0)
            rows.append(("prompt tokens", f"{r.prompt_tokens} ({r.cached_tokens or 0} from the KV cache, "
                                          f"{computed} computed)"))
            if r.ttft_s:
                rows.append(("prompt eval duration", f"{r.ttft_s:.3f} s (to the first token)"))
                rows.append(("prompt eval rate", f"{computed / r.ttft_s:.1f} tokens/s"))
        if r.completion_tokens is not None:
            rows.append(("eval count", f"{r.completion_tokens} token(s)"))
        if r.ttft_s is not None:
            rows.append(("eval duration", f"{r.total_s - r.ttft_s:.3f} s"))
        if r.tokens_per_s is not None:
            rows.append(("eval rate", f"{r.tokens_per_s:.1f} tokens/s"))
        for name, value in rows:
            self.console.notice(f"{name + ':':<22}{value}", "dim")

    # -- commands --------------------------------------------------------------------------
    def _command(self, command: Command, arg: str) -> bool:
        """Run one command; False ends the chat.  One handler per command (``_HANDLERS``)."""
        session = self.session
        assert session is not None
        go_on = _HANDLERS[command.name](self, session, arg)
        return go_on is not False

    def _help(self, session: ConversationSession, arg: str) -> None:
        self.console.line("Commands (a word alone on its line, or with a leading slash: /history):")
        self.console.line(command_help())

    def _clear(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        old = session.session_id
        had = session.turns
        try:
            session.clear_history()
        except SessionError as exc:
            c.error(str(exc))
            return
        self._trimmed_seen = 0
        c.notice(f"🧹 new session {session.session_id}"
                 + (f" (the previous one, {old}, is saved)" if had else ""), "green")

    # -- /undo, /retry, /title ------------------------------------------------------------
    def _undo(self, session: ConversationSession) -> None:
        c = self.console
        history = session.history
        try:
            undone = session.undo()
        except SessionError as exc:  # the store could not record it: nothing changed
            c.error(str(exc))
            return
        if not undone:
            c.error("nothing to undo: this session has no turn yet")
            return
        asked = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
        line = printable(" ".join(asked.split()), keep_newlines=False)
        c.notice(f"↩️  withdrew the last turn ({line[:50]}{'…' if len(line) > 50 else ''}); "
                 f"{session.turns} turn(s) left. The file keeps it in its undone list.", "green")

    def _retry(self, session: ConversationSession) -> bool:
        if not any(m["role"] == "assistant" for m in session.history):
            self.console.error("nothing to retry: this session has no reply yet")
            return True
        self.console.notice("🔁 asking the last message again; the new reply replaces the last one", "dim")
        return self._turn("", retry=True)

    def _title(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        if not arg.strip():
            title = session.title
            c.line(f"   title: {printable(title, keep_newlines=False)}" if title else
                   "   no title (listings show the first line); `/title TEXT` sets one")
            return
        try:
            saved = session.set_title(arg)
        except (SessionError, ValueError) as exc:
            c.error(str(exc))
            return
        title = printable(session.title or "", keep_newlines=False)
        c.notice(f"🏷️  title: {title}" + ("" if saved else " (saved with the first turn)"), "green")

    # -- /model and /models ----------------------------------------------------------------
    def _list_models(self, session: ConversationSession) -> None:

        c = self.console
        a = self.args
        self.console.start_spinner("asking for the model list…")
        try:
            entries = list_models(a.backend, base_url=a.base_url, model=a.model)
        except SessionError as exc:
            c.error(str(exc))
            return
        finally:
            c.stop_spinner()
        print_models(entries, session.llm_model, c.line)

    def _switch_model(self, session: ConversationSession, arg: str) -> None:
        """Go on with the same conversation on another model: a new session object on the new
        model takes over the session (``load_history`` of the same id).  The new model is built
        and checked first, so a bad name leaves the current one in place, working."""
        c = self.console
        name = arg.strip()
        if not name:
            c.line(f"   model: {session.llm_model} ({session.backend.name}); `/model NAME` switches, "
                   "`/models` lists what the backend offers")
            return
        a = self.args
        if a.backend == "llama-cpp":

            name = find_local_model(name, a.model)
        if _is_current_model(session, name):
            # Loading it again would cost the load time and the KV cache for nothing.
            c.notice(f"{session.llm_model} is already in use; nothing to switch", "dim")
            return
        if self.backend is not None:
            c.error("this app was given its backend object; the model cannot be switched")
            return
        new_args = argparse.Namespace(**vars(a))
        new_args.model = name
        settings = {"system_prompt": session.system_prompt, "temperature": session.temperature,
                    "max_tokens": session.max_tokens, "timeout": session.timeout}
        try:
            new = self._open_session(new_args, **settings)
        except (SessionError, ValueError, OSError) as exc:
            c.error(f"cannot switch to {name}: {exc}; still on {session.llm_model}")
            return
        if not self._check_backend(new):
            new.close()
            c.notice(f"still on {session.llm_model}", "yellow")
            return
        sid, turns = session.session_id, session.turns
        old_model = session.llm_model
        session.close()  # its last save and KV file are written; the session's lock is released
        try:
            if turns and not new.load_history(sid):
                raise SessionError(f"session {sid} could not be found again")
        except (SessionError, ValueError) as exc:
            c.error(f"cannot continue {sid} on {name}: {exc}")
            if self._reopen(sid, settings):
                new.close()
                c.notice(f"back on {old_model}, session {sid}", "yellow")
                return
            # Neither: go on in a new session on the new model rather than in a closed one.
            self.session, self.args = new, new_args
            c.notice(f"now on {new.llm_model} in a new session {new.session_id}; `/resume {sid}` may work "
                     "later", "yellow")
            return
        self.session = new
        self.args = new_args
        self._trimmed_seen = 0
        c.notice(f"🔁 now on {new.llm_model} ({new.backend.name}); session {new.session_id} goes on"
                 + (f" with its {new.turns} turn(s)" if turns else "") + f" (was {old_model})", "green")

    def _reopen(self, session_id: str, settings: dict[str, Any]) -> bool:
        """After a failed switch: the previous model, on the same session, again."""
        again = None
        try:
            again = self._open_session(**settings)
            again.load_history(session_id)
        except (SessionError, ValueError, OSError) as exc:
            self.console.error(f"cannot reopen session {session_id}: {exc}")
            if again is not None:
                again.close()
            return False
        self.session = again
        return True

    def _show_history(self, session: ConversationSession) -> None:
        c = self.console
        s = session.get_history_summary()
        c.line(f"📜 session {s['session_id']}  ·  {s['turns']} turn(s), {s['total_messages']} message(s)")
        c.line(f"   file: {s['path'] or '(not saved: enable_cache=False)'}"
               f"{'' if s['has_history_file'] else ' (not written yet)'}")
        c.line(f"   model: {s['llm_model']} ({s['backend']}), created {s['created_at']}")
        if session.title:
            c.line(f"   title: {printable(session.title, keep_newlines=False)}")
        if session.system_prompt:
            c.line(f"   system: {printable(' '.join(session.system_prompt.split()), keep_newlines=False)[:100]}")
        history = session.history
        if history:
            c.line("   last turns:")
            for m in history[-6:]:
                who = "您" if m["role"] == "user" else "🔧" if m["role"] == "tool" else "🤖"
                text = printable(" ".join(readable(m).split()), keep_newlines=False)
                mark = " ⏹ (interrupted)" if m.get("interrupted") else ""
                c.line(f"   {who}: {text[:100]}{'…' if len(text) > 100 else ''}{mark}", "dim")

    def _show_memory(self, session: ConversationSession) -> None:
        c = self.console
        s = session.get_history_summary()
        trimmed = session.get_cache_stats().get("trimmed_turns") or 0
        if s["memory"] != "summary":
            c.line(f"🧠 memory is trim: when the conversation outgrows the context window its oldest turns are "
                   f"left out of the prompt ({trimmed} so far); start with --memory summary to keep them in a "
                   "running summary instead")
            return
        text = s["summary"]
        if not text:
            c.line("🧠 no summary yet: " + (
                f"{trimmed} oldest turn(s) are left out of the prompt until it is ready" if trimmed else
                f"all {s['turns']} turn(s) fit the context window"))
            return
        st = session.get_cache_stats()
        c.line(f"🧠 summary of the first {s['summarized_turns']} turn(s) ({st.get('summary_tokens')} tokens, "
               f"{st.get('compactions')} compaction(s) this run); the newest {st.get('verbatim_turns')} "
               "turn(s) are sent word for word:")
        for line in printable(text).splitlines() or [""]:
            c.line(f"   {line}")

    def _show_stats(self, session: ConversationSession) -> None:
        # Asked afresh each time: the app keeps no figures of its own, so after `clear` or
        # `resume` nothing of the previous session can show.
        st = session.get_cache_stats()

        def fmt(value: object, unit: str = "") -> str:
            if value is None:
                return "–"
            if isinstance(value, float):
                return f"{value:.3f}{unit}" if value < 10 else f"{value:.1f}{unit}"
            return f"{value}{unit}"

        def size(value: object) -> str:
            return "–" if not isinstance(value, (int, float)) else format_bytes(value)

        ratio = st.get("cache_hit_ratio")
        rows = [
            ("backend / model", f"{st['backend']} / {st['llm_model']}"),
            ("context window", fmt(st.get("n_ctx"), " tokens")),
            ("tokens in KV cache", fmt(st.get("tokens_in_cache"))),
            ("KV state size", size(st.get("state_bytes"))),
            ("last prompt", f"{fmt(st.get('prompt_tokens'))} tokens, {fmt(st.get('cached_tokens'))} from cache"),
            ("session cache hits", "–" if ratio is None else
             f"{ratio:.0%} ({st.get('total_cached_tokens')} of {st.get('total_prompt_tokens')} prompt tokens)"),
            ("time to first token", fmt(st.get("ttft_s"), " s")),
            ("generation speed", fmt(st.get("tokens_per_s"), " tokens/s")),
            ("turns left out of the prompt", fmt(st.get("trimmed_turns"))),
            ("model load time", fmt(st.get("model_load_s"), " s")),
        ]
        if st.get("kv_restored") is not None:
            rows.append(("KV cache restored on resume",
                         f"yes: {st.get('kv_restore_tokens')} tokens, {size(st.get('kv_restore_bytes'))} in "
                         f"{(st.get('kv_restore_s') or 0) * 1000:.0f} ms" if st["kv_restored"]
                         else f"no ({st.get('kv_restore_reason')})"))
        if st.get("warmup"):
            rows.append(("resume warm-up", f"{st['warmup']} in {fmt(st.get('warmup_s'), ' s')}"))
        if st.get("kv_save"):
            detail = st["kv_save"]
            if st.get("kv_saved_bytes") is not None:
                detail += f": {st.get('kv_saved_tokens')} tokens, {size(st['kv_saved_bytes'])}"
            rows.append(("KV cache file", detail))
        for key in ("kv_file_bytes", "kv_files_bytes", "kv_total_bytes"):
            if st.get(key) is not None:
                rows.append(("KV cache file size" if key == "kv_file_bytes" else "KV cache files, total",
                             size(st[key])))
        if st.get("memory") == "summary":
            rows.append(("memory", f"summary: {fmt(st.get('summarized_turns'))} turn(s) summarised, "
                                   f"{fmt(st.get('verbatim_turns'))} verbatim"))
            rows.append(("summary", f"{fmt(st.get('summary_tokens'))} tokens, "
                                    f"{fmt(st.get('compactions'))} compaction(s) this run"))
            if st.get("summary_error"):
                rows.append(("last summary failed", printable(str(st["summary_error"]), keep_newlines=False)[:80]
                             + " (trimming until it works)"))
        elif st.get("memory") is not None:
            rows.append(("memory", "trim (oldest turns left out of the prompt)"))
        if st.get("tts_first_audio_s") is not None:
            rows.append(("time to first audio", fmt(st["tts_first_audio_s"], " s")))
        if st.get("interruptions"):
            last = ""
            if st.get("last_interrupted"):
                fraction = st.get("last_heard_fraction")
                last = f"; the last reply: {'–' if fraction is None else f'{fraction:.0%}'} heard"
                if st.get("last_interrupt_to_silence_s") is not None:
                    last += f", silent {st['last_interrupt_to_silence_s'] * 1000:.1f} ms after the interrupt"
            rows.append(("interruptions (barge-in)", f"{st['interruptions']}{last}"))
        self.console.line("📊 KV cache")
        for name, value in rows:
            self.console.line(f"   {name:<30} {value}")

    def _list_sessions(self, store: Any) -> None:
        infos = store.list_sessions()
        if not infos:
            self.console.line(f"no saved sessions in {_where(store)}")
            return
        for line in session_table(store, infos, current=self.session.session_id if self.session else None):
            self.console.line(line)

    def _search(self, store: Any, text: str) -> None:
        c = self.console
        if not text.strip():
            c.error("usage: /search TEXT")
            return
        try:
            hits = store.search(text, limit=_SEARCH_LIMIT)
        except (SessionError, ValueError) as exc:
            c.error(str(exc))
            return
        if not hits:
            c.line(f"no saved session holds {printable(text.strip(), keep_newlines=False)!r}")
            return
        for line in search_lines(hits, 90):
            c.line("  " + line)
        if len(hits) >= _SEARCH_LIMIT:
            c.line(f"  (the first {_SEARCH_LIMIT}; `sessions search TEXT --limit N` shows more)", "dim")

    def _resume(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        try:
            ok = session.load_history(arg.split()[0] if arg else None)
        except (SessionError, ValueError) as exc:
            c.error(str(exc))
            return
        if ok:
            self._trimmed_seen = 0
            c.notice(f"✅ resumed {session.session_id}: {session.turns} turn(s)", "green")
        else:
            c.error(f"no saved session {arg}" if arg else "no other saved session to resume")

    def _delete(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        words = arg.split()
        yes = any(w in ("-y", "--yes") for w in words)
        ids = [w for w in words if w not in ("-y", "--yes")]
        if len(ids) != 1:
            c.error("usage: /delete ID [--yes]  (see `sessions`)")
            return
        prompt = self._prompt
        assert prompt is not None

        def ask(question: str) -> bool:
            return confirm(question, yes=yes, terminal=self.interactive, ask=prompt)

        try:
            c.notice("🗑️  " + delete_saved(session.store, ids[0], ask, current=session.session_id))
        except NothingDeleted as exc:
            (c.notice if str(exc) == "not deleted" else c.error)(str(exc))
        except (NotConfirmed, SessionError, ValueError) as exc:
            c.error(str(exc))

    def _export(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        words = arg.split(maxsplit=1)
        from ..stores import validate_session_id

        sid, dest = session.session_id, ""
        if words:
            try:
                sid = validate_session_id(words[0])
                dest = words[1].strip() if len(words) > 1 else ""
            except ValueError:
                dest = arg.strip()  # `/export chat.md`: this session, to that file
        try:
            path, sealed = write_export(session.store, sid, Path(dest).expanduser() if dest else None)
        except FileNotFoundError:
            c.error(f"no saved session {sid}")
        except PlaintextNeeded as exc:
            c.error(f"{exc}; /export to a .json file writes it sealed, or run "
                    f"`sessions export {sid} --plaintext -o FILE.md` to write it readable")
        except (SessionError, ValueError, OSError) as exc:
            c.error(str(exc))
        else:
            c.notice(f"📤 exported {sid} to {path}" + (" (sealed: encrypted with the key)" if sealed else ""))

    def _set(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        name, _, value = arg.partition(" ")
        name = name.strip().lower().replace("-", "_")
        value = value.strip()
        if not name:
            system = session.system_prompt
            c.line(f"   system       {printable(system, keep_newlines=False) if system else '(none)'}")
            c.line(f"   temperature  {session.temperature:g}")
            c.line(f"   max_tokens   {session.max_tokens}")
            c.line(f"   timeout      {'none' if session.timeout is None else f'{session.timeout:g} s'}")
            c.line(f"   verbose      {'on' if self.verbose else 'off'}")
            return
        try:
            if name == "system":
                session.system_prompt = value or None
                c.notice("system prompt " + ("set" if value else "removed") + "; it applies from the next reply")
                return
            if name == "temperature":
                number = float(value)
                if not 0 <= number <= 5:
                    raise ValueError("the temperature must be between 0 and 5")
                session.temperature = number
            elif name == "max_tokens":
                session.max_tokens = check_max_tokens(int(value))
            elif name == "timeout":
                session.timeout = parse_timeout(value)  # 0: no limit
            elif name == "verbose":
                if value.lower() not in ("on", "off", "true", "false", "1", "0", ""):
                    raise ValueError("use /set verbose on or /set verbose off")
                self.verbose = value.lower() in ("on", "true", "1", "")
            else:
                c.error(f"cannot set {name!r}; settable: {', '.join(SETTINGS)}")
                return
        except ValueError as exc:
            text = str(exc)
            c.error(text if "must" in text or "use" in text else f"{name}: {value!r} is not a valid value")
            return
        c.notice(f"{name} = {value or 'on'}")


_Handler = Callable[[ChatApp, ConversationSession, str], "bool | None"]
_HANDLERS: dict[str, _Handler] = {
    "quit": lambda app, session, arg: False,
    "help": ChatApp._help,
    "history": lambda app, session, arg: app._show_history(session),
    "stats": lambda app, session, arg: app._show_stats(session),
    "memory": lambda app, session, arg: app._show_memory(session),
    "clear": ChatApp._clear,
    "new": ChatApp._clear,
    "sessions": lambda app, session, arg: app._list_sessions(session.store),
    "search": lambda app, session, arg: app._search(session.store, arg),
    "resume": ChatApp._resume,
    "delete": ChatApp._delete,
    "export": ChatApp._export,
    "set": ChatApp._set,
    "undo": lambda app, session, arg: app._undo(session),
    "retry": lambda app, session, arg: app._retry(session),
    "title": ChatApp._title,
    "model": ChatApp._switch_model,
    "models": lambda app, session, arg: app._list_models(session),
}
"""What each command of ``COMMANDS`` does in the chat (a test checks that every command has one)."""

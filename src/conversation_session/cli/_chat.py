"""The interactive chat: the seed's ``python main.py`` and its commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from .._exceptions import BackendError, SessionError, SessionTimeoutError, TTSTimeoutError
from .._session import ConversationSession
from .._store import HistoryStore, validate_session_id
from ._args import sessions_dir_from
from ._console import Console
from ._export import export_session

__all__ = ["ChatApp"]

logger = logging.getLogger("conversation_session.cli")

COMMANDS = ("history", "stats", "clear", "help", "quit", "exit", "sessions", "resume", "new",
            "delete", "export")
HELP = """\
Commands (also with a leading slash, e.g. /history):
  history            this session: id, turns, file, the last few turns
  stats              KV-cache figures, time to first token, tokens per second
  clear              start over in a new session (the old file stays on disk)
  sessions           list saved sessions
  resume <id>        continue a saved session        new    start a new session
  delete <id>        delete a saved session (asks first)
  export <id> [path] write a session to a file (.json, or .md for Markdown)
  help               this list
  quit / exit        leave (Ctrl-D too)
Ctrl-C stops a reply that is being written; at an empty prompt it tells how to quit.
To send a command word as a message, start it with a backslash: \\history"""


def _backend_options(args: argparse.Namespace) -> dict[str, object]:
    if args.context_length is None:
        return {}
    key = {"llama-cpp": "n_ctx", "ollama": "num_ctx", "openai": "context_length"}[args.backend]
    return {key: args.context_length}


class ChatApp:
    """One run of the chat.  ``interactive`` is True on a terminal (prompt_toolkit, colour,
    spinner); otherwise lines are read from ``stdin`` one message or command each."""

    def __init__(self, args: argparse.Namespace, *, stdin: TextIO | None = None,
                 stdout: TextIO | None = None, interactive: bool | None = None):
        self.args = args
        self.stdin = stdin or sys.stdin
        self.console = Console(stdout or sys.stdout)
        self.interactive = (self.stdin.isatty() and self.console.tty) if interactive is None else interactive
        if not self.interactive:
            self.console.tty = False
        self.session: ConversationSession | None = None
        self._prompt: Callable[[str], str] | None = None
        self._interrupts = 0

    # -- set-up ----------------------------------------------------------------------------
    def _open_session(self) -> ConversationSession:
        a = self.args
        tts = None if a.tts == "none" else a.tts
        what = "the bundled model" if a.backend == "llama-cpp" and not a.model else (a.model or a.backend)
        self.console.start_spinner(f"loading {what}…")
        try:
            return ConversationSession(
                a.model, backend=a.backend, base_url=a.base_url, timeout=a.timeout,
                tts_wait_timeout=a.tts_wait_timeout, tts=tts, sessions_dir=sessions_dir_from(a),
                system_prompt=a.system, max_tokens=a.max_tokens, temperature=a.temperature,
                backend_options=_backend_options(a), tts_output_dir=a.tts_output_dir,
                tts_options={k: v for k, v in (("rate", a.tts_rate), ("voice", a.tts_voice)) if v is not None},
                persist_kv_cache=a.persist_kv,
            )
        finally:
            self.console.stop_spinner()

    def _make_prompt(self) -> Callable[[str], str]:
        if not self.interactive:
            def read(prompt: str) -> str:
                line = self.stdin.readline()
                if not line:
                    raise EOFError
                return line.rstrip("\r\n")
            return read
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        history: FileHistory | InMemoryHistory = InMemoryHistory()
        assert self.session is not None
        path = self.session.store.directory / ".input_history"
        try:
            self.session.store.ensure_dir()
            path.touch(mode=0o600, exist_ok=True)
            history = FileHistory(str(path))
        except (OSError, SessionError) as exc:
            logger.warning("input history not kept across runs: %s", exc)
        ps: PromptSession[str] = PromptSession(history=history)
        return lambda prompt: ps.prompt(prompt)

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        c = self.console
        try:
            self.session = self._open_session()
        except (SessionError, ValueError) as exc:
            c.error(str(exc))
            return 1
        with self.session as session:
            if not self._start(session):
                return 1
            self._prompt = self._make_prompt()
            try:
                self._loop()
            except KeyboardInterrupt:
                # A Ctrl-C outside a reply and outside the prompt (say, while a hint prints)
                # means the user is pressing it repeatedly: leave, cleanly, like the second one.
                c.line()
            summary = session.get_history_summary()
        if summary["turns"]:
            c.line(f"👋 saved {summary['turns']} turn(s) in {summary['path']}", "dim")
        return 0

    def _loop(self) -> None:
        c = self.console
        assert self._prompt is not None
        while True:
            try:
                line = self._prompt("💬 您: " if self.interactive else "")
            except EOFError:
                if self.interactive:
                    c.line()
                return
            except KeyboardInterrupt:
                self._interrupts += 1
                if self._interrupts >= 2:
                    c.line()
                    return
                c.line("(Ctrl-C again, Ctrl-D or `quit` to leave)", "dim")
                continue
            self._interrupts = 0
            if not self._handle(line):
                return

    def _start(self, session: ConversationSession) -> bool:
        c = self.console
        a = self.args
        if a.resume is not None:
            try:
                resumed = session.load_history(a.resume or None)
            except (SessionError, ValueError) as exc:
                c.error(str(exc))
                return False
            if resumed:
                c.line(f"✅ resumed {session.session_id}: {session.turns} turn(s)", "green")
            elif a.resume:
                c.error(f"no saved session {a.resume} in {session.store.directory}")
                return False
            else:
                c.line("No saved session to resume; starting a new one.", "dim")
        if self.interactive:
            c.line(f"conversation-session · {session.backend.name} · {session.llm_model} · "
                   f"session {session.session_id}", "bold")
            c.line("Type a message, or `help` for commands.", "dim")
        if a.resume is None:
            newest = session.store.load_newest(exclude={session.session_id})
            if newest is not None:
                c.line(f"An earlier session exists: {newest.session_id} ({newest.turns} turn(s), "
                       f"updated {newest.updated_at}). Continue it with `resume {newest.session_id}`"
                       " or start with --resume.", "dim")
        return True

    def _handle(self, line: str) -> bool:
        """Run one input line; False to quit."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("\\"):
            return self._chat(text[1:])
        word, _, rest = text.partition(" ")
        command = word[1:] if word.startswith("/") else word
        if command.lower() in COMMANDS and (word.startswith("/") or command == word):
            return self._command(command.lower(), rest.strip())
        if word.startswith("/") and len(word) > 1:
            self.console.error(f"unknown command {word}; type help")
            return True
        return self._chat(text)

    def _chat(self, text: str) -> bool:
        c = self.console
        session = self.session
        assert session is not None
        if not text.strip():
            return True
        if self.interactive:
            c.start_spinner("thinking…")
            c.write("")
        started = False

        def on_token(piece: str) -> None:
            nonlocal started
            if not started:
                c.stop_spinner()
                if self.interactive:
                    c.write(c.style("🤖 ", "cyan"))
                started = True
            c.write(piece)

        turns_before = session.turns
        try:
            result = session.chat(text, on_token=on_token)
        except KeyboardInterrupt:
            c.stop_spinner()
            if session.turns > turns_before:  # the text was complete; only its speech was stopped
                c.line(("\n" if started else "") + "🔇 speech stopped (the reply is saved)", "yellow")
            else:
                c.line(("\n" if started else "") + "⏹️  interrupted: this reply was not saved", "yellow")
            return True
        except TTSTimeoutError as exc:
            c.line(("\n" if started else "") + f"🔇 speech stopped after {exc.timeout:g} s (--tts-wait-timeout); "
                   "the reply is saved", "yellow")
            return True
        except SessionTimeoutError as exc:
            c.stop_spinner()
            c.line(("\n" if started else "") + f"⏱️  timed out after {exc.timeout:g} s; the conversation "
                   "so far is kept, carry on", "yellow")
            return True
        except BackendError as exc:
            c.stop_spinner()
            c.error(("\n" if started else "") + str(exc))
            return True
        except SessionError as exc:
            c.stop_spinner()
            c.error(str(exc))
            return True
        c.stop_spinner()
        if not started:
            c.write(c.style("🤖 (empty reply)", "dim") if self.interactive else "")
        c.write("\n")
        if not result.saved and session.enable_cache:
            c.line("⚠️  this turn could not be saved to disk (see the log); it is kept in memory and "
                   "will be saved with the next one", "yellow")
        return True

    # -- commands --------------------------------------------------------------------------
    def _command(self, command: str, arg: str) -> bool:
        c = self.console
        session = self.session
        assert session is not None
        if command in ("quit", "exit"):
            return False
        if command == "help":
            c.line(HELP)
        elif command == "history":
            self._show_history(session)
        elif command == "stats":
            self._show_stats(session)
        elif command in ("clear", "new"):
            old = session.session_id
            had = session.turns
            session.clear_history()
            c.line(f"🧹 new session {session.session_id}"
                   + (f" (the previous one, {old}, is saved)" if had else ""), "green")
        elif command == "sessions":
            self._list_sessions(session.store)
        elif command == "resume":
            self._resume(session, arg)
        elif command == "delete":
            self._delete(session, arg)
        elif command == "export":
            self._export(session, arg)
        return True

    def _show_history(self, session: ConversationSession) -> None:
        c = self.console
        s = session.get_history_summary()
        c.line(f"📜 session {s['session_id']}  ·  {s['turns']} turn(s), {s['total_messages']} message(s)")
        c.line(f"   file: {s['path'] or '(not saved: enable_cache=False)'}"
               f"{'' if s['has_history_file'] else ' (not written yet)'}")
        c.line(f"   model: {s['llm_model']} ({s['backend']}), created {s['created_at']}")
        history = session.history
        if history:
            c.line("   last turns:")
            for m in history[-6:]:
                who = "您" if m["role"] == "user" else "🤖"
                text = " ".join(m["content"].split())
                c.line(f"   {who}: {text[:100]}{'…' if len(text) > 100 else ''}", "dim")

    def _show_stats(self, session: ConversationSession) -> None:
        st = session.get_cache_stats()

        def fmt(value: object, unit: str = "") -> str:
            if value is None:
                return "–"
            if isinstance(value, float):
                return f"{value:.3f}{unit}" if value < 10 else f"{value:.1f}{unit}"
            return f"{value}{unit}"

        ratio = st.get("cache_hit_ratio")
        rows = [
            ("backend / model", f"{st['backend']} / {st['llm_model']}"),
            ("context window", fmt(st.get("n_ctx"), " tokens")),
            ("tokens in KV cache", fmt(st.get("tokens_in_cache"))),
            ("KV state size", fmt(st.get("state_bytes"), " bytes")),
            ("last prompt", f"{fmt(st.get('prompt_tokens'))} tokens, {fmt(st.get('cached_tokens'))} from cache"),
            ("session cache hits", "–" if ratio is None else
             f"{ratio:.0%} ({st['total_cached_tokens']} of {st['total_prompt_tokens']} prompt tokens)"),
            ("time to first token", fmt(st.get("ttft_s"), " s")),
            ("generation speed", fmt(st.get("tokens_per_s"), " tokens/s")),
            ("turns left out of the prompt", fmt(st.get("trimmed_turns"))),
            ("model load time", fmt(st.get("model_load_s"), " s")),
        ]
        if st.get("kv_restored") is not None:
            rows.append(("KV cache restored on resume",
                         f"yes: {st['kv_restore_tokens']} tokens, {st['kv_restore_bytes']:,} bytes in "
                         f"{st['kv_restore_s'] * 1000:.0f} ms" if st["kv_restored"]
                         else f"no ({st.get('kv_restore_reason')})"))
        if st.get("warmup"):
            rows.append(("resume warm-up", f"{st['warmup']} in {fmt(st.get('warmup_s'), ' s')}"))
        if st.get("kv_save"):
            rows.append(("KV cache file", st["kv_save"]))
        if st.get("tts_first_audio_s") is not None:
            rows.append(("time to first audio", fmt(st["tts_first_audio_s"], " s")))
        self.console.line("📊 KV cache")
        for name, value in rows:
            self.console.line(f"   {name:<30} {value}")

    def _list_sessions(self, store: HistoryStore) -> None:
        c = self.console
        infos = store.list_sessions()
        if not infos:
            c.line(f"no saved sessions in {store.directory}")
            return
        current = self.session.session_id if self.session else None
        for info in infos:
            mark = "*" if info.session_id == current else " "
            first = info.first_user_line[:50] + ("…" if len(info.first_user_line) > 50 else "")
            c.line(f"{mark} {info.session_id:<24} {info.updated_at:<20} {info.turns:>4} turn(s)  {first}")

    def _resume(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        try:
            ok = session.load_history(arg or None)
        except (SessionError, ValueError) as exc:
            c.error(str(exc))
            return
        if ok:
            c.line(f"✅ resumed {session.session_id}: {session.turns} turn(s)", "green")
        else:
            c.error(f"no saved session {arg}" if arg else "no other saved session to resume")

    def _confirm(self, question: str) -> bool:
        assert self._prompt is not None
        try:
            answer = self._prompt(f"{question} [y/N] " if self.interactive else "")
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes")

    def _delete(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        if not arg:
            c.error("usage: delete <session_id>  (see `sessions`)")
            return
        try:
            validate_session_id(arg)
        except ValueError as exc:
            c.error(str(exc))
            return
        if arg == session.session_id:
            c.error("that is the current session; `new` first, then delete it")
            return
        if not self._confirm(f"Delete {arg}? This cannot be undone."):
            c.line("not deleted")
            return
        try:
            removed = session.store.delete(arg)
        except SessionError as exc:
            c.error(str(exc))
            return
        c.line(f"🗑️  deleted {arg}" if removed else f"no saved session {arg}")

    def _export(self, session: ConversationSession, arg: str) -> None:
        c = self.console
        sid, _, dest = arg.partition(" ")
        sid = sid or session.session_id
        try:
            path = export_session(session.store, sid, Path(dest.strip()) if dest.strip() else None)
        except FileNotFoundError:
            c.error(f"no saved session {sid}")
        except (SessionError, ValueError, OSError) as exc:
            c.error(str(exc))
        else:
            c.line(f"📤 exported {sid} to {path}")


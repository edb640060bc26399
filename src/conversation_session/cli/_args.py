"""Command-line flags of the terminal app, and where each default comes from.

Two parsers, each flag declared once: the chat's (flags, then an optional one-shot PROMPT)
and the housekeeping commands' (``sessions ...``, ``doctor``).  ``parse_args`` decides which
one a command line is for: the first positional word ``sessions`` or ``doctor`` (one that is
not a flag's value) starts a housekeeping command; global flags may stand before or after it.

Defaults: built in, then the config file (``_config``), then the command line, which wins.
Where sessions live (``store_from``): the command line (``--store``, then ``--sessions-dir``),
else the environment (``$CONVERSATION_SESSIONS_STORE``, then ``$CONVERSATION_SESSIONS_DIR``),
else the config file (``store``, then ``sessions_dir``), else ``./sessions``.

``serve`` as the first word is not parsed here: the service has its own flags
(``conversation_session.service.main``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from .._flags import (
    KEYSTORE_HELP,
    RETENTION_ENV,
    add_model_flags,
    add_voice_flags,
    positive_int,
    retention_days_from_env,
    seconds,
)
from .._flags import days as _days
from .._version import __version__
from ..backends import BACKEND_NAMES
from ..speech import PLAYBACK_CHOICES
from ..stores import SESSIONS_DIR_ENV, STORE_ENV
from ._commands import command_help
from ._config import apply_config
from ._text import parse_size

__all__ = ["HOUSEKEEPING", "RETENTION_ENV", "build_parser", "parse_args", "parse_duration",
           "retention_days", "sessions_dir_from", "store_from"]

HOUSEKEEPING = ("sessions", "doctor", "models", "keygen")
_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

_HOUSEKEEPING_HELP = """\
housekeeping (no chat; exit status 0 ok, 1 error, 2 usage):
  sessions list [--json]                      saved sessions
  sessions export ID [--format json|md] [-o PATH] [--plaintext]   one session (stdout without -o)
  sessions export --all DIR [--plaintext]     every session, one JSON file each
                                              (encrypted ones sealed unless --plaintext)
  sessions import PATH...                     add session files or an export --all folder
  sessions delete ID [--yes]                  delete one session
  sessions rename ID TITLE                    name a session ("" removes the name)
  sessions search TEXT [--limit N] [--json]   sessions whose title or messages hold TEXT, with snippets
  sessions prune [--older-than 30d] [--keep N] [--dry-run] [--yes]
  doctor [--fix]                              find damaged files; --fix moves them aside (PostgreSQL:
                                              load every session, report unreadable ones and leases held)
  models [--backend B] [--base-url URL]       what the backend offers (Ollama tags, /v1/models, GGUFs)
  Each takes --store URL (or --sessions-dir DIR). Moving sessions between stores:
    %(prog)s --store SRC sessions export --all DIR && %(prog)s --store DEST sessions import DIR/*.json

the session service (HTTP and WebSocket; needs pip install 'conversation-session[service]'):
  serve [--host H] [--port P] [--store URL] ...   see `%(prog)s serve --help`
"""


def _epilog() -> str:
    return f"""\
one-shot and pipes:
  %(prog)s "what is 2+2"                  answer, print, exit
  cat notes.txt | %(prog)s "summarise this"   standard input is added to the message
  printf 'hello\\nhistory\\n' | %(prog)s      no PROMPT: one message or command per line
  Replies go to standard output; notices and errors to standard error. Exit status: 0 ok,
  1 a turn or the start failed, 2 usage, 130 interrupted (Ctrl-C; every completed turn is saved).

commands inside the chat:
{command_help()}

Where sessions live: --store URL (postgresql://user@host/db, or a folder) or --sessions-dir,
else ${STORE_ENV} or ${SESSIONS_DIR_ENV}, else the config file's store or
sessions_dir, else ./sessions. Config file: $XDG_CONFIG_HOME/conversation-session/config.toml
(default ~/.config/...), TOML, keys are the long flag names: backend = "ollama",
model = "qwen2.5:3b", temperature = 0.2, system = "...", sessions_dir = "~/chats",
store = "postgresql://me@db/chats", memory = "summary", verbose = true. Flags on the command
line win.

{_HOUSEKEEPING_HELP}"""


def _global_flags(p: Any, *, suppress: bool) -> None:
    """The flags both parsers take (declared here once).  ``suppress``: absent unless given,
    so a value given before the housekeeping command is not overwritten by a default after it."""
    default: Any = argparse.SUPPRESS if suppress else None
    p.add_argument("--store", default=default, metavar="URL",
                   help=f"where sessions live: postgresql://user@host/db (shared by several hosts) or a folder "
                        f"(default: ${STORE_ENV}, the config file, or the sessions folder)")
    p.add_argument("--sessions-dir", default=default,
                   help=f"where sessions are saved (default: ${SESSIONS_DIR_ENV}, the config file, or ./sessions)")
    p.add_argument("--key-file", default=default, metavar="PATH",
                   help="encrypt new sessions at rest with this key file, and read encrypted ones (default "
                        "$CONVERSATION_SESSION_KEY_FILE; make one with `keygen PATH`)")
    p.add_argument("--keystore", default=default, metavar="DIR|URL", help=KEYSTORE_HELP)
    p.add_argument("--log-level", default=argparse.SUPPRESS if suppress else "WARNING", choices=_LOG_LEVELS,
                   help="log detail on standard error (default WARNING)")
    p.add_argument("--log-file", default=default, metavar="PATH",
                   help="also append the log, with every detail at --log-level, to this file")


def build_parser() -> argparse.ArgumentParser:
    """The chat's parser (its --help also lists the chat and housekeeping commands)."""
    p = argparse.ArgumentParser(
        prog="conversation-session",
        usage="%(prog)s [flags] [PROMPT ...]\n       %(prog)s [--store URL] {sessions,doctor,models} ...\n"
              "       %(prog)s serve [service flags]",
        description="Chat with a local LLM; every turn is saved and survives timeouts and restarts. "
                    "With a PROMPT, answer it and exit.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="*", metavar="PROMPT",
                   help="answer this one message and exit (standard input, when piped, is added to it)")
    g = p.add_argument_group("model")
    add_model_flags(g)
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed, where the backend takes one")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    g.add_argument("--top-k", type=positive_int, default=None, help="sample from the K likeliest tokens")
    g.add_argument("--repeat-penalty", type=float, default=None, help="penalty for repeated tokens")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads for the embedded model")
    g.add_argument("--context-length", type=positive_int, default=None,
                   help="context window in tokens (llama-cpp default 8192, ollama 4096)")
    g.add_argument("--tool", action="append", choices=["time"], default=None, dest="tools",
                   help="offer a built-in tool to the model (repeatable): time = current_time, the local "
                        "date and time; each call is shown on one line and saved with the turn")
    g.add_argument("--tools-file", default=None, metavar="PATH.py",
                   help="offer the public functions of this Python file to the model as tools (their type "
                        "hints and docstrings describe them)")
    g.add_argument("--approve", action="store_true",
                   help="ask y/N before each tool call that is not marked idempotent; without a terminal to "
                        "ask on (piped), such calls are refused: the model gets 'error: not approved'")
    g = p.add_argument_group("sessions")
    g.add_argument("-c", "--continue", dest="continue_", action="store_true",
                   help="continue the latest session")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="SESSION_ID",
                   help="continue a saved session (the latest when no id is given)")
    g.add_argument("--no-kv-file", dest="persist_kv", action="store_false",
                   help="do not keep the embedded model's KV cache on disk beside the session")
    g.add_argument("--kv-cache-max", type=_size, default=None, metavar="SIZE",
                   help="cap on the total size of the KV cache files, e.g. 200M or 2G (default 256M)")
    g.add_argument("--retention-days", type=_days, default=None, metavar="N",
                   help=f"on start, delete sessions not updated for N days (default ${RETENTION_ENV}, "
                        "else keep everything; 0 keeps everything)")
    g = p.add_argument_group("speech")
    g.add_argument("--tts", choices=["none", "espeak"], default="none", help="speak replies")
    g.add_argument("--tts-wait-timeout", type=seconds, default=30.0,
                   help="seconds to wait for speech to finish (default 30)")
    g.add_argument("--tts-output-dir", default=None, help="write speech as WAV files here")
    g.add_argument("--tts-playback", choices=list(PLAYBACK_CHOICES), default=None,
                   help="where speech plays: device, silent (in real time, without a sound device: headless "
                        "machines and tests), off (WAV files only), auto (default: the device when one is found)")
    add_voice_flags(g)
    g = p.add_argument_group("output")
    g.add_argument("--no-markdown", dest="markdown", action="store_false",
                   help="on a terminal, leave completed replies as plain text (default: Markdown is styled; "
                        "piped output is always plain)")
    g.add_argument("--verbose", action="store_true",
                   help="after each reply, print its timing: prompt and generation tokens and rates")
    _global_flags(g, suppress=False)
    g.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def build_housekeeping_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conversation-session", description="Manage saved sessions.",
                                epilog=_HOUSEKEEPING_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    _global_flags(common, suppress=True)
    sub = p.add_subparsers(dest="command", metavar="{sessions,doctor,models,keygen}", required=True)
    sp = sub.add_parser("sessions", help="list, export, import, delete or prune saved sessions",
                        description="Manage saved sessions without starting the chat.")
    ss = sp.add_subparsers(dest="sessions_command",
                           metavar="{list,search,rename,export,import,delete,prune,rekey}",
                           required=True)

    q = ss.add_parser("list", parents=[common], help="saved sessions, newest first")
    q.add_argument("--json", action="store_true", help="a JSON list instead of a table")

    q = ss.add_parser("search", parents=[common], help="find sessions by their title or messages",
                      description="Every message and title holding TEXT (case-insensitive), newest session "
                                  "first, each with a snippet around the match.")
    q.add_argument("text", nargs="+", metavar="TEXT", help="what to look for (several words: that phrase)")
    q.add_argument("--limit", type=positive_int, default=50, metavar="N", help="at most N hits (default 50)")
    q.add_argument("--json", action="store_true", help="a JSON list instead of lines")

    q = ss.add_parser("rename", parents=[common], help="set a session's title",
                      description="Give a session a title (shown by listings instead of its first line). "
                                  "An empty TITLE removes it. The session must not be open elsewhere.")
    q.add_argument("session_id", metavar="ID")
    q.add_argument("title", nargs="+", metavar="TITLE")

    q = ss.add_parser("export", parents=[common], help="write one session, or all of them, to files",
                      description="Write a session from a full load (snapshot and journal), so the copy is "
                                  "complete even while the session is in use. An encrypted session is "
                                  "written sealed (encrypted with the key; `sessions import` opens it with "
                                  "the key) unless --plaintext; plain sessions are written as plain JSON.")
    q.add_argument("session_id", nargs="?", metavar="ID", help="the session to export")
    q.add_argument("--format", choices=["json", "md"], default=None,
                   help="json (default; md when PATH ends in .md) or md (Markdown)")
    q.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="file or folder to write (default: standard output)")
    q.add_argument("--all", metavar="DIR", dest="all_dir", default=None,
                   help="write every session to DIR/<id>.json instead")
    q.add_argument("--plaintext", action="store_true",
                   help="write encrypted sessions readable (JSON, or Markdown) instead of sealed; "
                        "protect the files yourself")

    q = ss.add_parser("import", parents=[common], help="add session files to the store",
                      description="Add session files, as export writes them (a folder: its *.json files, "
                                  "as export --all writes them; a sessions folder itself is refused: export it first). "
                                  "A sealed export is opened with the key "
                                  "(--key-file or $CONVERSATION_SESSION_KEY_FILE) and stored encrypted.")
    q.add_argument("paths", nargs="+", metavar="PATH",
                   help="session JSON files (plain or sealed), or folders of them")

    q = ss.add_parser("delete", parents=[common], help="delete one session")
    q.add_argument("session_id", metavar="ID")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    q = ss.add_parser("rekey", parents=[common], help="put every session under a new encryption key",
                      description="Re-encrypt every session (plain ones too) with a fresh data key wrapped by "
                                  "the key in --new-key-file; --key-file (or $CONVERSATION_SESSION_KEY_FILE) "
                                  "names the old key. Safe to interrupt: each session is whole under one key or "
                                  "the other at every moment; run it again to finish. Sessions open for writing "
                                  "are skipped.")
    q.add_argument("--new-key-file", required=True, metavar="PATH", help="the new key (`keygen PATH` makes one)")

    q = ss.add_parser("prune", parents=[common], help="delete old sessions",
                      description="Delete sessions not among the --keep newest and (with --older-than) "
                                  "not updated for that long. Sessions in use are never deleted.")
    q.add_argument("--older-than", type=parse_duration, default=None, metavar="AGE",
                   help="such as 30d, 12h, 2w, 90m (a plain number is days)")
    q.add_argument("--keep", type=_count, default=None, metavar="N", help="always keep the N newest")
    q.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    q = sub.add_parser("doctor", parents=[common], help="find damaged sessions (files, or a PostgreSQL store)",
                       description="A sessions folder: list problem files (unparseable, malformed, symlinks, "
                                   "oversized, stray temporary files, orphan or torn journals). PostgreSQL: load "
                                   "every session and report the unreadable ones and those whose lease a writer "
                                   "holds. Nothing is ever deleted.")
    q.add_argument("--fix", action="store_true",
                   help="move problem files aside to <name>.corrupt-<timestamp> (turns still readable "
                        "in a damaged journal are saved first)")

    q = sub.add_parser("keygen", help="write a new encryption key file",
                       description="Write a new random 32-byte key file (mode 0600) for --key-file or "
                                   "$CONVERSATION_SESSION_KEY_FILE. An existing file is never overwritten. Keep a "
                                   "copy somewhere safe: sessions encrypted with a lost key cannot be read by "
                                   "anyone (docs/encryption.md).")
    q.add_argument("path", metavar="PATH", help="the key file to create")

    q = sub.add_parser("models", parents=[common], help="list the models the backend offers",
                       description="Ollama: the pulled models (/api/tags); an OpenAI-compatible server: "
                                   "/v1/models; llama-cpp: the bundled GGUF and the .gguf files beside it "
                                   "and beside --model.")
    q.add_argument("--backend", choices=list(BACKEND_NAMES), default=argparse.SUPPRESS,
                   help="as the chat's --backend (default: the config file's, else llama-cpp)")
    q.add_argument("--base-url", default=argparse.SUPPRESS, help="the server's URL")
    q.add_argument("--model", default=argparse.SUPPRESS, help="the model in use (marked with *)")
    q.add_argument("--json", action="store_true", help="a JSON list instead of a table")
    return p


def _command_index(parser: argparse.ArgumentParser, argv: Sequence[str]) -> int | None:
    """Index of the housekeeping command word in ``argv``, if one is there as a positional."""
    takes_value = {opt for action in parser._actions if action.nargs != 0 and action.option_strings
                   for opt in action.option_strings}
    for i, token in enumerate(argv):
        if token == "--":
            return None
        if token in HOUSEKEEPING and not (i and argv[i - 1] in takes_value):
            if token == "models" and _has_positional(argv[i + 1:], takes_value):
                return None  # `models` takes no words: "models are great" is a one-shot prompt
            return i
        if not token.startswith("-") and not (i and argv[i - 1] in takes_value):
            return None  # a prompt word came first: the whole line is a chat
    return None


def _has_positional(words: Sequence[str], takes_value: set[str]) -> bool:
    for j, word in enumerate(words):
        if not word.startswith("-") and not (j and words[j - 1] in takes_value):
            return True
    return False


def parse_args(argv: Sequence[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse a command line (exits 2 on a usage error, as argparse does).

    The result has ``command`` (None for the chat; else ``sessions``/``doctor``) and
    ``config_sessions_dir``/``config_store`` (the config file's, used after the environment).
    """
    environ = dict(os.environ) if environ is None else environ
    parser = build_parser()
    config_dir, config_store = apply_config(parser, environ)
    i = _command_index(parser, argv)
    if i is None:
        args = parser.parse_args(argv)
        args.command = None
        if args.continue_:
            if args.resume:
                parser.error("-c/--continue continues the latest session; --resume ID a given one: not both")
            args.resume = ""
    else:
        before = parser.parse_args(argv[:i])
        if before.prompt:
            parser.error(f"unexpected words before {argv[i]}: {' '.join(before.prompt)}")
        args = build_housekeeping_parser().parse_args(argv[i:])
        for name in ("store", "sessions_dir", "log_level", "log_file", "key_file", "keystore", "backend", "base_url",
                     "model"):
            if not hasattr(args, name):
                setattr(args, name, getattr(before, name))
    args.config_sessions_dir = config_dir
    args.config_store = config_store
    return args


_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``2w``, ``90m``, ``45s``; a plain number is days."""
    m = _DURATION_RE.fullmatch(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 30d, 12h, 2w or 90m")
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2).lower()])


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def retention_days(args: argparse.Namespace, environ: dict[str, str]) -> float | None:
    """Days of retention from ``--retention-days`` or the environment; None (or 0) keeps everything.

    Raises ``argparse.ArgumentTypeError`` for a bad value in the environment.
    """
    if args.retention_days is not None:
        return args.retention_days or None
    try:
        return retention_days_from_env(environ)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def sessions_dir_from(args: argparse.Namespace) -> str:
    """The flag, else the environment variable, else the config file, else ``sessions``."""
    return (getattr(args, "sessions_dir", None) or os.environ.get(SESSIONS_DIR_ENV)
            or getattr(args, "config_sessions_dir", None) or "sessions")


def store_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str:
    """Where sessions live, as ``open_store`` takes it (a URL or a folder): the command line
    first (``--store``, then ``--sessions-dir``), then the environment, then the config file
    (each: the store URL before the folder), else ``sessions``."""
    env = os.environ if environ is None else environ
    for value in (getattr(args, "store", None), getattr(args, "sessions_dir", None),
                  env.get(STORE_ENV), env.get(SESSIONS_DIR_ENV),
                  getattr(args, "config_store", None), getattr(args, "config_sessions_dir", None)):
        if value:
            return str(value)
    return "sessions"

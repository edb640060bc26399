"""Command-line flags of the terminal app."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

from .._session import SESSIONS_DIR_ENV, default_sessions_dir
from .._version import __version__
from ..backends import BACKEND_NAMES

__all__ = ["RETENTION_ENV", "build_parser", "parse_duration", "retention_days", "sessions_dir_from"]

RETENTION_ENV = "CONVERSATION_SESSIONS_RETENTION_DAYS"

_EPILOG = f"""\
commands inside the chat:
  history    this session: id, turns, file, the last few turns
  stats      KV-cache figures, time to first token, tokens per second
  clear      start over (new session; the old file stays)
  sessions   saved sessions          resume <id>   continue one
  new        start a new session     delete <id>   delete one (asks first)
  export <id> [path]                 write a session as JSON (or .md)
  help       this list               quit / exit / Ctrl-D   leave
Commands also work with a leading slash (/history). To send a command word as a
message, start the line with a backslash: \\history

The sessions folder is --sessions-dir, else ${SESSIONS_DIR_ENV}, else ./sessions.

housekeeping (no chat; global flags such as --sessions-dir go before the command):
  sessions list [--json]                      saved sessions
  sessions export ID [--format json|md] [-o PATH]   one session (stdout without -o)
  sessions export --all DIR                   every session, one JSON file each
  sessions import PATH                        add a session file (as export writes it)
  sessions delete ID [--yes]                  delete one session
  sessions prune [--older-than 30d] [--keep N] [--dry-run] [--yes]
  doctor [--fix]                              find damaged files; --fix moves them aside
Exit status: 0 ok, 1 error, 2 usage.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="conversation-session",
        description="Chat with a local LLM; every turn is saved and survives timeouts and restarts.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backend", choices=[b for b in BACKEND_NAMES if b != "fake"], default="llama-cpp",
                   help="llama-cpp: in-process, no server (default); ollama; openai: any "
                        "OpenAI-compatible server")
    p.add_argument("--model", help="a .gguf path (llama-cpp; default: bundled SmolLM2-135M), or the "
                                   "server's model name (ollama default: qwen2.5:3b)")
    p.add_argument("--base-url", help="server URL (ollama: $OLLAMA_HOST or http://127.0.0.1:11434)")
    p.add_argument("--sessions-dir", default=None,
                   help=f"where sessions are saved (default: ${SESSIONS_DIR_ENV} or ./sessions)")
    p.add_argument("--timeout", type=_seconds, default=60.0,
                   help="seconds a reply may take; 0 for no limit (default 60)")
    p.add_argument("--tts-wait-timeout", type=_seconds, default=30.0,
                   help="seconds to wait for speech to finish (default 30)")
    p.add_argument("--tts", choices=["none", "espeak"], default="none", help="speak replies")
    p.add_argument("--tts-output-dir", default=None, help="write speech as WAV files here")
    p.add_argument("--tts-rate", type=int, default=None, metavar="WPM", help="speech rate, words per minute")
    p.add_argument("--tts-voice", default=None, help="espeak-ng voice for all text (default: by language)")
    p.add_argument("--no-kv-file", dest="persist_kv", action="store_false",
                   help="do not keep the embedded model's KV cache on disk beside the session")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="SESSION_ID",
                   help="continue a saved session (the latest when no id is given)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length limit (default 512)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--context-length", type=int, default=None,
                   help="context window in tokens (llama-cpp default 8192, ollama 4096)")
    p.add_argument("--log-level", default="WARNING",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log detail on stderr")
    p.add_argument("--retention-days", type=_days, default=None, metavar="N",
                   help=f"on start, delete sessions not updated for N days (default ${RETENTION_ENV}, "
                        "else keep everything; 0 keeps everything)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_subcommands(p)
    return p


def _add_subcommands(p: argparse.ArgumentParser) -> None:
    # The global flags are accepted after the command too; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--sessions-dir", default=argparse.SUPPRESS, help="the sessions folder")
    common.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log detail on stderr")
    sub = p.add_subparsers(dest="command", metavar="{sessions,doctor}",
                           title="housekeeping commands (without one, the chat starts)")
    sp = sub.add_parser("sessions", parents=[common], help="list, export, import, delete or prune saved sessions",
                        description="Manage saved sessions without starting the chat.")
    ss = sp.add_subparsers(dest="sessions_command", metavar="{list,export,import,delete,prune}", required=True)

    q = ss.add_parser("list", parents=[common], help="saved sessions, newest first")
    q.add_argument("--json", action="store_true", help="a JSON list instead of a table")

    q = ss.add_parser("export", parents=[common], help="write one session, or all of them, to files",
                      description="Write a session from a full load (snapshot and journal), so the copy is "
                                  "complete even while the session is in use.")
    q.add_argument("session_id", nargs="?", metavar="ID", help="the session to export")
    q.add_argument("--format", choices=["json", "md"], default=None,
                   help="json (default; md when PATH ends in .md) or md (Markdown)")
    q.add_argument("-o", "--output", metavar="PATH", default=None,
                   help="file or folder to write (default: standard output)")
    q.add_argument("--all", metavar="DIR", dest="all_dir", default=None,
                   help="write every session to DIR/<id>.json instead")

    q = ss.add_parser("import", parents=[common], help="add a session file to the sessions folder")
    q.add_argument("path", metavar="PATH", help="a session JSON file, as export writes it")

    q = ss.add_parser("delete", parents=[common], help="delete one session")
    q.add_argument("session_id", metavar="ID")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    q = ss.add_parser("prune", parents=[common], help="delete old sessions",
                      description="Delete sessions not among the --keep newest and (with --older-than) "
                                  "not updated for that long. Sessions in use are never deleted.")
    q.add_argument("--older-than", type=parse_duration, default=None, metavar="AGE",
                   help="such as 30d, 12h, 2w, 90m (a plain number is days)")
    q.add_argument("--keep", type=_count, default=None, metavar="N", help="always keep the N newest")
    q.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    q.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    q = sub.add_parser("doctor", parents=[common], help="find damaged or stray files in the sessions folder",
                       description="List problem files (unparseable, malformed, symlinks, oversized, stray "
                                   "temporary files, orphan or torn journals). Nothing is ever deleted.")
    q.add_argument("--fix", action="store_true",
                   help="move problem files aside to <name>.corrupt-<timestamp> (turns still readable "
                        "in a damaged journal are saved first)")


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


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number of days, 0 or more (0 keeps everything)")
    return value


def retention_days(args: argparse.Namespace, environ: dict[str, str]) -> float | None:
    """Days of retention from ``--retention-days`` or the environment; None (or 0) keeps everything.

    Raises ``argparse.ArgumentTypeError`` for a bad value in the environment.
    """
    if args.retention_days is not None:
        return args.retention_days or None
    text = environ.get(RETENTION_ENV, "").strip()
    if not text:
        return None
    try:
        return _days(text) or None
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"${RETENTION_ENV}={text!r}: {exc}") from None


def _seconds(text: str) -> float | None:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return value or None


def sessions_dir_from(args: argparse.Namespace) -> str:
    return args.sessions_dir or default_sessions_dir()

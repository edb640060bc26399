"""Command-line flags of the terminal app."""

from __future__ import annotations

import argparse

from .._session import SESSIONS_DIR_ENV, default_sessions_dir
from .._version import __version__
from ..backends import BACKEND_NAMES

__all__ = ["build_parser"]

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
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="SESSION_ID",
                   help="continue a saved session (the latest when no id is given)")
    p.add_argument("--max-tokens", type=int, default=512, help="reply length limit (default 512)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--context-length", type=int, default=None,
                   help="context window in tokens (llama-cpp default 8192, ollama 4096)")
    p.add_argument("--log-level", default="WARNING",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log detail on stderr")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _seconds(text: str) -> float | None:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return value or None


def sessions_dir_from(args: argparse.Namespace) -> str:
    return args.sessions_dir or default_sessions_dir()

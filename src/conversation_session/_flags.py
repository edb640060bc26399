"""The command-line flags the chat app and ``serve`` share, declared once, with one validator
each (the chat's and the service's parsers used to declare them twice and drifted)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from .backends import BACKEND_NAMES
from .backends._llama_cpp import KV_CACHE_TYPES
from .session._limits import DEFAULT_TIMEOUT_S, parse_timeout
from .stores._durability import DURABILITY_LEVELS

__all__ = ["KEYSTORE_HELP", "RETENTION_ENV", "add_model_flags", "add_voice_flags", "days", "positive_int",
           "retention_days_from_env", "seconds"]

KEYSTORE_HELP = ("where encrypted sessions' data keys are kept (deleting a session deletes its key, so its copies "
                 "in backups become unreadable); default $CONVERSATION_SESSION_KEYSTORE, else the folder "
                 "<key file>.keystore beside the key file; with --store postgresql://..., a postgresql:// URL "
                 "(default: none, the keys stay in the sessions' rows) (docs/encryption.md)")

RETENTION_ENV = "CONVERSATION_SESSIONS_RETENTION_DAYS"
"""Days of retention when neither the chat's ``--retention-days`` nor ``serve --retention`` is given."""

DURABILITY_HELP = ("what a saved turn survives: the program dying (process) or also a power cut (power: "
                   "flushed to the disk, or committed with synchronous_commit on PostgreSQL, before the reply "
                   "counts as saved); default $CONVERSATION_SESSION_DURABILITY, else power")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def seconds(text: str) -> float | None:
    """Seconds on a command line: ``0`` means no limit; nan, inf and negative values are refused."""
    try:
        return parse_timeout(text, "seconds")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _level(text: str) -> str:
    return text.strip().lower()


def days(text: str) -> float:
    """A number of days, 0 or more (0: keep everything)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number of days, 0 or more (0 keeps everything)")
    return value


def retention_days_from_env(environ: Mapping[str, str]) -> float | None:
    """Days of retention from ``$CONVERSATION_SESSIONS_RETENTION_DAYS``; None when it is unset,
    empty or 0 (keep everything).  ``ValueError`` naming the variable for a bad value."""
    text = environ.get(RETENTION_ENV, "").strip()
    if not text:
        return None
    try:
        return days(text) or None
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"${RETENTION_ENV}={text!r}: {exc}") from None


def add_model_flags(g: Any) -> None:
    """The model and the turn: --backend, --model, --base-url, --kv-type, --system, --max-tokens,
    --memory, --timeout, --durability."""
    g.add_argument("--backend", choices=list(BACKEND_NAMES), default="llama-cpp",
                   metavar="{" + ",".join(b for b in BACKEND_NAMES if b != "fake") + "}",
                   help="llama-cpp: in-process, no server (default); ollama; openai: any "
                        "OpenAI-compatible server (fake: scripted replies, for trying things without a model)")
    g.add_argument("--model", help="a .gguf path (llama-cpp; default: bundled SmolLM2-135M), or the "
                                   "server's model name (ollama default: qwen2.5:3b)")
    g.add_argument("--base-url", help="server URL (ollama: $OLLAMA_HOST or http://127.0.0.1:11434)")
    g.add_argument("--kv-type", choices=list(KV_CACHE_TYPES), default=None,
                   help="the embedded model's KV cache cell type: f16 (default), q8_0 (half the .kv file "
                        "size, slower prompts) or q4_0")
    g.add_argument("--system", default=None, help="system prompt")
    g.add_argument("--max-tokens", type=positive_int, default=512, help="reply length limit (default 512)")
    g.add_argument("--memory", choices=["trim", "summary"], default="trim",
                   help="when a conversation outgrows the context window: trim leaves the oldest turns "
                        "out of the prompt (default); summary folds them into a running summary")
    g.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT_S,
                   help=f"seconds a reply may take; 0 for no limit (default {DEFAULT_TIMEOUT_S:g})")
    # The levels' one definition; any case, as $CONVERSATION_SESSION_DURABILITY takes them.
    g.add_argument("--durability", type=_level, choices=DURABILITY_LEVELS, default=None, help=DURABILITY_HELP)


def add_voice_flags(g: Any) -> None:
    """The voice: --tts-voice, --tts-rate."""
    g.add_argument("--tts-voice", default=None, help="espeak-ng voice for all text (default: by language)")
    g.add_argument("--tts-rate", type=positive_int, default=None, metavar="WPM", help="speech rate, words per minute")

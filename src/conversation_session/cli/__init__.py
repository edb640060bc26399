"""The terminal app: ``python main.py``, ``python -m conversation_session``, ``conversation-session``.

Without a command it starts the chat; ``sessions ...`` and ``doctor`` are housekeeping
commands that run and exit (0 ok, 1 error, 2 usage).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._logging import setup_logger
from ._args import build_parser, retention_days, sessions_dir_from
from ._chat import ChatApp
from ._sessions_cmd import apply_retention, run_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logger(args.log_level)
    try:
        if args.command is not None:
            return run_command(args, usage=parser.error)
        try:
            days = retention_days(args, dict(os.environ))
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
        if days:
            apply_retention(sessions_dir_from(args), days)
        return ChatApp(args).run()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130

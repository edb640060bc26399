"""The terminal app: ``python main.py``, ``python -m conversation_session``, ``conversation-session``."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from .._logging import setup_logger
from ._args import build_parser
from ._chat import ChatApp

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; returns the exit status."""
    args = build_parser().parse_args(argv)
    setup_logger(args.log_level)
    try:
        return ChatApp(args).run()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130

"""The terminal app: ``python main.py``, ``python -m conversation_session``, ``conversation-session``.

Without a command it starts the chat (or, with a PROMPT, answers it and exits);
``sessions ...`` and ``doctor`` are housekeeping commands that run and exit (0 ok, 1 error,
2 usage).  130: interrupted by Ctrl-C (completed turns are saved).  ``serve ...`` hands the rest
of the command line to the session service (``conversation_session.service.main``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .._logging import setup_logger
from ._args import build_parser, parse_args, retention_days, store_from
from ._chat import ChatApp
from ._sessions_cmd import apply_retention, run_command

__all__ = ["main"]


SERVICE_HINT = "the service is not installed: pip install 'conversation-session[service]'"


def serve(argv: list[str]) -> int:
    """``conversation-session serve ...``: the session service, imported only when asked for (it
    needs the ``service`` extra, which the chat does not)."""
    try:
        from ..service import main as service_main
    except ImportError:
        print(SERVICE_HINT, file=sys.stderr)
        return 1
    try:
        return service_main(argv)
    except ImportError as exc:  # Starlette, uvicorn or websockets missing at start-up
        print(f"{SERVICE_HINT} ({exc.name or exc})", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["serve"]:
        return serve(words[1:])
    try:
        args = parse_args(words)
        setup_logger(args.log_level, args.log_file)
        if args.command is not None:
            return run_command(args, usage=build_parser().error)
        try:
            days = retention_days(args, dict(os.environ))
        except argparse.ArgumentTypeError as exc:
            build_parser().error(str(exc))
        if days:
            apply_retention(store_from(args), days)
        return ChatApp(args).run()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return broken_pipe()


def broken_pipe() -> int:
    """Whoever read standard output has gone (``sessions list | head -3``): stop quietly, as the
    Python documentation advises (signal module, "Note on SIGPIPE").  The rest of the output
    goes to /dev/null, so the interpreter's last flush at exit cannot fail again and print."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (embedded): nothing to redirect
        pass
    return 1

"""The command: options, the safety checks before listening, then uvicorn (one process, or
``--workers N`` processes sharing the listening socket and the store)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys

from ._config import CONFIG_ENV, INSTALL_HINT, build_parser, config_from_args, is_loopback
from ._log import setup_json_logging

__all__ = ["run"]

logger = logging.getLogger("conversation_session.service")


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # the environment's values, flags that do not go together
        # One line: the usage (every flag of the service) would bury it.
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(config.host) and not config.tokens:
        print(f"refusing to listen on {config.host} without a token: clients there could read and write every "
              "session. Give --token TOKEN (or $CONVERSATION_SESSION_TOKENS), or listen on 127.0.0.1.",
              file=sys.stderr)
        return 2
    if not 0 < config.port < 65536:
        print(f"--port must be 1-65535, not {config.port}", file=sys.stderr)
        return 2
    if config.tts == "espeak":
        from ..speech import ESPEAK_INSTALL_HINT, find_espeak

        if find_espeak() is None:
            print(f"--tts espeak: espeak-ng is not installed; {ESPEAK_INSTALL_HINT}", file=sys.stderr)
            return 2
    if config.tools_file:
        from ..tools._builtin import tools_from_file

        try:  # checked before listening: a bad file is named now, not at the first turn
            tools_from_file(config.tools_file)
        except ValueError as exc:
            print(f"--tools-file: {exc}", file=sys.stderr)
            return 2
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 1
    setup_json_logging(config.log_level, config.log_format)
    common = {"host": config.host, "port": config.port, "log_config": None, "access_log": False,
              "timeout_graceful_shutdown": config.shutdown_grace_s or None, "lifespan": "on",
              "server_header": False,
              # A WebSocket frame is refused (close 1009) well before it could hurt; the app
              # answers frames over the body limit with an error event.
              "ws_max_size": max(4 * config.max_body_bytes, 1 << 16)}
    logger.info("serving on http://%s:%d with %d worker(s), backend %s, store %s", config.host, config.port,
                config.workers, config.backend, config.store or config.sessions_dir or "(default folder)")
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler that
    # was there before it: a no-op one makes a clean stop exit 0 (what service managers expect).
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        if config.workers > 1:
            # Workers are started by import: they read the config from the environment.
            os.environ[CONFIG_ENV] = config.to_env()
            from uvicorn.supervisors import Multiprocess

            uv = uvicorn.Config("conversation_session.service._app:app_from_env", factory=True,
                                workers=config.workers, **common)  # type: ignore[arg-type]
            sock = uv.bind_socket()
            # What uvicorn.run does, plus TCP_NODELAY on the shared socket (accepted connections
            # inherit it): without it every keep-alive response waits ~40 ms for a delayed ACK,
            # because the workers' transports are made from an inherited socket asyncio does not
            # tune as it tunes its own.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Multiprocess(uv, sockets=[sock]).run()
        else:
            from ._app import create_app

            uvicorn.run(create_app(config), **common)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        pass
    except SystemExit as exc:  # uvicorn exits on a startup failure (port taken, store down)
        return int(exc.code) if isinstance(exc.code, int) else 1
    return 0

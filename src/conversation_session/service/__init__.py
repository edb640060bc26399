"""The session service: durable conversations over HTTP and WebSocket, for voice devices.

    conversation-session serve                       # loopback, embedded model, file store
    python -m conversation_session.service --store postgresql://... --workers 4 --host 0.0.0.0 --token T

``create_app(config)`` is the ASGI app (Starlette) for embedding; ``main(argv)`` the command.
Starlette and uvicorn are the ``service`` extra: ``pip install 'conversation-session[service]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import INSTALL_HINT, ServiceConfig

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["INSTALL_HINT", "ServiceConfig", "create_app", "main"]


def create_app(config: ServiceConfig | None = None, **kwargs: Any) -> Starlette:
    """The ASGI app for one worker; see ``_app.create_app``."""
    try:
        from ._app import create_app as build
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    return build(config, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """``conversation-session serve``: parse ``argv`` and run the server until SIGINT/SIGTERM."""
    from ._main import run

    return run(argv)

"""The seed's `from logger_config import setup_logger`."""

from _bootstrap import ensure_environment

ensure_environment()

from conversation_session import setup_logger  # noqa: E402

__all__ = ["setup_logger"]

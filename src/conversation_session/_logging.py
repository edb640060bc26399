"""Logging set-up for applications (the library itself only logs, it never configures)."""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logger"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logger(level: str | int = "INFO", log_file: str | os.PathLike[str] | None = None) -> logging.Logger:
    """Configure and return the ``conversation_session`` logger.

    At ``DEBUG`` every save and load logs its path, size and duration.  Calling it again
    replaces the handlers it added before instead of stacking duplicates.

    Args:
        level: a level name (``"DEBUG"``, ``"INFO"``, ...) or number.
        log_file: also append the log to this file.
    """
    if isinstance(level, str):
        value = logging.getLevelName(level.upper())
        if not isinstance(value, int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = value
    logger = logging.getLogger("conversation_session")
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if getattr(h, "_conversation_session", False)]:
        logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._conversation_session = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger

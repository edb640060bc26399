"""The rules for a session's limits, in one place: the session, its setters, the chat app's
``/set`` and both command lines check values through these functions."""

from __future__ import annotations

import math

__all__ = ["DEFAULT_TIMEOUT_S", "DEFAULT_TOOL_ROUNDS", "SUMMARY_TIMEOUT_S", "check_max_tokens", "check_timeout",
           "check_tool_rounds", "parse_timeout"]

DEFAULT_TIMEOUT_S = 60.0
"""A whole turn's limit unless the caller says otherwise (finite, as httpx's timeouts are)."""
SUMMARY_TIMEOUT_S = 120.0
"""A summary job's limit when the session's turns have none (``timeout=None``): summaries run
in the background, and a hung summariser must not hold a pool thread for ever."""
DEFAULT_TOOL_ROUNDS = 5
"""Rounds of tool calls a turn may make before the model is asked once more without tools."""


def check_timeout(value: object, name: str = "timeout") -> float | None:
    """``value`` if it is a positive, finite number of seconds or ``None`` (no limit), else ``ValueError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    return float(value)


def parse_timeout(text: str, name: str = "timeout") -> float | None:
    """A command line's seconds: ``0`` means no limit; anything not a finite number >= 0 is refused."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number of seconds") from None
    if value == 0:
        return None
    return check_timeout(value, name)


def check_max_tokens(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_tokens must be a whole number of at least 1, not {value!r}")
    return value


def check_tool_rounds(value: object) -> int:
    """``max_tool_rounds``: a whole number >= 0 (0: tools are never offered)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"max_tool_rounds must be a whole number of at least 0, not {value!r}")
    return value

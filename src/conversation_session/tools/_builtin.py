"""Tools the chat app offers by name (``--tool NAME``)."""

from __future__ import annotations

from datetime import datetime

from ._tool import Tool, tool

__all__ = ["BUILTIN_TOOLS", "builtin_tools", "current_time"]


def current_time() -> str:
    """The local date and time now, in ISO 8601 with the UTC offset, then the time zone's name."""
    now = datetime.now().astimezone()
    return f"{now.isoformat(timespec='seconds')} ({now.tzname()})"


BUILTIN_TOOLS: dict[str, Tool] = {
    "time": tool(current_time, idempotent=True, timeout_s=5.0),
}


def builtin_tools(names: list[str] | None) -> list[Tool]:
    """The built-in tools named (``ValueError`` for an unknown name)."""
    out: list[Tool] = []
    for name in names or []:
        if name not in BUILTIN_TOOLS:
            raise ValueError(f"no built-in tool {name!r}; there are: {', '.join(sorted(BUILTIN_TOOLS))}")
        out.append(BUILTIN_TOOLS[name])
    return out

"""Tools the chat app offers: built in, by name (``--tool NAME``), or a file's public functions
(``--tools-file PATH.py``)."""

from __future__ import annotations

import importlib.util
import inspect
import os
from datetime import datetime

from ._tool import Tool, tool

__all__ = ["BUILTIN_TOOLS", "builtin_tools", "current_time", "tools_from_file"]


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


def tools_from_file(path: str | os.PathLike[str]) -> list[Tool]:
    """The public functions defined in the Python file ``path`` (and the ``Tool`` objects it
    makes with ``tool()``), as tools.  Imported functions and names starting with ``_`` are not.

    Raises:
        ValueError: the file cannot be loaded, or defines no tool.
    """
    name = f"conversation_session_tools_{abs(hash(os.fspath(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: say what is wrong with it
        raise ValueError(f"{path}: could not load it: {type(exc).__name__}: {exc}") from exc
    out: list[Tool] = []
    for attr, value in vars(module).items():
        if attr.startswith("_"):
            continue
        if isinstance(value, Tool):
            out.append(value)
        elif inspect.isfunction(value) and value.__module__ == name:
            out.append(tool(value))
    if not out:
        raise ValueError(f"{path}: defines no public function to offer as a tool")
    return out

"""``Tool``: a function and the JSON schema that describes it to a model.

The schema is derived the way ollama-python's ``convert_function_to_tool`` does it: the
parameters from the type hints (``str``, ``int``, ``float``, ``bool``, lists, dicts, ``Literal``,
``Optional``/``X | None``), the description from the docstring's first paragraph and each
parameter's from its ``Args:`` section (Google style).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Tool", "ToolCall", "as_tools", "tool"]

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
_SIMPLE: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                           list: "array", tuple: "array", set: "array", dict: "object"}


@dataclass(frozen=True)
class ToolCall:
    """A call a model asked for: what a backend reports at the end of its stream."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True)
class Tool:
    """A callable the model may use.  Build it with ``tool()``; calling it calls the function.

    Attributes:
        name: what the model calls it (default: the function's name).
        description: from the docstring.
        parameters: the JSON schema of the arguments (an ``object`` schema).
        idempotent: running it twice does no harm (the chat app's ``--approve`` asks only for
            the others).  The library never re-runs a recorded call either way.
        timeout_s: seconds a call may take; past it the model gets an error result, and what
            the call returns later is logged, never recorded.  None: the turn's own limit.
    """

    fn: Callable[..., Any]
    name: str
    description: str
    parameters: dict[str, Any]
    idempotent: bool = False
    timeout_s: float | None = None

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.fn)

    def schema(self) -> dict[str, Any]:
        """The tool as the chat APIs (OpenAI, Ollama) take it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def tool(fn: Callable[..., Any] | None = None, *, name: str | None = None, idempotent: bool = False,
         timeout_s: float | None = None) -> Any:
    """Make ``fn`` a ``Tool``; also a decorator: ``@tool`` or ``@tool(timeout_s=5)``.

    Raises:
        TypeError: ``fn`` is not callable, or a parameter is ``*args``/``**kwargs``.
        ValueError: the name is not a valid tool name, or ``timeout_s`` is not positive.
    """
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds or None, not {timeout_s!r}")

    def make(f: Callable[..., Any]) -> Tool:
        if isinstance(f, Tool):
            f = f.fn
        if not callable(f):
            raise TypeError(f"a tool must be a function, not {type(f).__name__}")
        tool_name = str(name or getattr(f, "__name__", ""))
        if not _NAME_RE.fullmatch(tool_name):
            raise ValueError(f"{tool_name!r} is not a valid tool name (letters, digits, _ . -; at most 64)")
        description, params = _describe(f)
        return Tool(f, tool_name, description, params, idempotent=bool(idempotent),
                    timeout_s=None if timeout_s is None else float(timeout_s))

    return make if fn is None else make(fn)


def as_tools(tools: Iterable[Any] | None, base: dict[str, Tool] | None = None) -> dict[str, Tool]:
    """``tools`` (functions or ``Tool``s) by name, after ``base``'s; a name given twice is an error."""
    out = dict(base or {})
    if tools is None:
        return out
    if isinstance(tools, (str, bytes)) or callable(tools):
        raise TypeError("tools must be a list of functions or Tool objects")
    seen: set[str] = set()
    for t in tools:
        made = t if isinstance(t, Tool) else tool(t)
        if made.name in seen:
            raise ValueError(f"two tools are named {made.name!r}")
        seen.add(made.name)
        out[made.name] = made  # a per-call tool of a session tool's name replaces it for that call
    return out


def _describe(fn: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    doc = inspect.getdoc(fn) or ""
    summary, arg_docs = _parse_doc(doc)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: described as "any"
        hints = {}
    props: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {getattr(fn, '__name__', fn)!r}: *{pname} cannot be described to a model")
        schema, optional = _type_schema(hints.get(pname, Any))
        if pname in arg_docs:
            schema["description"] = arg_docs[pname]
        props[pname] = schema
        if param.default is param.empty and not optional:
            required.append(pname)
    return summary, {"type": "object", "properties": props, "required": required}


def _type_schema(hint: Any) -> tuple[dict[str, Any], bool]:
    """(JSON schema of ``hint``, whether None is allowed)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return {}, False
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}, False
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType)):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) == 1:
            return _type_schema(rest[0])[0], optional
        return {"anyOf": [_type_schema(a)[0] for a in rest]}, optional
    if origin is typing.Literal:
        values = list(args)
        kinds = {_SIMPLE.get(type(v)) for v in values}
        out: dict[str, Any] = {"enum": values}
        if len(kinds) == 1 and None not in kinds:
            out["type"] = kinds.pop()
        return out, False
    if origin in (list, tuple, set, frozenset) or origin is typing.Sequence:
        item = _type_schema(args[0])[0] if args else {}
        return ({"type": "array", "items": item} if item else {"type": "array"}), False
    if origin is dict or origin is typing.Mapping:
        return {"type": "object"}, False
    return {}, False


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    """(the text before the first section, {parameter: description} of ``Args:``)."""
    lines = doc.splitlines()
    summary: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    for line in lines:
        stripped = line.strip()
        if re.fullmatch(r"[A-Z][A-Za-z ]*:", stripped):
            section = stripped[:-1].lower()
            current = None
            continue
        if section is None:
            summary.append(stripped)
        elif section in ("args", "arguments", "parameters", "params") and stripped:
            m = re.match(r"(\w+)\s*(\([^)]*\))?\s*:\s*(.*)", stripped)
            if m and (line[:len(line) - len(line.lstrip())].count(" ") <= 4 or current is None):
                current = m.group(1)
                args[current] = m.group(3).strip()
            elif current is not None:
                args[current] = f"{args[current]} {stripped}".strip()
    text = " ".join(" ".join(summary).split())
    return text, args

"""Tool calls on the embedded model: how tools, calls and results are written into the prompt,
the grammar that forces a call, and how a reply is read back as calls.

One format for every model, whatever its chat template knows of tools (SmolLM2's knows
nothing): a call is written as the JSON object ``{"name": ..., "arguments": {...}}``, one per
line, in the assistant message that asks for it; a result is a message of role ``tool`` holding
the result's text.  Call ids are not written (the model needs none, and the history's ids may
be renamed by the session), so a conversation renders the same way on every turn and the KV
cells of its history stay valid.

The tool descriptions are a system message placed right before the reply, never at the start:
the tools offered change from call to call (per-call tools, the last round offered none), and
a block at the start would make every change recompute the whole conversation.  At the end it
only costs the current turn's tail, whose cells the realignment brings back in line with the
saved history anyway.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from .._exceptions import BackendError
from ..stores._record import MessageDict
from ..tools._tool import ToolCall

logger = logging.getLogger("conversation_session.backends.llama_cpp")

__all__ = ["call_message", "forced_names", "forced_schema", "parse_calls", "template_messages", "tool_block"]


def _call_json(name: str, arguments: Any) -> str:
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def template_messages(messages: list[MessageDict], block: str | None = None) -> list[dict[str, Any]]:
    """``messages`` as the chat template takes them (role and content only), and the tool block
    (if any) as a system message after them."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            lines = [_call_json(c["function"]["name"], c["function"]["arguments"]) for c in calls]
            text = "\n".join([m["content"], *lines]) if m["content"] else "\n".join(lines)
            out.append({"role": m["role"], "content": text})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if block is not None:
        out.append({"role": "system", "content": block})
    return out


def _names(tools: list[dict[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def forced_names(tools: list[dict[str, Any]], choice: Any) -> list[str] | None:
    """The tools a call is forced to (``tool_choice``: a name, ``{"type": "function",
    "function": {"name": ...}}`` or ``"required"``); None when the model may answer freely
    (``None``, ``"auto"``).  ``"none"`` is handled by the caller (no tools offered).

    Raises:
        BackendError: ``tool_choice`` names a tool that is not offered, or is not a choice.
    """
    if choice is None or choice == "auto":
        return None
    if choice == "required":
        return _names(tools)
    if isinstance(choice, dict):
        fn = choice.get("function")
        choice = fn.get("name") if isinstance(fn, dict) else None
    if isinstance(choice, str) and choice in _names(tools):
        return [choice]
    raise BackendError(f"tool_choice {choice!r} is not one of the tools offered ({', '.join(_names(tools))}), "
                       "'auto', 'none' or 'required'")


def tool_block(tools: list[dict[str, Any]], forced: list[str] | None) -> str:
    """The system message that describes the tools and how to call one."""
    lines = ["You can call these tools:"]
    for t in tools:
        fn = t["function"]
        lines.append(json.dumps({"name": fn["name"], "description": fn.get("description", ""),
                                 "parameters": fn.get("parameters", {})}, ensure_ascii=False))
    lines.append('To call a tool, reply with only a JSON object: {"name": "<the tool>", "arguments": '
                 '{<its arguments>}}. A tool\'s result comes back in a message of role tool.')
    if forced is None:
        lines.append("If no tool is needed, answer normally.")
    elif len(forced) == 1:
        lines.append(f"Call the tool {forced[0]} now.")
    else:
        lines.append("Call one of the tools now.")
    return "\n".join(lines)


def forced_schema(tools: list[dict[str, Any]], forced: list[str]) -> dict[str, Any]:
    """The JSON schema of one call to one of ``forced``: ``{"name": <const>, "arguments": {...}}``."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    options = []
    for name in forced:
        params = by_name[name].get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                        "required": ["name", "arguments"]})
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse_calls(text: str, tools: list[dict[str, Any]]) -> list[ToolCall] | None:
    """The calls a reply asks for, or None if it is not a call.

    The rule (unforced replies): the whole reply, stripped, is one JSON object ``{"name":
    <an offered tool>, "arguments": {<an object>}}``, or a JSON list of such objects, or such
    objects one per line.  Anything else (prose, a JSON object that names no offered tool,
    a call followed by prose) is text, given to the user as it was written.
    """
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[":
        return None
    try:
        value = json.loads(stripped)
        items = value if isinstance(value, list) else [value]
    except ValueError:
        try:
            items = [json.loads(line) for line in stripped.splitlines() if line.strip()]
        except ValueError:
            return None
    names = set(_names(tools))
    calls: list[ToolCall] = []
    for item in items:
        if not (isinstance(item, dict) and set(item) <= {"name", "arguments"} and item.get("name") in names
                and isinstance(item.get("arguments", {}), dict)):
            return None
        calls.append(ToolCall(item["name"], dict(item.get("arguments", {})), f"call_{uuid.uuid4().hex[:12]}"))
    return calls or None


def call_message(text: str, calls: list[ToolCall]) -> MessageDict:
    """The assistant message the session records for ``calls`` (rendered as the next turns will
    render it: what the reply's cells are realigned to)."""
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}

"""What the history holds of tool calls, and the repair of a call left without a result.

A call is recorded (the assistant message that asks for it) before it runs, and its result
after.  A process killed between the two leaves a call without a result: on load it gets one,
``UNKNOWN_OUTCOME``, so the history has no orphan call (every chat API refuses a request with
one) and the call is never run again by the library.

A call marked ``"client": true`` is run by the API client that declared the tool (the service's
Ollama and OpenAI surfaces, docs/compat.md), not by this process: a restart says nothing about
its outcome, the client is expected to send its result with its next request.  So it is not
repaired on load; it stays pending until the client answers it, or until the conversation moves
on without an answer (a new user message): then it gets ``NO_CLIENT_RESULT``.
"""

from __future__ import annotations

import logging

from ..stores._record import MessageDict, ToolCallDict

__all__ = ["NO_CLIENT_RESULT", "UNKNOWN_OUTCOME", "describe_call", "orphan_calls", "pending_client_calls",
           "readable", "result_message"]

logger = logging.getLogger("conversation_session")

UNKNOWN_OUTCOME = ("error: the outcome of this call is unknown (the process stopped while it ran); "
                   "it may or may not have run")


NO_CLIENT_RESULT = "error: the client sent no result for this call; the conversation went on without it"


def pending_client_calls(messages: list[MessageDict]) -> list[ToolCallDict]:
    """The client's calls waiting for their results (the last call request's, ``"client": true``)."""
    return [c for c in orphan_calls(messages, quiet=True) if c.get("client")]


def result_message(call: ToolCallDict, content: str) -> MessageDict:
    return {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": content}


def orphan_calls(messages: list[MessageDict], *, quiet: bool = False) -> list[ToolCallDict]:
    """The calls of the history's last call request that have no result, when only results
    follow it (where a stopped process leaves them: results can be appended there).  An orphan
    anywhere else (a hand-edited file) is logged, not repaired."""
    answered = {m.get("tool_call_id") for m in messages if m["role"] == "tool"}
    last: list[ToolCallDict] = []
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] == "tool":
            continue
        if m["role"] == "assistant" and m.get("tool_calls"):
            last = [c for c in m.get("tool_calls", []) if c["id"] not in answered]
        break
    elsewhere = sum(1 for m in messages if m["role"] == "assistant"
                    for c in m.get("tool_calls", []) if c["id"] not in answered) - len(last)
    if elsewhere and not quiet:
        logger.warning("%d tool call(s) in the middle of the history have no result; left as they are", elsewhere)
    return last


def describe_call(call: ToolCallDict) -> str:
    """A call as one line a person reads: ``set_light(room='kitchen', on=True)``."""
    args = ", ".join(f"{k}={v!r}" for k, v in call["function"]["arguments"].items())
    return f"{call['function']['name']}({args})"


def readable(m: MessageDict) -> str:
    """A message's text for people (history listings, Markdown): calls and results included."""
    if m["role"] == "tool":
        return f"{m.get('name', '')} → {m['content']}"
    calls = m.get("tool_calls")
    if not calls:
        return m["content"]
    asked = "; ".join(describe_call(c) for c in calls)
    return f"{m['content']}\n🔧 {asked}" if m["content"] else f"🔧 {asked}"

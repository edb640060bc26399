"""Tools a model may call: plain functions, described to the model by a JSON schema derived
from their type hints and docstring, run by the session between two requests to the model.

    from conversation_session import ConversationSession, tool

    @tool(idempotent=True, timeout_s=5)
    def current_time() -> str:
        "The local date and time, ISO 8601 with its zone."
        ...

    with ConversationSession(tools=[current_time]) as s:
        s.chat("现在几点？")

``_tool.py`` has the description (``Tool``, ``tool``), ``_run.py`` the running of one call
(time limit, errors as results, a late result logged and never recorded), ``_history.py`` what
the history holds of calls (the messages, the crash repair of a call without a result).
"""

from ._history import (
    NO_CLIENT_RESULT,
    UNKNOWN_OUTCOME,
    describe_call,
    orphan_calls,
    pending_client_calls,
    readable,
    result_message,
)
from ._run import CallOutcome, arun_call, run_call
from ._tool import Tool, ToolCall, as_tools, tool

__all__ = [
    "NO_CLIENT_RESULT",
    "UNKNOWN_OUTCOME",
    "CallOutcome",
    "Tool",
    "ToolCall",
    "arun_call",
    "as_tools",
    "describe_call",
    "orphan_calls",
    "pending_client_calls",
    "readable",
    "result_message",
    "run_call",
    "tool",
]

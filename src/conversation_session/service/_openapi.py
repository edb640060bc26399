"""The OpenAPI 3.1 document served at ``/openapi.json`` (written by hand: it is the contract)."""

from __future__ import annotations

from typing import Any

from .._version import __version__
from ..stores._ids import SESSION_ID_PATTERN
from ._openapi_compat import compat_components, compat_paths

__all__ = ["openapi_document"]

_DETACH = ("the turn belongs to the session, not to this request: if the client goes away (a reloaded "
           "browser tab) the turn still completes and is saved; follow it with GET .../live, stop it with "
           "POST .../stop.  Without it a client that disconnects cancels the turn (nothing kept), as voice "
           "devices expect.  A second detached turn on the same session while one runs: 409")


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": _json(_ref("Error"), "bad input (malformed JSON, invalid id, empty text)"),
    "401": _json(_ref("Error"), "missing or wrong bearer token"),
    "403": _json(_ref("Error"), "cross_origin: sent by a web page of another origin (see --allow-origin)"),
    "404": _json(_ref("Error"), "no such session for this token"),
    "409": _json(_ref("Error"), "the session stayed busy with another request past the wait bound; retry"),
    "413": _json(_ref("Error"), "body over 64 KB or text over 16 KB"),
    "415": _json(_ref("Error"), "a body without Content-Type: application/json"),
    "421": _json(_ref("Error"), "unknown_host: Host is not a name of this service (see --allowed-host)"),
    "429": _json(_ref("Error"), "rate limit for this token (across all workers); see Retry-After"),
    "503": _json(_ref("Error"), "not ready (model loading) or store unavailable"),
}
_SID = [{"name": "sid", "in": "path", "required": True,
         "schema": {"type": "string", "pattern": f"^{SESSION_ID_PATTERN}$"}}]


def openapi_document() -> dict[str, Any]:
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]}, "content": {"type": "string"},
        "interrupted": {"type": "boolean"},
        # schema 5: an assistant's call request, and a tool message's answer to one
        "tool_calls": {"type": "array", "items": {"type": "object", "required": ["id", "type", "function"],
                                                  "properties": {"id": {"type": "string"}, "type": {"type": "string"},
                                                                 "function": {"type": "object"}}}},
        "tool_call_id": {"type": "string"}, "name": {"type": "string"}}}
    figures = {"type": "object", "properties": {
        "ttft_s": {"type": ["number", "null"]}, "total_s": {"type": "number"},
        "prompt_tokens": {"type": ["integer", "null"]}, "cached_tokens": {"type": ["integer", "null"]},
        "completion_tokens": {"type": ["integer", "null"]}, "saved": {"type": "boolean"},
        "durability": {"type": ["string", "null"], "enum": ["process", "power", None]},
        "finish_reason": {"type": ["string", "null"]}, "trimmed_turns": {"type": "integer"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "conversation-session service", "version": __version__,
                 "description": "Durable conversations for voice devices: every acknowledged turn is saved; "
                                "any worker serves any session; a busy session answers 409 after a bounded wait. "
                                "WebSocket per session at /v1/sessions/{sid}/ws (see the README); with ?audio=wav "
                                "on a server started with --tts, each sentence's WAV follows as a binary frame. "
                                "Ollama's API (/api/...) and OpenAI's chat completions (/v1/models, "
                                "/v1/chat/completions) reach the same durable sessions (docs/compat.md); for "
                                "clients that take only a URL, every route also answers under /t/TOKEN/ (the "
                                "token in the path instead of the Authorization header)."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {
                    "error": {"type": "object", "properties": {"code": {"type": "string"},
                                                               "message": {"type": "string"}}},
                    "request_id": {"type": "string"}}},
                "Message": message,
                "TurnResult": {"type": "object", "properties": {
                    "session_id": {"type": "string"}, "response": {"type": "string"}, "turn": {"type": "integer"},
                    "figures": figures,
                    "tool_calls": {"type": "array", "description": "the server-side tool calls this turn made "
                                   "(serve --tools-file), in order; absent when none",
                                   "items": _ref("ToolCall")}}},
                "ToolCall": {"type": "object", "required": ["id", "name", "arguments"], "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "arguments": {"type": "object"},
                    "result": {"type": "string"},
                    "error": {"type": "string", "description": "instead of result: 'error: <Class>: <message>'"},
                    "duration_s": {"type": "number"}}},
                "SessionSummary": {"type": "object", "properties": {
                    "session_id": {"type": "string"}, "created_at": {"type": "string"},
                    "updated_at": {"type": "string"}, "turns": {"type": "integer"},
                    "total_messages": {"type": "integer"}, "first_user_line": {"type": "string"},
                    "title": {"type": ["string", "null"]}}},
                **compat_components(),
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {"summary": "the process is up", "security": [],
                                 "responses": {"200": {"description": "up"}}}},
            "/readyz": {"get": {"summary": "the backend is loaded and the store reachable", "security": [],
                                "responses": {"200": {"description": "ready"}, "503": _ERRORS["503"]}}},
            "/v1/sessions": {
                "post": {"summary": "create a session (optionally with its own system prompt)",
                         "requestBody": {"required": False, "content": {"application/json": {"schema": {
                             "type": "object", "properties": {"system_prompt": {"type": "string",
                                                                                "maxLength": 16384}}}}}},
                         "responses": {
                    "201": _json({"type": "object", "properties": {"session_id": {"type": "string"},
                                                                   "created_at": {"type": "string"}}}, "created"),
                    **_ERRORS}},
                "get": {"summary": "this token's sessions, newest first", "responses": {
                    "200": _json({"type": "object", "properties": {
                        "sessions": {"type": "array", "items": _ref("SessionSummary")}}}, "the list"), **_ERRORS}},
            },
            "/v1/sessions/{sid}": {
                "parameters": _SID,
                "get": {"summary": "summary and history", "responses": {
                    "200": _json({"allOf": [_ref("SessionSummary"), {"type": "object", "properties": {
                        "history": {"type": "array", "items": _ref("Message")}}}]}, "the session"), **_ERRORS}},
                "delete": {"summary": "delete the session and its history", "responses": {
                    "200": _json({"type": "object"}, "deleted"), **_ERRORS}},
                "patch": {"summary": "rename: the title (one line; null removes it); 409 before the first turn",
                          "requestBody": {"required": True, "content": {"application/json": {"schema": {
                              "type": "object", "required": ["title"], "properties": {
                                  "title": {"type": ["string", "null"], "maxLength": 200}}}}}},
                          "responses": {"200": _json({"type": "object", "properties": {
                              "title": {"type": ["string", "null"]}}}, "renamed"), **_ERRORS}},
            },
            "/v1/sessions/{sid}/messages": {
                "parameters": _SID,
                "post": {
                    "summary": "send a message; the reply is saved before it is returned",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["text"], "properties": {
                            "text": {"type": "string", "maxLength": 16384},
                            "stream": {"type": "boolean", "default": False},
                            "detach": {"type": "boolean", "default": False, "description": _DETACH}}}}}},
                    "responses": {
                        "200": {"description": "the reply (JSON), or with stream=true server-sent events: "
                                               "`piece` {text} ..., then `done` (a TurnResult) or `error`; with "
                                               "server-side tools, `tool_call` {id, name, arguments} as a call "
                                               "is about to run and `tool_result` (a ToolCall) once its result "
                                               "is recorded, between the rounds' pieces; "
                                               "a detached stream starts with `start` {session_id, text, retry} "
                                               "and ends with `done`, `interrupted` (after /stop) or `error`",
                                "content": {"application/json": {"schema": _ref("TurnResult")},
                                            "text/event-stream": {"schema": {"type": "string"}}}},
                        "502": _json(_ref("Error"), "the model backend failed"),
                        "504": _json(_ref("Error"), "the turn timed out (history kept)"),
                        **_ERRORS}},
            },
            "/v1/sessions/{sid}/export": {
                "parameters": _SID,
                "get": {"summary": "the session as a download: the library's JSON file format, or Markdown",
                        "parameters": [{"name": "format", "in": "query", "required": False,
                                        "schema": {"type": "string", "enum": ["json", "md"], "default": "json"}}],
                        "responses": {"200": {"description": "the session file", "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "text/markdown": {"schema": {"type": "string"}}}}, **_ERRORS}}},
            **_more_paths(),
            "/api/conversation/process": {
                "post": {
                    "summary": "Home Assistant's conversation API (memory never expires)",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["text"], "properties": {
                            "text": {"type": "string"}, "conversation_id": {"type": "string"},
                            "language": {"type": "string"}}}}}},
                    "responses": {"200": _json({"type": "object", "properties": {
                        "conversation_id": {"type": "string"}, "continue_conversation": {"type": "boolean"},
                        "response": {"type": "object"}}}, "Home Assistant's answer shape"), **_ERRORS}},
            },
            **compat_paths(),
        },
    }


def _more_paths() -> dict[str, Any]:
    """The routes the web page added (service/_actions.py); any client may use them."""
    sse = {"text/event-stream": {"schema": {"type": "string"}}}
    empty_body = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "/": {"get": {"summary": "the web page (HTML; its script and style under /web/)", "security": [],
                      "responses": {"200": {"description": "the page", "content": {"text/html": {}}}}}},
        "/v1/search": {"get": {
            "summary": "this token's sessions whose title or messages hold the text (case-insensitive)",
            "parameters": [{"name": "q", "in": "query", "required": True, "schema": {"type": "string",
                                                                                  "maxLength": 200}}],
            "responses": {"200": _json({"type": "object", "properties": {"query": {"type": "string"}, "hits": {
                "type": "array", "items": {"type": "object", "properties": {
                    "session_id": {"type": "string"}, "title": {"type": ["string", "null"]},
                    "updated_at": {"type": "string"}, "index": {"type": "integer", "description": "-1: the title"},
                    "role": {"type": "string"}, "snippet": {"type": "string"}}}}}}, "the hits"), **_ERRORS}}},
        "/v1/sessions/{sid}/undo": {"parameters": _SID, "post": {
            "summary": "withdraw the last turn (durably; the export keeps it under withdrawn turns)",
            "requestBody": empty_body,
            "responses": {"200": _json({"type": "object", "properties": {
                "undone": {"type": "boolean"}, "turns": {"type": "integer"}}}, "done"), **_ERRORS}}},
        "/v1/sessions/{sid}/retry": {"parameters": _SID, "post": {
            "summary": "ask the last user message again; the new reply replaces the last one",
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"stream": {"type": "boolean", "default": False,
                                                            "description": "only with detach"},
                                                 "detach": {"type": "boolean", "default": False,
                                                            "description": _DETACH}}}}}},
            "responses": {"200": {"description": "a TurnResult, or (stream) the events of a detached turn",
                                  "content": {"application/json": {"schema": _ref("TurnResult")}, **sse}},
                          **_ERRORS}}},
        "/v1/sessions/{sid}/stats": {"parameters": _SID, "get": {
            "summary": "the context figures (tokens in the window, cache hits, last turn's timings)",
            "responses": {"200": _json({"type": "object", "properties": {"stats": {"type": "object"}}},
                                       "the figures"), **_ERRORS}}},
        "/v1/sessions/{sid}/live": {"parameters": _SID, "get": {
            "summary": "follow the detached reply being written in this worker",
            "description": "Server-sent events: `start` {session_id, text, retry}, one `piece` with the reply "
                           "so far, each new `piece`, then `done` / `interrupted` / `error`.  When none runs: "
                           "one `idle` {session_id, turns}.  Going away stops following, not the turn.",
            "responses": {"200": {"description": "events", "content": sse}, **_ERRORS}}},
        "/v1/sessions/{sid}/cut": {"parameters": _SID, "post": {
            "summary": "barge-in after the reply was saved: keep it as far as it was heard, marked interrupted",
            "description": "For a player that buffered the reply's audio and stopped it later than the WebSocket "
                           "could know. `heard` must start the last reply; `turn` is its turn number (the session "
                           "moved on since: 409 moved_on, nothing cut). An empty `heard` withdraws the turn.",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["heard", "turn"], "properties": {
                    "heard": {"type": "string"}, "turn": {"type": "integer"}}}}}},
            "responses": {"200": _json({"type": "object", "properties": {
                "cut": {"type": "boolean"}, "kept": {"type": "boolean"}, "turn": {"type": "integer"},
                "response": {"type": "string"}}}, "done"), **_ERRORS}}},
        "/v1/sessions/{sid}/stop": {"parameters": _SID, "post": {
            "summary": "stop the detached reply: kept as far as it was written, marked interrupted",
            "requestBody": empty_body,
            "responses": {"200": _json({"type": "object", "properties": {"stopped": {
                "type": "boolean", "description": "false: no reply was being written"}}}, "done"), **_ERRORS}}},
    }

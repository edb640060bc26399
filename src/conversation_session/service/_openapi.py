"""The OpenAPI 3.1 document served at ``/openapi.json`` (written by hand: it is the contract)."""

from __future__ import annotations

from typing import Any

from .._version import __version__
from ..stores._ids import SESSION_ID_PATTERN

__all__ = ["openapi_document"]


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
        "role": {"type": "string", "enum": ["system", "user", "assistant"]}, "content": {"type": "string"},
        "interrupted": {"type": "boolean"}}}
    figures = {"type": "object", "properties": {
        "ttft_s": {"type": ["number", "null"]}, "total_s": {"type": "number"},
        "prompt_tokens": {"type": ["integer", "null"]}, "cached_tokens": {"type": ["integer", "null"]},
        "completion_tokens": {"type": ["integer", "null"]}, "saved": {"type": "boolean"},
        "finish_reason": {"type": ["string", "null"]}, "trimmed_turns": {"type": "integer"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "conversation-session service", "version": __version__,
                 "description": "Durable conversations for voice devices: every acknowledged turn is saved; "
                                "any worker serves any session; a busy session answers 409 after a bounded wait. "
                                "WebSocket per session at /v1/sessions/{sid}/ws (see the README); with ?audio=wav "
                                "on a server started with --tts, each sentence's WAV follows as a binary frame."},
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
                    "figures": figures}},
                "SessionSummary": {"type": "object", "properties": {
                    "session_id": {"type": "string"}, "created_at": {"type": "string"},
                    "updated_at": {"type": "string"}, "turns": {"type": "integer"},
                    "total_messages": {"type": "integer"}, "first_user_line": {"type": "string"}}},
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
            },
            "/v1/sessions/{sid}/messages": {
                "parameters": _SID,
                "post": {
                    "summary": "send a message; the reply is saved before it is returned",
                    "requestBody": {"required": True, "content": {"application/json": {"schema": {
                        "type": "object", "required": ["text"], "properties": {
                            "text": {"type": "string", "maxLength": 16384},
                            "stream": {"type": "boolean", "default": False}}}}}},
                    "responses": {
                        "200": {"description": "the reply (JSON), or with stream=true server-sent events: "
                                               "`piece` {text} ..., then `done` (a TurnResult) or `error`",
                                "content": {"application/json": {"schema": _ref("TurnResult")},
                                            "text/event-stream": {"schema": {"type": "string"}}}},
                        "502": _json(_ref("Error"), "the model backend failed"),
                        "504": _json(_ref("Error"), "the turn timed out (history kept)"),
                        **_ERRORS}},
            },
            "/v1/sessions/{sid}/export": {
                "parameters": _SID,
                "get": {"summary": "the session in the library's JSON file format",
                        "responses": {"200": _json({"type": "object"}, "the session file"), **_ERRORS}}},
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
        },
    }

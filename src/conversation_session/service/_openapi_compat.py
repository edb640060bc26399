"""The Ollama and OpenAI routes in ``/openapi.json`` (``_openapi`` adds them): the contract of
``_ollama_api`` / ``_openai_api`` / ``_compat``, written by hand like the rest of the document.
Only what this service does is said (fields it reads, fields its answers carry); the full
request shapes are Ollama's and OpenAI's own."""

from __future__ import annotations

from typing import Any

__all__ = ["compat_components", "compat_paths"]

_SESSION_RULE = ("Which durable session: an explicit id wins (the X-Session-Id header, Open WebUI's "
                 "X-OpenWebUI-Chat-Id, or OpenAI's `user` field); without one, the session named after `model` "
                 "(per token; `kitchen` and `kitchen:latest` are one).  The client's earlier messages are "
                 "reconciled with the stored history, never appended twice (docs/compat.md).  The session's id "
                 "comes back in the X-Session-Id response header; the native API lists and continues it.")
_MODEL = ("the service's own model (its file name without .gguf) or an `--assistant NAME` of `serve`; each name "
          "has a memory of its own per token; any other name works too (its own memory, the same model)")
_TOKEN_IN_PATH = [
    {"url": "/", "description": "bearer token in the Authorization header"},
    {"url": "/t/{token}", "description": "the token in the path, for clients that take only a URL "
                                         "(Home Assistant's Ollama integration before its API-key field); "
                                         "it is taken out of the path before anything is logged",
     "variables": {"token": {"default": "TOKEN", "description": "one of the service's --token values"}}},
]
_HEADERS = [
    {"name": "X-Session-Id", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 256},
     "description": "the durable session: one of this token's service session ids, or any name (a session of "
                    "its own); the client's messages are then the whole conversation (a mismatch is an edit "
                    "or a regenerate)"},
    {"name": "X-OpenWebUI-Chat-Id", "in": "header", "required": False,
     "schema": {"type": "string", "maxLength": 256},
     "description": "Open WebUI's chat id, as X-Session-Id; Open WebUI always sends the whole chat, so a lone "
                    "message is an edit of the first one"},
]
_SID_HEADER = {"X-Session-Id": {"description": "the service session this request reached",
                                "schema": {"type": "string"}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


def _errors(kind: str, *codes: str) -> dict[str, Any]:
    what = {"400": "bad request", "401": "missing or wrong token", "404": "unknown model",
            "409": "the session stayed busy with another request", "413": "body or message too large",
            "415": "a body without Content-Type: application/json", "429": "rate limit (Retry-After)",
            "502": "the model backend failed", "503": "the model failed to load", "504": "the turn timed out"}
    return {c: _json(_ref(kind), what[c]) for c in codes}


_CHAT_ERRORS = ("400", "401", "409", "413", "415", "429", "502", "503", "504")


def compat_components() -> dict[str, Any]:
    text_or_parts = {"oneOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]}
    return {
        "OllamaError": {"type": "object", "properties": {"error": {"type": "string"}}},
        "OpenAIError": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]}}}}},
        "OllamaMessage": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
            "content": {"type": "string"}}},
        "OllamaModel": {"type": "object", "properties": {
            "name": {"type": "string"}, "model": {"type": "string"}, "modified_at": {"type": "string"},
            "size": {"type": "integer"}, "digest": {"type": "string"}, "details": {"type": "object"}}},
        "OllamaFigures": {"type": "object", "properties": {
            "done": {"type": "boolean"}, "done_reason": {"type": "string", "enum": ["stop", "length", "load"]},
            "total_duration": {"type": "integer", "description": "nanoseconds"},
            "load_duration": {"type": "integer"},
            "prompt_eval_count": {"type": "integer",
                                  "description": "prompt tokens computed (the cached prefix left out)"},
            "prompt_eval_duration": {"type": "integer"}, "eval_count": {"type": "integer"},
            "eval_duration": {"type": "integer"}}},
        "ChatCompletionMessage": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {**text_or_parts, "description": "text only: an image part is refused with 400"}}},
        "ChatCompletionUsage": {"type": "object", "properties": {
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
            "prompt_tokens_details": {"type": "object", "properties": {
                "cached_tokens": {"type": "integer", "description": "prompt tokens served from the KV cache"}}}}},
    }


def _ollama_paths() -> dict[str, Any]:
    err = "OllamaError"
    model_body = {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"model": {"type": "string", "description": _MODEL},
                                         "name": {"type": "string", "description": "old spelling of model"},
                                         "stream": {"type": "boolean", "default": True}}}}}}
    options = {"type": "object", "description": "temperature, seed, stop, num_predict (at most --max-tokens) are "
                                                "used; num_ctx and the rest are accepted",
               "properties": {"temperature": {"type": "number"}, "seed": {"type": "integer"},
                              "num_predict": {"type": "integer"}, "num_ctx": {"type": "integer"},
                              "stop": {"type": "array", "items": {"type": "string"}}}}
    chat_body = {"type": "object", "required": ["model"], "properties": {
        "model": {"type": "string", "description": _MODEL},
        "messages": {"type": "array", "items": _ref("OllamaMessage"),
                     "description": "the last must be the user's, or tool results answering the pending calls in "
                                    "order; empty: only loads the model (done_reason load)"},
        "stream": {"type": "boolean", "default": True}, "options": options,
        "tools": {"type": "array", "description": "offered to the model, run by the client: a call comes back as "
                                                  "message.tool_calls, stored pending until its results"},
        "keep_alive": {"description": "accepted: the model stays loaded for the service's life"},
        "think": {"description": "accepted, not enforced"}, "format": {"description": "accepted, not enforced"}}}
    chat_answer = {"allOf": [_ref("OllamaFigures"), {"type": "object", "properties": {
        "model": {"type": "string"}, "created_at": {"type": "string"},
        "message": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"},
                                                     "tool_calls": {"type": "array", "items": {"type": "object"}}}}}}]}
    ndjson = {"application/x-ndjson": {"schema": {"type": "string", "description": (
        "one JSON object a line: pieces with done=false, then the final object (done=true, the figures); a "
        "failure after the stream started is an {\"error\": ...} line")}}}
    listing = {"type": "object", "properties": {"models": {"type": "array", "items": _ref("OllamaModel")}}}
    return {
        "/api/version": {"get": {"summary": "the Ollama API version this follows", "tags": ["Ollama"],
                                 "security": [], "responses": {"200": _json({"type": "object", "properties": {
                                     "version": {"type": "string"}}}, "the version")}}},
        "/api/tags": {"get": {"summary": "the models: the service's own and each `serve --assistant NAME`",
                              "tags": ["Ollama"], "servers": _TOKEN_IN_PATH,
                              "responses": {"200": _json(listing, "the models"), **_errors(err, "401")}}},
        "/api/ps": {"get": {"summary": "the loaded models (all listed ones: one model, loaded for the service's "
                                       "life)", "tags": ["Ollama"], "servers": _TOKEN_IN_PATH,
                            "responses": {"200": _json(listing, "the models"), **_errors(err, "401")}}},
        "/api/show": {"post": {"summary": "a listed model's details", "tags": ["Ollama"], "servers": _TOKEN_IN_PATH,
                               "requestBody": model_body,
                               "responses": {"200": _json({"type": "object"}, "details, model_info, capabilities"),
                                             **_errors(err, "400", "401", "404")}}},
        "/api/pull": {"post": {"summary": "success for a listed model (nothing is downloaded); 404 with the "
                                          "served names otherwise", "tags": ["Ollama"], "servers": _TOKEN_IN_PATH,
                               "requestBody": model_body,
                               "responses": {"200": {"description": "{status: success}, or its NDJSON steps",
                                                     "content": {"application/json": {"schema": {"type": "object"}},
                                                                 "application/x-ndjson": {"schema": {
                                                                     "type": "string"}}}},
                                             **_errors(err, "400", "401", "404")}}},
        "/api/chat": {"post": {
            "summary": "a turn of a durable session (Home Assistant's Ollama integration, Open WebUI, the ollama "
                       "SDK)", "description": _SESSION_RULE, "tags": ["Ollama"], "servers": _TOKEN_IN_PATH,
            "parameters": _HEADERS,
            "requestBody": {"required": True, "content": {"application/json": {"schema": chat_body}}},
            "responses": {"200": {"description": "the reply (stream=false), or NDJSON pieces", "headers": _SID_HEADER,
                                  "content": {"application/json": {"schema": chat_answer}, **ndjson}},
                          **_errors(err, *_CHAT_ERRORS)}}},
        "/api/generate": {"post": {
            "summary": "a plain completion of `prompt` (and `system`): not stored, no session (use /api/chat for "
                       "memory)", "tags": ["Ollama"], "servers": _TOKEN_IN_PATH,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["model"], "properties": {
                    "model": {"type": "string"}, "prompt": {"type": "string"}, "system": {"type": "string"},
                    "stream": {"type": "boolean", "default": True}, "options": options}}}}},
            "responses": {"200": {"description": "the completion, or NDJSON pieces", "content": {
                "application/json": {"schema": {"allOf": [_ref("OllamaFigures"), {"type": "object", "properties": {
                    "response": {"type": "string"}}}]}}, **ndjson}},
                **_errors(err, "400", "401", "413", "415", "429", "502", "503")}}},
    }


def _openai_paths() -> dict[str, Any]:
    err = "OpenAIError"
    body = {"type": "object", "required": ["model", "messages"], "properties": {
        "model": {"type": "string", "description": _MODEL},
        "messages": {"type": "array", "items": _ref("ChatCompletionMessage"),
                     "description": "the last must be the user's, or tool results (by tool_call_id)"},
        "user": {"type": "string", "description": "an explicit session id when no header names one"},
        "stream": {"type": "boolean", "default": False},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "max_tokens": {"type": "integer"}, "max_completion_tokens": {"type": "integer",
                                                                     "description": "at most --max-tokens"},
        "temperature": {"type": "number"}, "seed": {"type": "integer"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}],
                 "description": "the stored reply is cut at the stop sequence, marked interrupted"},
        "n": {"type": "integer", "enum": [1]},
        "tools": {"type": "array", "description": "offered to the model, run by the client: a call comes back as "
                                                  "message.tool_calls (finish_reason tool_calls), stored pending "
                                                  "until the results (docs/compat.md)"},
        "tool_choice": {"description": "none: no tool; a function: only it; auto and required: all"}}}
    completion = {"type": "object", "properties": {
        "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]},
        "created": {"type": "integer"}, "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": {"type": "integer"}, "finish_reason": {"type": "string", "enum": ["stop", "length", "tool_calls"]},
            "message": {"type": "object", "properties": {"role": {"type": "string"},
                                                         "content": {"type": ["string", "null"]},
                                                         "tool_calls": {"type": "array",
                                                                        "items": {"type": "object"}}}}}}},
        "usage": _ref("ChatCompletionUsage")}}
    models = {"type": "object", "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "string"}, "object": {"type": "string"},
                                         "created": {"type": "integer"}, "owned_by": {"type": "string"}}}}}}
    return {
        "/v1/models": {"get": {"summary": "the models: the service's own and each `serve --assistant NAME`",
                               "tags": ["OpenAI"], "servers": _TOKEN_IN_PATH,
                               "responses": {"200": _json(models, "the models"), **_errors(err, "401")}}},
        "/v1/chat/completions": {"post": {
            "summary": "a turn of a durable session (the openai SDK, Open WebUI, Pipecat, LiveKit)",
            "description": _SESSION_RULE, "tags": ["OpenAI"], "servers": _TOKEN_IN_PATH, "parameters": _HEADERS,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
            "responses": {"200": {
                "description": "the completion, or (stream) server-sent events: chat.completion.chunk objects, a "
                               "usage chunk with stream_options.include_usage, then `data: [DONE]`; a failure "
                               "after the stream started is an event with the error object",
                "headers": _SID_HEADER,
                "content": {"application/json": {"schema": completion},
                            "text/event-stream": {"schema": {"type": "string"}}}},
                **_errors(err, *_CHAT_ERRORS)}}},
    }


def compat_paths() -> dict[str, Any]:
    return {**_ollama_paths(), **_openai_paths()}

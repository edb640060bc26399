"""OpenAI's chat completions API on the service (``/v1/models``, ``/v1/chat/completions``):
what the ``openai`` SDK, Open WebUI, Pipecat's and LiveKit's OpenAI plugins call, with a
durable session behind every chat (``_compat``).

Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.  Tool calls pass
through (``_compat``): a call the model makes to one of the request's ``tools`` is returned as
``message.tool_calls`` (``delta.tool_calls`` when streaming; ``arguments`` a JSON string) with
``finish_reason`` ``"tool_calls"``, and the ``tool`` messages of the next request answer it by
``tool_call_id``.  ``n`` > 1 is refused (one conversation, one reply).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .._exceptions import SessionError
from .._result import ChatResult
from ._compat import (
    WHOLE_HEADER,
    CompatError,
    CompatRequest,
    TurnEvent,
    answers_errors_as,
    check_name,
    explicit_session,
    finish,
    first_event,
    parse_messages,
    parse_tools,
    resolve_session,
    run_turn,
    served_models,
    whole_turn,
)
from ._errors import ApiError, turn_error
from ._requests import read_json
from ._state import state_of as _state

__all__ = ["openai_routes"]

logger = logging.getLogger("conversation_session.service")

Handler = Callable[[Request], Awaitable[Response]]
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error", 415: "invalid_request_error",
          429: "rate_limit_error"}


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_errors = answers_errors_as(_error_body)


@_errors
async def models(request: Request) -> Response:
    st = _state(request)
    await st.owner(request)
    await st.wait_ready()  # the names come from the loaded model: the same before and after it loads
    backend_model = st.backend.model_name if st.backend is not None else None
    created = int(time.time())
    data = [{"id": name, "object": "model", "created": created, "owned_by": "conversation-session"}
            for name, _ in served_models(st.config, backend_model)]
    return JSONResponse({"object": "list", "data": data})


def _number(data: dict[str, Any], key: str, kind: type = float) -> Any:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise CompatError(400, f'"{key}" must be {"an integer" if kind is int else "a number"}', param=key)
    return kind(value)


def _request(data: dict[str, Any], request: Request, limit: int) -> CompatRequest:
    model = check_name(data.get("model"), '"model"')
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise CompatError(400, '"stream" must be true or false', param="stream")
    if _number(data, "n", int) not in (None, 1):
        raise CompatError(400, "only n=1 is supported: one conversation, one reply", param="n")
    stop = data.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise CompatError(400, '"stop" must be a string or up to 4 strings', param="stop")
    max_tokens = _number(data, "max_completion_tokens", int) or _number(data, "max_tokens", int)
    system, history, text, results = parse_messages(data.get("messages"), limit)
    tools = parse_tools(data.get("tools"), data.get("tool_choice"))
    explicit = explicit_session(request)
    user = data.get("user")
    if explicit is None and isinstance(user, str) and user.strip():
        # A string only: some clients send an object here (user details), which names nothing.
        explicit = check_name(user, '"user"')
    return CompatRequest(model=model, system=system, history=history, text=text, explicit=explicit,
                         whole=bool(request.headers.get(WHOLE_HEADER)),
                         max_tokens=max_tokens, temperature=_number(data, "temperature"),
                         seed=_number(data, "seed", int), stop=[s for s in stop if s], stream=stream,
                         tools=tools, results=results)


def _usage(result: ChatResult) -> dict[str, Any]:
    prompt = result.prompt_tokens or 0
    completion = result.completion_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens or 0}}


def _calls(result: ChatResult) -> list[dict[str, Any]]:
    """The client's calls of a turn, as OpenAI returns them (arguments a JSON string)."""
    return [{"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in result.tool_calls if c.get("client")]


def _finish(result: ChatResult, stopped: bool) -> str:
    if _calls(result):
        return "tool_calls"
    return "stop" if stopped else ("length" if result.finish_reason == "length" else "stop")


@_errors
async def chat_completions(request: Request) -> Response:
    st = _state(request)
    owner = await st.owner(request)
    data = await read_json(request, st.config.max_chat_body_bytes)
    req = _request(data, request, st.config.max_text_bytes)
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise CompatError(400, '"stream_options" must be an object', param="stream_options")
    sid = await resolve_session(st, owner, req.model, req.explicit)
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    headers = {"X-Session-Id": sid}
    events = run_turn(st, sid, req)
    if not req.stream:
        reply, result, stopped = await whole_turn(events, request.receive)
        st.counters["turns_completed"] += 1
        message: dict[str, Any] = {"role": "assistant", "content": reply, "refusal": None}
        calls = _calls(result)
        if calls:
            message.update(content=reply or None, tool_calls=calls)
        return JSONResponse({
            "id": cid, "object": "chat.completion", "created": created, "model": req.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": message,
                         "logprobs": None, "finish_reason": _finish(result, stopped)}],
            "usage": _usage(result),
        }, headers=headers)
    first = await first_event(events, request.receive)
    include_usage = bool(options.get("include_usage"))

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None, choices: bool = True) -> bytes:
        body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": req.model, "system_fingerprint": None,
                                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                                if choices else []}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        ev: TurnEvent | None = first
        yield chunk({"role": "assistant", "content": ""})
        try:
            while ev is not None:
                if ev.text:
                    yield chunk({"content": ev.text})
                if ev.result is not None:
                    st.counters["turns_completed"] += 1
                    await finish(events)
                    calls = _calls(ev.result)
                    if calls:  # one delta per call, whole (OpenAI splits arguments; clients join them)
                        for i, call in enumerate(calls):
                            yield chunk({"tool_calls": [{"index": i, **call}]})
                    yield chunk({}, _finish(ev.result, ev.stopped))
                    if include_usage:
                        yield chunk({}, usage=_usage(ev.result), choices=False)
                    yield b"data: [DONE]\n\n"
                    return
                ev = await events.__anext__()
        except StopAsyncIteration:
            return
        except (SessionError, ValueError, CompatError, ApiError) as exc:
            st.counters["turns_failed"] += 1
            if isinstance(exc, CompatError):
                err = _error_body(exc.status, exc.message, exc.param, exc.code)
            else:
                api = exc if isinstance(exc, ApiError) else turn_error(exc)
                err = _error_body(api.status, api.message, None, api.code)
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


def openai_routes() -> list[Any]:
    from starlette.routing import Route

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]

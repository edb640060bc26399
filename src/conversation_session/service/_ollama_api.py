"""Ollama's API on the service (``/api/...``): what Home Assistant's Ollama integration, Open
WebUI and the ``ollama`` SDK call, with a durable session behind every chat (``_compat``).

Errors are Ollama's shape, ``{"error": "message"}``.  Tool calls pass through (``_compat``): a
call the model makes to one of the request's ``tools`` is returned as ``message.tool_calls``
(``{"function": {"name", "arguments": {...}}}``, ``done_reason`` ``"stop"`` as Ollama says it),
and the ``tool`` messages of the next request answer it in order.  ``format`` and ``think`` are
accepted and not enforced (no structured output, no separate thinking).  ``keep_alive`` is
accepted: the model stays loaded for the service's life.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .._exceptions import SessionError
from ..backends import GenerationRequest
from ._compat import (
    WHOLE_HEADER,
    CompatError,
    CompatRequest,
    TurnEvent,
    answers_errors_as,
    check_name,
    durations,
    explicit_session,
    finish,
    first_event,
    model_key,
    now_rfc3339,
    parse_messages,
    parse_tools,
    resolve_session,
    run_turn,
    served_models,
    whole_turn,
)
from ._errors import ApiError, ClientGone, turn_error
from ._requests import read_json, run_watched
from ._state import state_of as _state

__all__ = ["ollama_routes"]

logger = logging.getLogger("conversation_session.service")

OLLAMA_VERSION = "0.11.0"  # the Ollama API this surface follows (clients read it to pick features)
_NDJSON = "application/x-ndjson"

Handler = Callable[[Request], Awaitable[Response]]


def _ollama_error(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    """Every failure as Ollama says it: ``{"error": "..."}`` with the HTTP status."""
    return {"error": message}


_errors = answers_errors_as(_ollama_error)


def _digest(name: str) -> str:
    return hashlib.sha256(f"conversation-session:{name}".encode()).hexdigest()


def _details(served: str) -> dict[str, Any]:
    quant = ""
    low = served.lower()
    for q in ("q4_k_m", "q4_0", "q5_k_m", "q8_0", "f16"):
        if q in low:
            quant = q.upper()
    return {"parent_model": "", "format": "gguf" if os.path.isfile(served) or low.endswith(".gguf") else "",
            "family": "conversation-session", "families": ["conversation-session"], "parameter_size": "",
            "quantization_level": quant}


async def _models(request: Request) -> list[dict[str, Any]]:
    st = _state(request)
    await st.wait_ready()  # the names come from the loaded model: the same before and after it loads
    backend_model = st.backend.model_name if st.backend is not None else None
    out = []
    for name, served in served_models(st.config, backend_model):
        path = st.config.model if st.config.model and os.path.isfile(st.config.model) else None
        size = os.path.getsize(path) if path else 0
        out.append({"name": f"{name}:latest", "model": f"{name}:latest", "modified_at": now_rfc3339(), "size": size,
                    "digest": _digest(name), "details": _details(path or served)})
    return out


def _known(models: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    key = model_key(model)
    return next((m for m in models if model_key(m["name"]) == key), None)


@_errors
async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


@_errors
async def tags(request: Request) -> Response:
    st = _state(request)
    await st.owner(request)
    return JSONResponse({"models": await _models(request)})


@_errors
async def ps(request: Request) -> Response:
    st = _state(request)
    await st.owner(request)
    if st.backend is None:
        return JSONResponse({"models": []})
    ctx = await asyncio.to_thread(st.backend.context_length, 2.0)
    models = [{**m, "expires_at": "2099-01-01T00:00:00Z", "size_vram": 0, "context_length": ctx or 0}
              for m in await _models(request)]
    return JSONResponse({"models": models})


@_errors
async def show(request: Request) -> Response:
    st = _state(request)
    await st.owner(request)
    data = await read_json(request, st.config.max_body_bytes)
    model = check_name(data.get("model") or data.get("name"), '"model"')
    found = _known(await _models(request), model)
    if found is None:
        raise CompatError(404, f"model '{model}' not found")
    ctx = await asyncio.to_thread(st.backend.context_length, 2.0) if st.backend is not None else None
    return JSONResponse({
        "license": "", "modelfile": f"# served by conversation-session\nFROM {found['name']}\n", "parameters": "",
        "template": "{{ .Prompt }}", "details": found["details"], "modified_at": found["modified_at"],
        "model_info": {"general.architecture": "conversation-session", "general.basename": model_key(found["name"]),
                       "conversation-session.context_length": ctx or 0},
        "capabilities": ["completion"],
    })


@_errors
async def pull(request: Request) -> Response:
    """Nothing to download: success for a model this service serves (clients such as Home
    Assistant pull the model they were set up with), a clear error for any other."""
    st = _state(request)
    await st.owner(request)
    data = await read_json(request, st.config.max_body_bytes)
    model = check_name(data.get("model") or data.get("name"), '"model"')
    models = await _models(request)
    if _known(models, model) is None:
        names = ", ".join(m["name"] for m in models)
        raise CompatError(404, f"pull model manifest: '{model}' is not served here; this service serves {names} "
                               "(start it with --assistant NAME to add a name)")
    if data.get("stream", True) is False:
        return JSONResponse({"status": "success"})
    steps = [{"status": "pulling manifest"}, {"status": "verifying sha256 digest"},
             {"status": "writing manifest"}, {"status": "success"}]
    return Response("".join(json.dumps(s) + "\n" for s in steps), media_type=_NDJSON)


def _generation_fields(data: dict[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    """What /api/chat and /api/generate both take, checked: the model's name, ``stream``
    (Ollama's default: true) and the ``options``."""
    model = check_name(data.get("model"), '"model"')
    stream = data.get("stream", True)
    if not isinstance(stream, bool):
        raise CompatError(400, '"stream" must be true or false')
    return model, stream, _options(data)


def _options(data: dict[str, Any]) -> dict[str, Any]:
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise CompatError(400, '"options" must be an object')
    for key in ("temperature", "num_predict", "seed", "num_ctx"):
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CompatError(400, f'options.{key} must be a number')
    stop = options.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise CompatError(400, "options.stop must be a list of strings")
    return {**options, "stop": [s for s in stop if s]}


def _chunk(model: str, **fields: Any) -> bytes:
    return (json.dumps({"model": model, "created_at": now_rfc3339(), **fields}, ensure_ascii=False) + "\n").encode()


def _calls(result: Any) -> list[dict[str, Any]]:
    """The client's calls of a turn, as Ollama returns them."""
    return [{"function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in result.tool_calls if c.get("client")]


def _message(content: str, result: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    calls = _calls(result)
    if calls:
        message["tool_calls"] = calls
    return message


def _final(model: str, result: Any, stopped: bool, **extra: Any) -> dict[str, Any]:
    # Ollama ends a turn that asks for calls with "stop" too (its clients look at tool_calls).
    reason = "stop" if stopped or result.finish_reason == "tool_calls" else (result.finish_reason or "stop")
    return {"model": model, "created_at": now_rfc3339(), **extra, "done": True, "done_reason": reason,
            **durations(result)}


@_errors
async def chat(request: Request) -> Response:
    st = _state(request)
    owner = await st.owner(request)
    data = await read_json(request, st.config.max_chat_body_bytes)
    model, stream, options = _generation_fields(data)
    if not data.get("messages"):
        # An empty chat loads the model (what `ollama run` and keep_alive requests send).
        await st.wait_ready()
        loaded = {"model": model, "created_at": now_rfc3339(), "message": {"role": "assistant", "content": ""},
                  "done": True, "done_reason": "load"}
        return JSONResponse(loaded) if not stream else Response(json.dumps(loaded) + "\n", media_type=_NDJSON)
    system, history, text, results = parse_messages(data.get("messages"), st.config.max_text_bytes)
    req = CompatRequest(model=model, system=system, history=history, text=text, explicit=explicit_session(request),
                        whole=bool(request.headers.get(WHOLE_HEADER)),
                        max_tokens=int(options["num_predict"]) if options.get("num_predict") else None,
                        temperature=options.get("temperature"), seed=options.get("seed"), stop=options["stop"],
                        stream=stream, tools=parse_tools(data.get("tools")), results=results)
    sid = await resolve_session(st, owner, model, req.explicit)
    events = run_turn(st, sid, req)
    headers = {"X-Session-Id": sid}
    if not stream:
        reply, result, stopped = await whole_turn(events, request.receive)
        st.counters["turns_completed"] += 1
        return JSONResponse(_final(model, result, stopped, message=_message(reply, result)), headers=headers)
    first = await first_event(events, request.receive)

    async def body() -> AsyncIterator[bytes]:
        ev: TurnEvent | None = first
        try:
            while ev is not None:
                if ev.text:
                    yield _chunk(model, message={"role": "assistant", "content": ev.text}, done=False)
                if ev.result is not None:
                    st.counters["turns_completed"] += 1
                    await finish(events)
                    if _calls(ev.result):  # as Ollama streams them: a chunk of their own, then the end
                        yield _chunk(model, message=_message("", ev.result), done=False)
                    yield (json.dumps(_final(model, ev.result, ev.stopped,
                                             message={"role": "assistant", "content": ""})) + "\n").encode()
                    return
                ev = await events.__anext__()
        except StopAsyncIteration:
            return
        except (SessionError, ValueError, CompatError, ApiError) as exc:
            st.counters["turns_failed"] += 1
            message = exc.message if isinstance(exc, (CompatError, ApiError)) else turn_error(exc).message
            yield (json.dumps({"error": message}) + "\n").encode()
        finally:
            await events.aclose()

    return StreamingResponse(body(), media_type=_NDJSON, headers=headers)


@_errors
async def generate(request: Request) -> Response:
    """A plain completion: the prompt alone (and ``system``), answered by the service's model;
    nothing is stored (a completion is not a conversation: use /api/chat for memory)."""
    st = _state(request)
    await st.owner(request)
    data = await read_json(request, st.config.max_body_bytes)
    model, stream, options = _generation_fields(data)
    prompt = data.get("prompt") or ""
    system = data.get("system")
    if not isinstance(prompt, str) or (system is not None and not isinstance(system, str)):
        raise CompatError(400, '"prompt" and "system" must be strings')
    reg = await st.wait_ready()
    if not prompt.strip():
        loaded = {"model": model, "created_at": now_rfc3339(), "response": "", "done": True, "done_reason": "load"}
        return JSONResponse(loaded) if not stream else Response(json.dumps(loaded) + "\n", media_type=_NDJSON)
    if len(prompt.encode()) > st.config.max_text_bytes:
        raise CompatError(413, f'"prompt" is over {st.config.max_text_bytes} bytes')
    messages: list[Any] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    num_predict = options.get("num_predict")
    temperature = options.get("temperature")
    gen = GenerationRequest(
        messages=messages, max_tokens=min(int(num_predict), st.config.max_tokens) if num_predict and num_predict > 0
        else st.config.max_tokens, temperature=float(0.7 if temperature is None else temperature),
        options={"seed": int(options["seed"])} if options.get("seed") is not None else {})
    backend = reg.backend
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    def final(text: str) -> dict[str, Any]:
        total = loop.time() - t0
        u = gen.usage
        return {"model": model, "created_at": now_rfc3339(), "response": text, "done": True,
                "done_reason": u.finish_reason or "stop", "total_duration": int(total * 1e9), "load_duration": 0,
                "prompt_eval_count": max((u.prompt_tokens or 0) - (u.cached_tokens or 0), 0),
                "prompt_eval_duration": 0, "eval_count": u.completion_tokens or 0, "eval_duration": int(total * 1e9)}

    if not stream:
        async def generate() -> list[str]:
            return [p async for p in backend.agenerate(gen)]

        try:  # a client that goes away stops the generation, as on every other route
            pieces = await run_watched(generate(), request.receive)
        except ClientGone:
            gen.cancel.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - said in Ollama's shape
            raise turn_error(exc) from None
        return JSONResponse(final("".join(pieces)))

    async def body() -> AsyncIterator[bytes]:
        try:
            async for piece in backend.agenerate(gen):
                yield _chunk(model, response=piece, done=False)
        except Exception as exc:  # noqa: BLE001 - the stream has started: said in-band
            yield (json.dumps({"error": turn_error(exc).message}) + "\n").encode()
            return
        yield (json.dumps(final("")) + "\n").encode()

    return StreamingResponse(body(), media_type=_NDJSON)


def ollama_routes() -> list[Any]:
    from starlette.routing import Route

    return [
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/tags", tags, methods=["GET", "HEAD"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/pull", pull, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/generate", generate, methods=["POST"]),
    ]

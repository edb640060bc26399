"""The OpenAI-compatible backend: any server with a streaming ``/v1/chat/completions``.

llama.cpp's ``llama-server``, llama-cpp-python's ``python -m llama_cpp.server``, vLLM, LM
Studio, Ollama's ``/v1`` all qualify.  Talks ``httpx`` directly (no SDK): server-sent events
with ``stream_options.include_usage``; cancelling a turn shuts the socket down, which is how
these servers learn to stop generating (see ``StreamKiller``).

Figures come from the stream's ``usage`` chunk (``prompt_tokens_details.cached_tokens`` where
the server reports it) and from llama.cpp's ``timings``.  A server that reports no usage in a
stream (llama-cpp-python) sends one chunk per generated token, so the chunk count stands in
for ``completion_tokens``; prompt and cached tokens then stay None.

The context window is asked of the server (``/v1/models`` fields, llama.cpp's ``/props``);
the ``context_length`` setting can only lower it.  When nothing is known it is taken as 4096
(logged), and a "prompt too long" answer from the server teaches the real size for the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from .._exceptions import BackendError, ModelNotFoundError
from .._runtime import shared_executor
from ..stores._record import MessageDict
from ._base import CancelToken, GenerationRequest, ToolCall, Usage
from ._http import (
    AsyncClients,
    HttpBackend,
    HttpTimeouts,
    aiter_sse_data,
    cancel_extensions,
    iter_sse_data,
    make_client,
    probe_off_the_loop,
    server_message,
)

__all__ = ["DEFAULT_CONTEXT_LENGTH", "PROBE_TIMEOUT", "OpenAIBackend", "normalize_base_url"]

logger = logging.getLogger("conversation_session.backends.openai")

DEFAULT_CONTEXT_LENGTH = 4096
# The longest a question about the server (its models, its window) may take: it runs at
# construction, before a turn's generation and for `stats`, so a server that accepts and never
# answers must not hold any of them.
PROBE_TIMEOUT = 3.0
_START_HINT = ("Start one, e.g. `python -m llama_cpp.server --model MODEL.gguf --port 8080` and "
               "--base-url http://127.0.0.1:8080/v1, or pass --base-url where yours runs")
# Where servers say how long a context they allow, in /v1/models entries (vLLM, LM Studio,
# OpenRouter, Groq, llama-server's "meta") and in llama-server's /props.
_MODEL_CTX_KEYS = ("max_model_len", "context_length", "max_context_length", "context_window")
_META_CTX_KEYS = ("n_ctx", "n_ctx_train")
_CTX_IN_ERROR = re.compile(
    r'(?:maximum context length is|context window of|context size of|"?n_ctx"?\s*[=:])\s*(\d+)', re.IGNORECASE)


def normalize_base_url(url: str) -> str:
    """``http://host:8080``, ``http://host:8080/`` and ``http://host:8080/v1`` all mean the API
    root ``http://host:8080/v1``; a path that already names a version (``/v1beta/openai``) is kept."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    path = urlsplit(url).path
    if not any(re.fullmatch(r"v\d+[a-z]*\d*", seg) for seg in path.split("/")):
        url += "/v1"
    return url


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _openai_message(m: MessageDict) -> dict[str, Any]:
    """A history message as ``/v1/chat/completions`` takes it: arguments as a JSON string."""
    if m["role"] == "tool":
        return {"role": "tool", "tool_call_id": m.get("tool_call_id", ""), "content": m["content"]}
    if "tool_calls" in m:
        return {"role": m["role"], "content": m["content"] or None, "tool_calls": [
            {"id": c["id"], "type": "function", "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
            for c in m["tool_calls"]]}
    return dict(m)


def _gather_calls(calls: dict[int, dict[str, Any]], deltas: Any) -> None:
    """Add streamed ``tool_calls`` deltas: the first of an index names the call (id, name), the
    rest carry pieces of its arguments' JSON text."""
    for i, delta in enumerate(deltas if isinstance(deltas, list) else []):
        if not isinstance(delta, dict):
            continue
        index = delta.get("index", i)
        call = calls.setdefault(index if isinstance(index, int) else i, {"id": "", "name": "", "arguments": ""})
        fn = delta.get("function") or {}
        if isinstance(delta.get("id"), str) and delta["id"]:
            call["id"] = delta["id"]
        if isinstance(fn.get("name"), str) and fn["name"]:
            call["name"] = call["name"] or fn["name"]
        args = fn.get("arguments")
        if isinstance(args, str):
            call["arguments"] += args
        elif isinstance(args, dict):  # a server that sends an object
            call["arguments"] = json.dumps(args)


def _assembled(calls: dict[int, dict[str, Any]]) -> list[ToolCall]:
    out: list[ToolCall] = []
    for index in sorted(calls):
        call = calls[index]
        if not call["name"]:
            logger.warning("the server streamed a tool call without a name; ignored: %.200r", call)
            continue
        try:
            args = json.loads(call["arguments"]) if call["arguments"].strip() else {}
        except ValueError:
            args = {"_raw": call["arguments"]}  # the model wrote broken JSON: the tool sees why it fails
        out.append(ToolCall(call["name"], args if isinstance(args, dict) else {"_value": args}, call["id"]))
    return out


def _rate(tokens: int | None, seconds: float | None) -> float | None:
    return round(tokens / seconds, 1) if tokens and seconds else None


class OpenAIBackend(HttpBackend):
    """A model behind an OpenAI-compatible server.

    Args:
        model: the model id to ask for; ``None``: the first one ``/v1/models`` lists (asked
            at construction, so a server that is down fails here, fast).
        base_url: the API root, with or without ``/v1`` (e.g. ``http://127.0.0.1:8080/v1``).
        context_length: the context window in tokens, when the server does not say it or to
            use less than it allows.
        api_key: sent as a bearer token; default ``$OPENAI_API_KEY`` (local servers need none).
        timeouts: connect/read/write limits.
        probe_timeout: the longest a question about the server (``/v1/models``, ``/props``) may take.
        seed, top_p, top_k, repeat_penalty: sent with every request when set (``top_k`` and
            ``repeat_penalty`` are extensions that llama.cpp's and vLLM's servers take); a
            request's ``options`` override them.
    """

    name = "openai"
    reuses_prompt_cache = True
    can_warm = True

    def __init__(self, model: str | None = None, *, base_url: str | None = None,
                 context_length: int | None = None, api_key: str | None = None,
                 timeouts: HttpTimeouts | None = None, probe_timeout: float = PROBE_TIMEOUT,
                 seed: int | None = None, top_p: float | None = None, top_k: int | None = None,
                 repeat_penalty: float | None = None):
        if not base_url:
            raise BackendError("the openai backend needs the server's address: pass --base-url "
                               "(base_url=...), e.g. http://127.0.0.1:8080/v1")
        if context_length is not None and context_length < 16:
            raise ValueError(f"context_length must be a positive number of tokens, not {context_length!r}")
        self.base_url = normalize_base_url(base_url)
        self.options = {k: v for k, v in (("seed", seed), ("top_p", top_p), ("top_k", top_k),
                                          ("repeat_penalty", repeat_penalty)) if v is not None}
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeouts = timeouts or HttpTimeouts()
        self.probe_timeout = min(probe_timeout, self.timeouts.read)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._client = make_client(self.base_url, self.timeouts, headers)
        self._aclients = AsyncClients(self.base_url, self.timeouts, headers)
        self.context_length_setting = context_length
        self._ctx_lock = threading.Lock()
        self._context_length: int | None = None
        self._probe_failed = False
        self._probing = False
        self.context_length_source: str | None = None
        self._models: list[dict[str, Any]] | None = None
        self._stream_usage = True  # dropped if the server rejects stream_options
        self._stats_lock = threading.Lock()
        self._last: dict[Any, dict[str, Any]] = {}  # per cache_key: the last reply's server figures
        self.model_name = model or self._default_model()

    # -- the server's models and context window --------------------------------------------
    def _list_models(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """``/v1/models`` entries (cached); BackendError when the server cannot be reached."""
        if self._models is None:
            bound = self._bound(timeout)
            try:
                response = self._client.get("/models", timeout=bound)
            except httpx.TimeoutException as exc:
                raise BackendError(f"the server at {self.base_url} accepted the connection but did not answer "
                                   f"GET /models within {bound:g} s: is it stuck?") from exc
            except httpx.HTTPError as exc:
                raise self._translate(exc) from exc
            self._models = self._model_list(response)
        return self._models

    def _bound(self, timeout: float | None) -> float:
        return self.probe_timeout if timeout is None else max(0.05, min(timeout, self.probe_timeout))

    def _model_list(self, response: httpx.Response) -> list[dict[str, Any]]:
        if response.status_code >= 400:
            raise self._http_error(response)
        try:
            data = response.json().get("data")
        except (ValueError, AttributeError) as exc:
            raise BackendError(f"{self.base_url}/models did not answer with a model list; is it an "
                               "OpenAI-compatible API?") from exc
        return [m for m in data or [] if isinstance(m, dict) and m.get("id")]

    def check(self, timeout: float = 5.0) -> None:
        """``GET /models`` within ``timeout``: the server answers (and accepts the key).  A model
        it does not list is only logged: many servers serve any name they are asked for."""
        self._models = None
        self._list_models(timeout)
        self._probe_failed = False
        self._check_listed()

    async def acheck(self, timeout: float = 5.0) -> None:
        try:
            response = await self._aclients.get().get("/models", timeout=timeout)
        except httpx.TimeoutException as exc:
            raise BackendError(f"the server at {self.base_url} accepted the connection but did not answer "
                               f"GET /models within {timeout:g} s: is it stuck?") from exc
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        self._models = self._model_list(response)
        self._probe_failed = False
        self._check_listed()

    def _check_listed(self) -> None:
        ids = [str(m["id"]) for m in self._models or []]
        if ids and self.model_name not in ids:
            logger.warning("the server at %s does not list the model %r (it lists: %s); asking for it anyway",
                           self.base_url, self.model_name, ", ".join(ids[:5]))

    def _default_model(self) -> str:
        models = self._list_models()
        if not models:
            raise BackendError(f"the server at {self.base_url} lists no models (GET /models); pass --model")
        return str(models[0]["id"])

    def _server_context_length(self, timeout: float | None) -> int | None:
        """The smallest window the server admits to, or None; raises BackendError if it is down."""
        found: list[int] = []
        entry = next((m for m in self._list_models(timeout) if m.get("id") == self.model_name), None)
        if entry is not None:
            meta = entry.get("meta")
            meta = meta if isinstance(meta, dict) else {}
            found += [v for k in _MODEL_CTX_KEYS if (v := _int(entry.get(k)))]
            found += [v for k in _META_CTX_KEYS if (v := _int(meta.get(k)))]
        if urlsplit(self.base_url).path == "/v1":
            # llama-server's /props (at the root) has the per-request window actually allocated.
            try:
                response = self._client.get(self.base_url[:-3] + "/props", timeout=self._bound(timeout))
                settings = response.json().get("default_generation_settings") if response.is_success else None
                if isinstance(settings, dict) and (v := _int(settings.get("n_ctx"))):
                    found.append(v)
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                logger.debug("no /props at %s: %s", self.base_url, exc)
        return min(found) if found else None

    def context_length(self, timeout: float | None = None) -> int | None:
        """The server's window (asked once, within ``probe_timeout`` or ``timeout`` if shorter),
        lowered to the ``context_length`` setting.  A failure to ask is remembered: the setting
        (or 4096) is used, and the server is asked again only after it has answered a chat.
        Called on an event loop's thread it never blocks: the question is asked in the
        background and the setting (or 4096) is used until the answer is in."""
        if self._context_length is not None:
            return self._context_length
        if probe_off_the_loop(self, timeout):
            return self.context_length_setting or DEFAULT_CONTEXT_LENGTH
        with self._ctx_lock:
            if self._context_length is None:
                setting = self.context_length_setting
                if self._probe_failed:
                    return setting or DEFAULT_CONTEXT_LENGTH
                try:
                    server = self._server_context_length(timeout)
                except BackendError as exc:
                    logger.warning("could not ask %s for its context window (%s); using %d tokens",
                                   self.base_url, exc, setting or DEFAULT_CONTEXT_LENGTH)
                    self._probe_failed = True
                    return setting or DEFAULT_CONTEXT_LENGTH
                if server is not None:
                    self._context_length = min(server, setting or server)
                    self.context_length_source = "server" if self._context_length == server else "setting"
                elif setting is not None:
                    self._context_length, self.context_length_source = setting, "setting"
                else:
                    self._context_length, self.context_length_source = DEFAULT_CONTEXT_LENGTH, "default"
                    logger.warning("the server at %s does not say its context window; assuming %d tokens "
                                   "(pass --context-length / context_length with the server's n_ctx)",
                                   self.base_url, DEFAULT_CONTEXT_LENGTH)
            return self._context_length

    def _learn_context_length(self, message: str) -> int | None:
        """From a "prompt too long" answer: the server's real window, kept for the next turns."""
        match = _CTX_IN_ERROR.search(message)
        if not match:
            return None
        told = int(match.group(1))
        with self._ctx_lock:
            current = self._context_length
            # Already at or under it: our token estimate ran low for this tokenizer, keep a margin.
            # Not known before (never asked): the server's word is the window.
            self._context_length = told if current is None or told < current else int(current * 0.9)
            self.context_length_source = "server error"
            logger.warning("the server at %s allows %d context tokens; trimming to %d from now on",
                           self.base_url, told, self._context_length)
            return self._context_length

    # -- errors ------------------------------------------------------------------------
    def _translate(self, exc: BaseException) -> BackendError:
        if isinstance(exc, httpx.ConnectError):
            return BackendError(f"cannot connect to the OpenAI-compatible server at {self.base_url}: "
                                f"is it running? {_START_HINT}")
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(f"the server at {self.base_url} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.RemoteProtocolError):
            return BackendError(f"the server at {self.base_url} closed the connection mid-reply: {exc}")
        return BackendError(f"talking to the server at {self.base_url} failed: {exc}")

    def _http_error(self, response: httpx.Response) -> BackendError:
        status, message = response.status_code, server_message(response)
        where = f"the server at {self.base_url} answered HTTP {status} to {response.request.url.path}"
        lowered = message.lower()
        if status in (401, 403):
            return BackendError(f"{where}: {message}; set OPENAI_API_KEY (or api_key=) to a key it accepts")
        if status == 404 and "model" in lowered and ("not" in lowered or "exist" in lowered):
            with contextlib.suppress(BackendError):
                self._list_models()
            served = ", ".join(str(m["id"]) for m in (self._models or [])[:5])
            return ModelNotFoundError(
                f"the server at {self.base_url} does not serve the model {self.model_name!r} ({message}); "
                + (f"it serves: {served}; " if served else "") + "pass one it serves with --model",
                model=self.model_name,
            )
        if status == 404:
            return BackendError(f"{where}: {message}; is {self.base_url} an OpenAI-compatible API root?")
        if status == 400 and (n_ctx := self._learn_context_length(f"{message} {response.text[:2000]}")):
            return BackendError(f"{where}: {message}. The session now trims the conversation to {n_ctx} "
                                "tokens: send the message again (nothing was lost)")
        return BackendError(f"{where}: {message}")

    # -- requests ------------------------------------------------------------------------
    def _body(self, messages: list[MessageDict], max_tokens: int, temperature: float,
              options: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name, "messages": messages, "stream": True,
                                "max_tokens": max_tokens, "temperature": temperature}
        if self._stream_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(self.options)
        body.update(options)
        return body

    def _start(self, response: httpx.Response, body: dict[str, Any], attempt: int) -> str:
        """What to do with a response's status and headers: "retry" (an older server rejected
        ``stream_options``: the body is changed), "whole" (one JSON answer) or "stream".
        The body of an error response must have been read."""
        if response.status_code >= 400:
            if attempt == 0 and "stream_options" in body and "stream_options" in response.text:
                self._stream_usage = False  # an older server that rejects it
                del body["stream_options"]
                return "retry"
            raise self._http_error(response)
        if "text/event-stream" not in response.headers.get("content-type", ""):
            return "whole"
        return "stream"

    # unasync: generated events
    # generated by scripts/unasync.py from events: do not edit
    def _events(self, body: dict[str, Any], cancel: CancelToken) -> Generator[dict[str, Any], None]:
        """POST ``/chat/completions`` and yield each streamed chunk (or the one JSON answer of
        a server that does not stream).  Returns quietly when ``cancel`` broke the connection.
        Closing this generator (or cancelling the task that iterates it) closes the response and
        its connection: the server sees the disconnect at once."""
        if cancel.cancelled:
            return
        body = dict(body)
        client = self._client
        try:
            for attempt in range(2):
                with client.stream("POST", "/chat/completions", json=body,
                                   extensions=cancel_extensions(cancel, is_async=False)) as response:
                    if response.status_code >= 400:
                        response.read()
                    how = self._start(response, body, attempt)
                    if how == "retry":
                        continue
                    if how == "whole":
                        response.read()
                        yield self._parse(response.text)
                        return
                    finished, events = False, 0
                    for data in iter_sse_data(response.iter_lines()):
                        if data.strip() == "[DONE]":
                            return
                        chunk = self._parse(data, cancel)
                        if chunk is None:
                            return
                        events += 1
                        finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or [])
                        yield chunk
                if finished or cancel.cancelled:
                    return
                if events == 0:
                    self._diagnose(body)
                raise BackendError(f"the server at {self.base_url} ended the stream before the reply was done")
        except httpx.HTTPError as exc:
            if cancel.cancelled:
                return  # the read failed because we shut the socket down: that is the cancel
            raise self._translate(exc) from exc
    # unasync: end generated events

    # unasync: begin events
    async def _aevents(self, body: dict[str, Any], cancel: CancelToken) -> AsyncGenerator[dict[str, Any], None]:
        """POST ``/chat/completions`` and yield each streamed chunk (or the one JSON answer of
        a server that does not stream).  Returns quietly when ``cancel`` broke the connection.
        Closing this generator (or cancelling the task that iterates it) closes the response and
        its connection: the server sees the disconnect at once."""
        if cancel.cancelled:
            return
        body = dict(body)
        client = self._aclients.get()
        try:
            for attempt in range(2):
                async with client.stream("POST", "/chat/completions", json=body,
                                         extensions=cancel_extensions(cancel, is_async=True)) as response:
                    if response.status_code >= 400:
                        await response.aread()
                    how = self._start(response, body, attempt)
                    if how == "retry":
                        continue
                    if how == "whole":
                        await response.aread()
                        yield self._parse(response.text)
                        return
                    finished, events = False, 0
                    async for data in aiter_sse_data(response.aiter_lines()):
                        if data.strip() == "[DONE]":
                            return
                        chunk = self._parse(data, cancel)
                        if chunk is None:
                            return
                        events += 1
                        finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or [])
                        yield chunk
                if finished or cancel.cancelled:
                    return
                if events == 0:
                    await self._adiagnose(body)
                raise BackendError(f"the server at {self.base_url} ended the stream before the reply was done")
        except httpx.HTTPError as exc:
            if cancel.cancelled:
                return  # the read failed because we shut the socket down: that is the cancel
            raise self._translate(exc) from exc
    # unasync: end events

    @staticmethod
    def _diagnosis(body: dict[str, Any]) -> dict[str, Any]:
        probe = {k: v for k, v in body.items() if k != "stream_options"}
        probe.update(stream=False, max_tokens=1)
        return probe

    # unasync: generated diagnose
    # generated by scripts/unasync.py from diagnose: do not edit
    def _diagnose(self, body: dict[str, Any]) -> None:
        """After an empty stream, ask again without streaming (one token) to hear the reason.

        llama-cpp-python's server answers a prompt longer than its window with an empty
        stream; unstreamed it says "maximum context length is N", which teaches the window.
        """
        response = self._client.post("/chat/completions", json=self._diagnosis(body))
        if response.status_code >= 400:
            raise self._http_error(response)
    # unasync: end generated diagnose

    # unasync: begin diagnose
    async def _adiagnose(self, body: dict[str, Any]) -> None:
        """After an empty stream, ask again without streaming (one token) to hear the reason.

        llama-cpp-python's server answers a prompt longer than its window with an empty
        stream; unstreamed it says "maximum context length is N", which teaches the window.
        """
        response = await self._aclients.get().post("/chat/completions", json=self._diagnosis(body))
        if response.status_code >= 400:
            raise self._http_error(response)
    # unasync: end diagnose

    def _parse(self, data: str, cancel: CancelToken | None = None) -> Any:
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            if cancel is not None and cancel.cancelled:
                return None  # an event cut short by our own shutdown
            raise BackendError(f"the server at {self.base_url} sent a malformed stream: {data[:120]!r} "
                               "is not JSON") from exc
        if not isinstance(chunk, dict):
            raise BackendError(f"the server at {self.base_url} sent a malformed stream: {data[:120]!r}")
        if chunk.get("error"):
            err = chunk["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            raise BackendError(f"the server at {self.base_url} failed mid-reply: {message}")
        return chunk

    def _record(self, chunk: dict[str, Any], usage: Usage, cache_key: Any) -> None:
        """``usage`` and llama.cpp ``timings`` figures of a chunk into ``usage``."""
        u = chunk.get("usage")
        if isinstance(u, dict):
            usage.prompt_tokens = _int(u.get("prompt_tokens"))
            usage.completion_tokens = _int(u.get("completion_tokens"))
            details = u.get("prompt_tokens_details")
            if isinstance(details, dict) and _int(details.get("cached_tokens")) is not None:
                usage.cached_tokens = details["cached_tokens"]
        t = chunk.get("timings")
        if isinstance(t, dict):
            cache_n, prompt_n = _int(t.get("cache_n")), _int(t.get("prompt_n"))
            if usage.cached_tokens is None:
                usage.cached_tokens = cache_n
            if usage.prompt_tokens is None and prompt_n is not None:
                usage.prompt_tokens = prompt_n + (cache_n or 0)
            if usage.completion_tokens is None:
                usage.completion_tokens = _int(t.get("predicted_n"))
            if isinstance(t.get("prompt_ms"), (int, float)):
                usage.prompt_eval_s = t["prompt_ms"] / 1000
            if isinstance(t.get("predicted_ms"), (int, float)):
                usage.eval_s = t["predicted_ms"] / 1000
            with self._stats_lock:
                self._last[cache_key] = {"prompt_eval_tokens": prompt_n,
                                         "prompt_tokens_per_s": _rate(prompt_n, usage.prompt_eval_s),
                                         "server_tokens_per_s": _rate(_int(t.get("predicted_n")), usage.eval_s)}

    def _pieces(self, chunk: dict[str, Any], request: GenerationRequest,
                calls: dict[int, dict[str, Any]] | None = None) -> tuple[list[str], int]:
        """The text of a chunk, and how many streamed deltas carried text (for the token count);
        ``calls`` gathers the streamed ``tool_calls`` deltas, by index."""
        self._probe_failed = False  # the server answers: its window may be asked again
        out: list[str] = []
        deltas = 0
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta")
            # "message": the whole answer of a server that ignored stream=true.
            part = delta or choice.get("message") or {}
            content = part.get("content") if isinstance(part, dict) else None
            if content:
                deltas += delta is not None
                out.append(content)
            if calls is not None and isinstance(part, dict) and part.get("tool_calls"):
                _gather_calls(calls, part["tool_calls"])
            if choice.get("finish_reason"):
                request.usage.finish_reason = choice["finish_reason"]
        self._record(chunk, request.usage, request.cache_key)
        return out, deltas

    def _request_body(self, request: GenerationRequest) -> dict[str, Any]:
        messages = request.messages
        if any("tool_calls" in m or m["role"] == "tool" for m in messages):
            messages = [_openai_message(m) for m in messages]  # type: ignore[misc]
        body = self._body(messages, request.max_tokens, request.temperature, request.options)
        if request.tools and request.tool_choice != "none":
            body["tools"] = request.tools
            choice = request.tool_choice
            if choice == "required" or isinstance(choice, dict):
                body["tool_choice"] = choice
            elif isinstance(choice, str) and choice != "auto":  # a tool's name: OpenAI's object for it
                body["tool_choice"] = {"type": "function", "function": {"name": choice}}
        return body

    # unasync: generated generate
    # generated by scripts/unasync.py from generate: do not edit
    def generate(self, request: GenerationRequest) -> Iterator[str]:
        usage = request.usage
        pieces = 0
        calls: dict[int, dict[str, Any]] = {}
        chunks = self._events(self._request_body(request), request.cancel)
        try:
            for chunk in chunks:
                if request.cancel.cancelled:
                    return
                out, deltas = self._pieces(chunk, request, calls)
                pieces += deltas
                for piece in out:  # noqa: UP028, RUF100 - in the generated sync twin (the async one cannot `yield from`)
                    yield piece
        finally:
            chunks.close()
        if usage.completion_tokens is None and pieces and not request.cancel.cancelled:
            usage.completion_tokens = pieces  # about one token a chunk (see the module docstring)
        if calls and not request.cancel.cancelled:
            request.tool_calls = _assembled(calls)
    # unasync: end generated generate

    # unasync: begin generate
    async def agenerate(self, request: GenerationRequest) -> AsyncIterator[str]:
        usage = request.usage
        pieces = 0
        calls: dict[int, dict[str, Any]] = {}
        chunks = self._aevents(self._request_body(request), request.cancel)
        try:
            async for chunk in chunks:
                if request.cancel.cancelled:
                    return
                out, deltas = self._pieces(chunk, request, calls)
                pieces += deltas
                for piece in out:  # noqa: UP028, RUF100 - in the generated sync twin (the async one cannot `yield from`)
                    yield piece
        finally:
            await chunks.aclose()
        if usage.completion_tokens is None and pieces and not request.cancel.cancelled:
            usage.completion_tokens = pieces  # about one token a chunk (see the module docstring)
        if calls and not request.cancel.cancelled:
            request.tool_calls = _assembled(calls)
    # unasync: end generate

    def warm(self, messages: list[MessageDict], cancel: CancelToken, *, cache_key: Any = None) -> dict[str, Any]:
        """Send the restored conversation with ``max_tokens: 1`` so the server computes it into
        its prompt cache; the token is discarded.  Not streamed: servers that report no usage
        in a stream (llama-cpp-python) do report it in a whole answer."""
        body = self._body(messages, 1, 0.0, {"stream": False})
        body.pop("stream_options", None)
        usage = Usage()
        chunks = self._events(body, cancel)
        try:
            for chunk in chunks:
                self._record(chunk, usage, cache_key)
        finally:
            chunks.close()
        return usage.figures("warmup_")

    async def acontext_length(self, timeout: float | None = None) -> int | None:
        if self._context_length is not None:
            return self._context_length
        # Two bounded questions (/models, /props) on the shared executor, off the loop.
        return await asyncio.get_running_loop().run_in_executor(shared_executor(), self.context_length, timeout)

    def cache_stats(self, *, cache_key: Any = None) -> dict[str, Any]:
        n_ctx = self.context_length()
        with self._stats_lock:
            return {"n_ctx": n_ctx, "n_ctx_source": self.context_length_source, "base_url": self.base_url,
                    **self._last.get(cache_key, {})}

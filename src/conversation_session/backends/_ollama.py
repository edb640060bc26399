"""The Ollama backend: the seed's own deployment (``qwen2.5:3b`` served by Ollama).

Streams ``/api/chat`` (NDJSON, as documented in Ollama's docs/api.md) with the whole kept
history, over ``httpx`` directly: sync for threads, native async for event loops (no thread
per turn).  Ollama stops generating only when the client disconnects, so cancelling a turn
closes (or, from another thread, shuts down) the socket.  Ollama's runner reuses its KV cache
for the common prefix.

Figures: ``prompt_eval_count`` is what Ollama counts as the prompt.  Depending on the Ollama
version it is the whole prompt or only the tokens it had to compute (the rest came from its
cache), and there is no sound way to tell them apart from the outside (our own token count is
an estimate and other clients share the server's cache), so ``cached_tokens`` is None.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any

import httpx

from .._exceptions import BackendError, ModelNotFoundError
from ..stores._record import MessageDict
from ._base import CancelToken, GenerationRequest, ToolCall, Usage
from ._http import (
    AsyncClients,
    HttpBackend,
    HttpTimeouts,
    cancel_extensions,
    make_client,
    probe_off_the_loop,
    server_message,
)

__all__ = ["DEFAULT_KEEP_ALIVE", "DEFAULT_OLLAMA_MODEL", "PROBE_TIMEOUT", "OllamaBackend", "default_ollama_url"]

logger = logging.getLogger("conversation_session.backends.ollama")

DEFAULT_OLLAMA_MODEL = "qwen2.5:3b"
# Ollama unloads an idle model after 5 minutes by default; a user thinking longer than that
# would pay the model load (and lose the KV cache) on the next turn.  Sent with every
# request, so the model stays loaded while the session is in use and for 30 minutes after.
DEFAULT_KEEP_ALIVE = "30m"
# The longest a question about the server (context window) may take: it runs before a turn's
# generation and for `stats`, so a server that accepts and never answers must not hold either.
PROBE_TIMEOUT = 3.0


def default_ollama_url() -> str:
    host = os.environ.get("OLLAMA_HOST", "").strip()
    if not host:
        return "http://127.0.0.1:11434"
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


def _ns(value: Any) -> float | None:
    return value / 1e9 if isinstance(value, (int, float)) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _same_model(wanted: str, listed: str) -> bool:
    """Ollama names without a tag mean ``:latest``."""
    def norm(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"

    return norm(wanted) == norm(listed)


class OllamaBackend(HttpBackend):
    """A model served by Ollama.

    Args:
        model: the Ollama model name (default ``qwen2.5:3b``, as in the seed).
        base_url: server URL; default ``$OLLAMA_HOST`` or ``http://127.0.0.1:11434``.
        num_ctx: the context window to ask for (Ollama's own default is small and it cuts the
            front of longer prompts silently; sending it explicitly lets the session trim).
        keep_alive: how long Ollama keeps the model loaded after each request (``"30m"``,
            seconds, ``-1`` for ever, ``None`` for the server's default).  ``close()`` does not
            unload the model: another session or the next start may want it.
        timeouts: connect/read/write limits.
        probe_timeout: the longest the context-window question (``/api/show``) may take.
        seed, top_k, top_p, repeat_penalty, num_thread: Ollama options sent with every request
            (None: the model's own); a request's ``options`` override them.
    """

    name = "ollama"
    reuses_prompt_cache = True
    can_warm = True

    def __init__(self, model: str | None = None, *, base_url: str | None = None, num_ctx: int = 4096,
                 keep_alive: str | float | None = DEFAULT_KEEP_ALIVE, timeouts: HttpTimeouts | None = None,
                 probe_timeout: float = PROBE_TIMEOUT, seed: int | None = None, top_k: int | None = None,
                 top_p: float | None = None, repeat_penalty: float | None = None, num_thread: int | None = None):
        self.model_name = model or DEFAULT_OLLAMA_MODEL
        self.options = {k: v for k, v in (("seed", seed), ("top_k", top_k), ("top_p", top_p),
                                          ("repeat_penalty", repeat_penalty), ("num_thread", num_thread))
                        if v is not None}
        self.base_url = (base_url or default_ollama_url()).rstrip("/")
        self.num_ctx = num_ctx
        self.keep_alive = keep_alive
        self.timeouts = timeouts or HttpTimeouts()
        self.probe_timeout = min(probe_timeout, self.timeouts.read)
        self._client = make_client(self.base_url, self.timeouts)
        self._aclients = AsyncClients(self.base_url, self.timeouts)
        self._ctx_lock = threading.Lock()
        self._context_length: int | None = None
        self._probe_failed = False
        self._probing = False
        self._stats_lock = threading.Lock()
        self._last: dict[Any, dict[str, Any]] = {}  # per cache_key: the last reply's server figures
        self.model_load_s: float | None = None

    # -- errors ------------------------------------------------------------------------
    def _translate(self, exc: BaseException) -> BackendError:
        if isinstance(exc, (httpx.ConnectError, ConnectionError)):
            return BackendError(
                f"cannot connect to Ollama at {self.base_url}: is it running? Start it with "
                "`ollama serve`, or set --base-url / OLLAMA_HOST to where it runs"
            )
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(f"Ollama at {self.base_url} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.RemoteProtocolError):
            return BackendError(f"Ollama at {self.base_url} closed the connection mid-reply: {exc}")
        return BackendError(f"talking to Ollama at {self.base_url} failed: {exc}")

    def _missing_model(self, detail: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"Ollama at {self.base_url} does not have the model {self.model_name!r}: "
            f"run `ollama pull {self.model_name}` ({detail})", model=self.model_name)

    def _status_error(self, response: httpx.Response) -> BackendError:
        message = server_message(response)
        if response.status_code == 404 and "not found" in message.lower() and "page" not in message.lower():
            return self._missing_model(message)
        return BackendError(f"Ollama at {self.base_url} answered HTTP {response.status_code} to "
                            f"{response.request.url.path}: {message}")

    def _parse_line(self, line: str) -> dict[str, Any] | None:
        """One NDJSON line of the stream as a dict (None for a blank line)."""
        if not line.strip():
            return None
        try:
            part = json.loads(line)
        except ValueError as exc:
            raise BackendError(f"Ollama at {self.base_url} sent a malformed stream: {exc}") from exc
        if not isinstance(part, dict):
            raise BackendError(f"Ollama at {self.base_url} sent a malformed stream: {line[:120]!r}")
        if part.get("error"):  # what Ollama sends when the runner fails mid-reply
            message = " ".join(str(part["error"]).split())[:500]
            raise BackendError(f"Ollama at {self.base_url} failed mid-reply: {message}")
        return part

    # -- capabilities --------------------------------------------------------------------
    # unasync: generated check
    # generated by scripts/unasync.py from check: do not edit
    def check(self, timeout: float = 5.0) -> None:
        """``GET /api/tags`` within ``timeout``: the server answers and has the model."""
        try:
            response = self._client.get("/api/tags", timeout=httpx.Timeout(timeout))
        except httpx.TimeoutException as exc:
            raise BackendError(f"Ollama at {self.base_url} accepted the connection but did not answer "
                               f"GET /api/tags within {timeout:g} s: is it stuck? Restart `ollama serve`") from exc
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        self._check_tags(response)
    # unasync: end generated check

    # unasync: begin check
    async def acheck(self, timeout: float = 5.0) -> None:
        """``GET /api/tags`` within ``timeout``: the server answers and has the model."""
        try:
            response = await self._aclients.get().get("/api/tags", timeout=httpx.Timeout(timeout))
        except httpx.TimeoutException as exc:
            raise BackendError(f"Ollama at {self.base_url} accepted the connection but did not answer "
                               f"GET /api/tags within {timeout:g} s: is it stuck? Restart `ollama serve`") from exc
        except httpx.HTTPError as exc:
            raise self._translate(exc) from exc
        self._check_tags(response)
    # unasync: end check

    def _check_tags(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            raise BackendError(f"Ollama at {self.base_url} answered HTTP {response.status_code} to /api/tags: "
                               f"{server_message(response)}; is this an Ollama server?")
        try:
            models = response.json().get("models") or []
            names = {str(m.get(k)) for m in models if isinstance(m, dict) for k in ("name", "model") if m.get(k)}
        except (ValueError, AttributeError) as exc:
            raise BackendError(f"{self.base_url}/api/tags did not answer with a model list; is this an "
                               "Ollama server?") from exc
        if not any(_same_model(self.model_name, n) for n in names):
            have = ", ".join(sorted(names)[:5]) or "none"
            raise self._missing_model(f"it has: {have}")
        self._probe_failed = False  # the server answers: the context window may be asked again

    def _show_request(self) -> tuple[str, dict[str, Any]]:
        return "/api/show", {"model": self.model_name}

    def _learn_context(self, response: httpx.Response) -> int:
        """``num_ctx`` lowered to what ``/api/show`` says the model supports."""
        if response.status_code >= 400:
            raise self._status_error(response)
        info = response.json().get("model_info") or {}
        trained = next((int(v) for k, v in info.items() if k.endswith(".context_length")), None)
        return min(self.num_ctx, trained) if trained else self.num_ctx

    def _probe_failure(self, exc: BaseException) -> int:
        if not self._probe_failed:
            logger.warning("could not read the context window from %s/api/show (%s); using num_ctx=%d",
                           self.base_url, exc, self.num_ctx)
        self._probe_failed = True  # remembered: asked again only once the server has answered
        return self.num_ctx

    def context_length(self, timeout: float | None = None) -> int | None:
        """``num_ctx``, lowered to what the model supports (from ``/api/show``) when known.

        Asked once, within ``probe_timeout`` (or ``timeout`` if shorter: what is left of a
        turn); a failure is remembered (``num_ctx`` is used, and the question is asked again
        only after the server has answered a chat or ``check``).  Called on an event loop's
        thread it never blocks: the question is asked in the background and ``num_ctx`` is
        used until the answer is in (``acontext_length`` waits for it without blocking)."""
        if self._context_length is not None:
            return self._context_length
        if probe_off_the_loop(self, timeout):
            return self.num_ctx
        with self._ctx_lock:
            if self._context_length is not None:
                return self._context_length
            if self._probe_failed:
                return self.num_ctx
            path, body = self._show_request()
            try:
                bound = self.probe_timeout if timeout is None else max(0.05, min(timeout, self.probe_timeout))
                response = self._client.post(path, json=body, timeout=httpx.Timeout(bound))
                self._context_length = self._learn_context(response)
            except (httpx.HTTPError, BackendError, ValueError, AttributeError) as exc:
                return self._probe_failure(exc)
            return self._context_length

    async def acontext_length(self, timeout: float | None = None) -> int | None:
        if self._context_length is not None or self._probe_failed:
            return self._context_length or self.num_ctx
        path, body = self._show_request()
        try:
            bound = self.probe_timeout if timeout is None else max(0.05, min(timeout, self.probe_timeout))
            response = await self._aclients.get().post(path, json=body, timeout=httpx.Timeout(bound))
            value = self._learn_context(response)
        except (httpx.HTTPError, BackendError, ValueError, AttributeError) as exc:
            with self._ctx_lock:
                return self._probe_failure(exc)
        with self._ctx_lock:
            self._context_length = value
        return value

    # -- requests ------------------------------------------------------------------------
    def _body(self, messages: list[MessageDict], options: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name, "messages": messages, "stream": True,
                                "options": {"num_ctx": self.num_ctx, **self.options, **options}}
        if self.keep_alive is not None:
            body["keep_alive"] = self.keep_alive
        return body

    # unasync: generated chat
    # generated by scripts/unasync.py from chat: do not edit
    def _chat(self, body: dict[str, Any], cancel: CancelToken) -> Generator[dict[str, Any], None]:
        """Stream ``/api/chat`` and yield its chunks (as dicts) until the ``done`` one.

        Raises BackendError on failure; returns quietly when ``cancel`` is what broke the
        connection (or ended the generator).  Closing this generator (or cancelling the task that
        iterates it) closes the response and its connection: the server sees the disconnect at once.
        """
        if cancel.cancelled:
            return
        client = self._client
        try:
            with client.stream("POST", "/api/chat", json=body,
                               extensions=cancel_extensions(cancel, is_async=False)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._status_error(response)
                for line in response.iter_lines():
                    part = self._parse_line(line)
                    if part is None:
                        continue
                    yield part
                    if part.get("done") or cancel.cancelled:
                        return
            if not cancel.cancelled:
                raise BackendError(f"Ollama at {self.base_url} ended the stream before it was done")
        except BackendError:
            if cancel.cancelled:
                return  # a line cut short by our own shutdown
            raise
        except httpx.HTTPError as exc:
            if cancel.cancelled:
                return  # the read failed because we shut the socket down: that is the cancel
            raise self._translate(exc) from exc
    # unasync: end generated chat

    # unasync: begin chat
    async def _achat(self, body: dict[str, Any], cancel: CancelToken) -> AsyncGenerator[dict[str, Any], None]:
        """Stream ``/api/chat`` and yield its chunks (as dicts) until the ``done`` one.

        Raises BackendError on failure; returns quietly when ``cancel`` is what broke the
        connection (or ended the generator).  Closing this generator (or cancelling the task that
        iterates it) closes the response and its connection: the server sees the disconnect at once.
        """
        if cancel.cancelled:
            return
        client = self._aclients.get()
        try:
            async with client.stream("POST", "/api/chat", json=body,
                                     extensions=cancel_extensions(cancel, is_async=True)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._status_error(response)
                async for line in response.aiter_lines():
                    part = self._parse_line(line)
                    if part is None:
                        continue
                    yield part
                    if part.get("done") or cancel.cancelled:
                        return
            if not cancel.cancelled:
                raise BackendError(f"Ollama at {self.base_url} ended the stream before it was done")
        except BackendError:
            if cancel.cancelled:
                return  # a line cut short by our own shutdown
            raise
        except httpx.HTTPError as exc:
            if cancel.cancelled:
                return  # the read failed because we shut the socket down: that is the cancel
            raise self._translate(exc) from exc
    # unasync: end chat

    def _record(self, part: dict[str, Any], usage: Usage, cache_key: Any) -> None:
        """Ollama's final-chunk figures into ``usage`` and this key's stats."""
        usage.prompt_tokens = _int(part.get("prompt_eval_count"))
        usage.completion_tokens = _int(part.get("eval_count"))
        usage.load_s = _ns(part.get("load_duration"))
        usage.prompt_eval_s = _ns(part.get("prompt_eval_duration"))
        usage.eval_s = _ns(part.get("eval_duration"))
        usage.finish_reason = part.get("done_reason") or "stop"
        computed = usage.prompt_tokens
        self._probe_failed = False  # the server answers: the context window may be asked again
        with self._stats_lock:
            # load_duration is a few milliseconds once the model is in memory; the largest
            # one seen is the real load.
            if usage.load_s is not None:
                self.model_load_s = max(self.model_load_s or 0.0, usage.load_s)
            self._last[cache_key] = {
                "prompt_eval_tokens": computed,
                "prompt_tokens_per_s": _rate(computed, usage.prompt_eval_s),
                "server_tokens_per_s": _rate(usage.completion_tokens, usage.eval_s),
            }

    def _request_body(self, request: GenerationRequest) -> dict[str, Any]:
        options = {"num_predict": request.max_tokens, "temperature": request.temperature, **request.options}
        messages = request.messages
        if any("tool_calls" in m or m["role"] == "tool" for m in messages):
            messages = [_ollama_message(m) for m in messages]  # type: ignore[misc]
        body = self._body(messages, options)
        if request.tools:
            body["tools"] = request.tools
        return body

    # unasync: generated generate
    # generated by scripts/unasync.py from generate: do not edit
    def generate(self, request: GenerationRequest) -> Iterator[str]:
        parts = self._chat(self._request_body(request), request.cancel)
        calls: list[ToolCall] = []
        try:
            for part in parts:
                if request.cancel.cancelled:
                    return
                message = part.get("message") or {}
                content = message.get("content")
                if content:
                    yield content
                calls.extend(_calls(message))
                if part.get("done"):
                    self._record(part, request.usage, request.cache_key)
                    request.tool_calls = calls
        finally:
            parts.close()
    # unasync: end generated generate

    # unasync: begin generate
    async def agenerate(self, request: GenerationRequest) -> AsyncIterator[str]:
        parts = self._achat(self._request_body(request), request.cancel)
        calls: list[ToolCall] = []
        try:
            async for part in parts:
                if request.cancel.cancelled:
                    return
                message = part.get("message") or {}
                content = message.get("content")
                if content:
                    yield content
                calls.extend(_calls(message))
                if part.get("done"):
                    self._record(part, request.usage, request.cache_key)
                    request.tool_calls = calls
        finally:
            await parts.aclose()
    # unasync: end generate

    def warm(self, messages: list[MessageDict], cancel: CancelToken, *, cache_key: Any = None) -> dict[str, Any]:
        """Send the restored conversation with ``num_predict: 1``: Ollama loads the model (if it
        is not loaded) and computes the prompt into its cache; the one token is discarded."""
        usage = Usage()
        parts = self._chat(self._body(messages, {"num_predict": 1, "temperature": 0}), cancel)
        try:
            for part in parts:
                if part.get("done"):
                    self._record(part, usage, cache_key)
        finally:
            parts.close()
        return usage.figures("warmup_")

    def cache_stats(self, *, cache_key: Any = None) -> dict[str, Any]:
        n_ctx = self.context_length()
        with self._stats_lock:
            return {"n_ctx": n_ctx, "base_url": self.base_url, "keep_alive": self.keep_alive,
                    "model_load_s": None if self.model_load_s is None else round(self.model_load_s, 3),
                    **self._last.get(cache_key, {})}


def _ollama_message(m: MessageDict) -> dict[str, Any]:
    """A history message as ``/api/chat`` takes it: calls without ids (Ollama has none), a
    result named by ``tool_name``."""
    if m["role"] == "tool":
        return {"role": "tool", "content": m["content"], "tool_name": m.get("name", "")}
    if "tool_calls" in m:
        return {"role": m["role"], "content": m["content"],
                "tool_calls": [{"function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                               for c in m["tool_calls"]]}
    return dict(m)


def _calls(message: dict[str, Any]) -> list[ToolCall]:
    """The calls in a streamed chunk's message; Ollama gives them no ids, so each gets one."""
    out: list[ToolCall] = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            logger.warning("Ollama sent a tool call that is not one: %.200r", call)
            continue
        args = fn.get("arguments") or {}
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = {"_raw": args}
        out.append(ToolCall(fn["name"], args if isinstance(args, dict) else {"_value": args},
                            f"call_{uuid.uuid4().hex[:12]}"))
    return out


def _rate(tokens: int | None, seconds: float | None) -> float | None:
    return round(tokens / seconds, 1) if tokens and seconds else None


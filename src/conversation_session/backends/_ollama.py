"""The Ollama backend: the seed's own deployment (``qwen2.5:3b`` served by Ollama).

Streams ``/api/chat`` (NDJSON) with the whole kept history through the official ``ollama``
client, whose ``httpx`` client gets our timeouts and a ``StreamKiller``: Ollama stops
generating only when the client disconnects, so cancelling a turn shuts the socket down.
Ollama's runner reuses its KV cache for the common prefix.

Figures: ``prompt_eval_count`` is what Ollama counts as the prompt.  Depending on the Ollama
version it is the whole prompt or only the tokens it had to compute (the rest came from its
cache), and there is no sound way to tell them apart from the outside (our own token count is
an estimate and other clients share the server's cache), so ``cached_tokens`` is None.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Generator, Iterator
from typing import Any, cast

import httpx
import ollama

from .._exceptions import BackendError, ModelNotFoundError
from .._format import MessageDict
from ._base import Backend, CancelToken, GenerationRequest, Usage
from ._http import HttpTimeouts, StreamKiller

__all__ = ["DEFAULT_KEEP_ALIVE", "DEFAULT_OLLAMA_MODEL", "OllamaBackend", "default_ollama_url"]

logger = logging.getLogger("conversation_session.backends.ollama")

DEFAULT_OLLAMA_MODEL = "qwen2.5:3b"
# Ollama unloads an idle model after 5 minutes by default; a user thinking longer than that
# would pay the model load (and lose the KV cache) on the next turn.  Sent with every
# request, so the model stays loaded while the session is in use and for 30 minutes after.
DEFAULT_KEEP_ALIVE = "30m"


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


class OllamaBackend(Backend):
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
    """

    name = "ollama"
    reuses_prompt_cache = True
    can_warm = True

    def __init__(self, model: str | None = None, *, base_url: str | None = None, num_ctx: int = 4096,
                 keep_alive: str | float | None = DEFAULT_KEEP_ALIVE, timeouts: HttpTimeouts | None = None):
        self.model_name = model or DEFAULT_OLLAMA_MODEL
        self.base_url = (base_url or default_ollama_url()).rstrip("/")
        self.num_ctx = num_ctx
        self.keep_alive = keep_alive
        self.timeouts = timeouts or HttpTimeouts()
        self._killer = StreamKiller()
        # No keep-alive: every request opens its own connection, whose socket the killer sees.
        self._client = ollama.Client(
            host=self.base_url, timeout=self.timeouts.to_httpx(),
            limits=httpx.Limits(max_keepalive_connections=0), event_hooks=self._killer.event_hooks(),
        )
        # /api/show runs on the caller's thread (load_history, trimming): keep it short.
        self._probe = ollama.Client(host=self.base_url, timeout=httpx.Timeout(self.timeouts.connect * 2))
        self._ctx_lock = threading.Lock()
        self._context_length: int | None = None
        self._stats_lock = threading.Lock()
        self._last: dict[str, Any] = {}
        self.model_load_s: float | None = None

    # -- errors ------------------------------------------------------------------------
    def _translate(self, exc: BaseException) -> BackendError:
        if isinstance(exc, (httpx.ConnectError, ConnectionError)):
            return BackendError(
                f"cannot connect to Ollama at {self.base_url}: is it running? Start it with "
                "`ollama serve`, or set --base-url / OLLAMA_HOST to where it runs"
            )
        if isinstance(exc, ollama.ResponseError):
            message = " ".join(str(exc.error).split())[:500]
            if exc.status_code == -1:  # an {"error": ...} line in the middle of the stream
                return BackendError(f"Ollama at {self.base_url} failed mid-reply: {message}")
            if exc.status_code == 404 and "not found" in message.lower() and "page" not in message.lower():
                return ModelNotFoundError(
                    f"Ollama at {self.base_url} does not have the model {self.model_name!r}: "
                    f"run `ollama pull {self.model_name}` ({message})",
                    model=self.model_name,
                )
            return BackendError(f"Ollama at {self.base_url} answered HTTP {exc.status_code} to /api/chat: {message}")
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(f"Ollama at {self.base_url} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.RemoteProtocolError):
            return BackendError(f"Ollama at {self.base_url} closed the connection mid-reply: {exc}")
        if isinstance(exc, (ValueError, TypeError)):  # a line that is not JSON, or not a chunk
            return BackendError(f"Ollama at {self.base_url} sent a malformed stream: {exc}")
        return BackendError(f"talking to Ollama at {self.base_url} failed: {exc}")

    # -- capabilities --------------------------------------------------------------------
    def context_length(self) -> int | None:
        """``num_ctx``, lowered to what the model supports (from ``/api/show``) when known."""
        with self._ctx_lock:
            if self._context_length is None:
                try:
                    info = self._probe.show(self.model_name).modelinfo or {}
                    trained = next((int(v) for k, v in info.items() if k.endswith(".context_length")), None)
                except Exception as exc:  # noqa: BLE001 - unknown is fine; chat() reports errors
                    logger.debug("could not read the context length from /api/show: %s", exc)
                    return self.num_ctx  # not remembered: asked again once the server is up
                self._context_length = min(self.num_ctx, trained) if trained else self.num_ctx
            return self._context_length

    # -- requests ------------------------------------------------------------------------
    def _chat(self, messages: list[MessageDict], options: dict[str, Any],
              cancel: CancelToken) -> Generator[dict[str, Any], None, None]:
        """Stream ``/api/chat`` and yield its chunks (as dicts) until the ``done`` one.

        Raises BackendError on failure; returns quietly when ``cancel`` is what broke the
        connection.
        """
        if cancel.cancelled:
            return
        self._killer.bind(cancel)
        try:
            # The client types it as an Iterator; it is a generator, and closing it closes the response.
            stream = cast(Generator[ollama.ChatResponse, None, None], self._client.chat(
                model=self.model_name, messages=messages, stream=True,
                options={"num_ctx": self.num_ctx, **options}, keep_alive=self.keep_alive))
            with contextlib.closing(stream):
                for chunk in stream:
                    part = chunk.model_dump(exclude_none=True)
                    yield part
                    if part.get("done"):
                        return
            if not cancel.cancelled:
                raise BackendError(f"Ollama at {self.base_url} ended the stream before it was done")
        except BackendError:
            raise
        except Exception as exc:
            if cancel.cancelled:
                return  # the read failed because we shut the socket down: that is the cancel
            raise self._translate(exc) from exc
        finally:
            self._killer.bind(None)

    def _record(self, part: dict[str, Any], usage: Usage) -> None:
        """Ollama's final-chunk figures into ``usage`` and this backend's stats."""
        usage.prompt_tokens = _int(part.get("prompt_eval_count"))
        usage.completion_tokens = _int(part.get("eval_count"))
        usage.load_s = _ns(part.get("load_duration"))
        usage.prompt_eval_s = _ns(part.get("prompt_eval_duration"))
        usage.eval_s = _ns(part.get("eval_duration"))
        usage.finish_reason = part.get("done_reason") or "stop"
        computed = usage.prompt_tokens
        with self._stats_lock:
            # load_duration is a few milliseconds once the model is in memory; the largest
            # one seen is the real load.
            if usage.load_s is not None:
                self.model_load_s = max(self.model_load_s or 0.0, usage.load_s)
            self._last = {
                "prompt_eval_tokens": computed,
                "prompt_tokens_per_s": _rate(computed, usage.prompt_eval_s),
                "server_tokens_per_s": _rate(usage.completion_tokens, usage.eval_s),
            }

    def generate(self, request: GenerationRequest) -> Iterator[str]:
        options = {"num_predict": request.max_tokens, "temperature": request.temperature, **request.options}
        usage = request.usage
        with contextlib.closing(self._chat(request.messages, options, request.cancel)) as parts:
            for part in parts:
                if request.cancel.cancelled:
                    return
                content = (part.get("message") or {}).get("content")
                if content:
                    yield content
                if part.get("done"):
                    self._record(part, usage)

    def warm(self, messages: list[MessageDict], cancel: CancelToken) -> dict[str, Any]:
        """Send the restored conversation with ``num_predict: 1``: Ollama loads the model (if it
        is not loaded) and computes the prompt into its cache; the one token is discarded."""
        usage = Usage()
        for part in self._chat(messages, {"num_predict": 1, "temperature": 0}, cancel):
            if part.get("done"):
                self._record(part, usage)
        return usage.figures("warmup_")

    def cache_stats(self) -> dict[str, Any]:
        n_ctx = self.context_length()
        with self._stats_lock:
            return {"n_ctx": n_ctx, "base_url": self.base_url, "keep_alive": self.keep_alive,
                    "model_load_s": None if self.model_load_s is None else round(self.model_load_s, 3),
                    **self._last}

    def close(self) -> None:
        self._client._client.close()
        self._probe._client.close()


def _rate(tokens: int | None, seconds: float | None) -> float | None:
    return round(tokens / seconds, 1) if tokens and seconds else None

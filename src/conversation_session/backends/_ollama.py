"""The Ollama backend: the seed's own deployment (``qwen2.5:3b`` served by Ollama).

Uses the official ``ollama`` client and streams ``/api/chat`` with the whole kept history;
Ollama's runner reuses its KV cache for the common prefix.  Ollama stops generating only when
the client disconnects, so cancelling a turn shuts the socket down (see ``StreamKiller``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from .._exceptions import BackendError, ModelNotFoundError
from ._base import Backend, GenerationRequest
from ._http import HttpTimeouts, StreamKiller

__all__ = ["DEFAULT_OLLAMA_MODEL", "OllamaBackend", "default_ollama_url"]

logger = logging.getLogger("conversation_session.backends.ollama")

DEFAULT_OLLAMA_MODEL = "qwen2.5:3b"


def default_ollama_url() -> str:
    host = os.environ.get("OLLAMA_HOST", "").strip()
    if not host:
        return "http://127.0.0.1:11434"
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


def _ns(value: Any) -> float | None:
    return value / 1e9 if isinstance(value, (int, float)) and value else None


class OllamaBackend(Backend):
    """A model served by Ollama.

    Args:
        model: the Ollama model name (default ``qwen2.5:3b``, as in the seed).
        base_url: server URL; default ``$OLLAMA_HOST`` or ``http://127.0.0.1:11434``.
        num_ctx: the context window to ask for (Ollama's own default is small and it cuts the
            front of longer prompts silently; sending it explicitly lets the session trim).
        keep_alive: how long Ollama keeps the model loaded after a request.
    """

    name = "ollama"
    reuses_prompt_cache = True

    def __init__(self, model: str | None = None, *, base_url: str | None = None, num_ctx: int = 4096,
                 keep_alive: str | float | None = None, timeouts: HttpTimeouts | None = None):
        try:
            import ollama
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise BackendError("the ollama client is not installed: pip install ollama") from exc
        self._ollama = ollama
        self.model_name = model or DEFAULT_OLLAMA_MODEL
        self.base_url = (base_url or default_ollama_url()).rstrip("/")
        self.num_ctx = num_ctx
        self.keep_alive = keep_alive
        self.timeouts = timeouts or HttpTimeouts()
        self._killer = StreamKiller()
        self._client = ollama.Client(
            host=self.base_url,
            timeout=self.timeouts.to_httpx(),
            event_hooks={"response": [self._killer.response_hook]},
        )
        self._ctx_lock = threading.Lock()
        self._context_length: int | None = None
        self.last_load_s: float | None = None

    # -- errors ------------------------------------------------------------------------
    def _translate(self, exc: BaseException) -> BackendError:
        if isinstance(exc, (httpx.ConnectError, ConnectionError)):
            return BackendError(
                f"cannot connect to Ollama at {self.base_url}: is it running? Start it with "
                "`ollama serve`, or set --base-url / OLLAMA_HOST to where it runs"
            )
        if isinstance(exc, httpx.TimeoutException):
            return BackendError(f"Ollama at {self.base_url} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, self._ollama.ResponseError):
            if exc.status_code == 404 or "not found" in str(exc.error).lower():
                return ModelNotFoundError(
                    f"Ollama at {self.base_url} does not have the model {self.model_name!r}: "
                    f"run `ollama pull {self.model_name}` ({exc.error})",
                    model=self.model_name,
                )
            return BackendError(f"Ollama at {self.base_url} answered HTTP {exc.status_code}: {exc.error}")
        if isinstance(exc, httpx.HTTPError):
            return BackendError(f"talking to Ollama at {self.base_url} failed: {exc}")
        if isinstance(exc, ValueError):
            return BackendError(f"Ollama at {self.base_url} sent a malformed stream: {exc}")
        return BackendError(f"Ollama at {self.base_url}: {exc}")

    # -- capabilities --------------------------------------------------------------------
    def context_length(self) -> int | None:
        """``num_ctx``, lowered to what the model supports (from ``/api/show``) when known."""
        with self._ctx_lock:
            if self._context_length is None:
                trained = None
                try:
                    info = self._client.show(self.model_name).modelinfo or {}
                    trained = next((int(v) for k, v in info.items() if k.endswith(".context_length")), None)
                except Exception as exc:  # noqa: BLE001 - unknown is fine; chat() reports errors
                    logger.debug("could not read the context length from /api/show: %s", exc)
                    return self.num_ctx
                self._context_length = min(self.num_ctx, trained) if trained else self.num_ctx
            return self._context_length

    def generate(self, request: GenerationRequest) -> Iterator[str]:
        options = {"num_ctx": self.num_ctx, "num_predict": request.max_tokens,
                   "temperature": request.temperature, **request.options}
        usage = request.usage
        self._killer.bind(request.cancel)
        try:
            stream = self._client.chat(
                model=self.model_name, messages=request.messages, stream=True,
                options=options, keep_alive=self.keep_alive,
            )
            for part in stream:
                if request.cancel.cancelled:
                    break
                content = part.message.content if part.message else None
                if content:
                    yield content
                if part.done:
                    usage.prompt_tokens = part.prompt_eval_count
                    usage.completion_tokens = part.eval_count
                    usage.load_s = _ns(part.load_duration)
                    usage.prompt_eval_s = _ns(part.prompt_eval_duration)
                    usage.eval_s = _ns(part.eval_duration)
                    usage.finish_reason = part.done_reason or "stop"
                    self.last_load_s = usage.load_s
            else:
                if usage.finish_reason is None and not request.cancel.cancelled:
                    raise BackendError(f"Ollama at {self.base_url} ended the stream before it was done")
            stream.close()
        except BackendError:
            raise
        except Exception as exc:
            if request.cancel.cancelled:
                return  # the read failed because we shut the socket down: that is the cancel
            raise self._translate(exc) from exc
        finally:
            self._killer.bind(None)

    def cache_stats(self) -> dict[str, Any]:
        return {"n_ctx": self.context_length(), "base_url": self.base_url,
                "model_load_s": self.last_load_s}

    def close(self) -> None:
        self._client._client.close()

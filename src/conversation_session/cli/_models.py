"""How the chat shows the models a backend offers (the listing itself: ``backends.list_models``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..backends import ModelEntry, find_local_model, list_models
from ._text import format_bytes, printable

__all__ = ["ModelEntry", "default_model", "find_local_model", "list_models", "print_models"]


def default_model(backend: str, model: str | None, entries: list[ModelEntry]) -> str | None:
    """The model the chat would use with these flags (to mark it in a listing)."""
    if model:
        return model
    if backend == "ollama":
        from ..backends._ollama import DEFAULT_OLLAMA_MODEL

        return DEFAULT_OLLAMA_MODEL
    if backend in ("llama-cpp", "fake") and entries:
        return entries[0].name  # the bundled model comes first
    return None


def print_models(entries: list[Any], current: str | None, say: Callable[[str], None]) -> None:
    """One line per model (``*``: the one in use)."""
    if not entries:
        say("the backend lists no models")
        return
    width = max(len(e.name) for e in entries)
    for e in entries:
        here = current is not None and (e.name == current or e.detail == current
                                        or Path(current).stem == e.name)
        size = format_bytes(e.size_bytes) if e.size_bytes is not None else ""
        say(f"{'*' if here else ' '} {printable(e.name, keep_newlines=False):<{width}}  {size:>9}  "
            f"{printable(e.detail, keep_newlines=False)}".rstrip())

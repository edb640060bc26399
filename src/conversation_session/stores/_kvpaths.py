"""Where this host keeps the KV cache files of sessions whose history is not in a folder."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["host_kv_dir"]


def host_kv_dir(description: str) -> Path:
    """The per-host KV folder of a store (PostgreSQL: the KV state belongs to this host's model,
    the history to the shared database), named after the store's description (its redacted
    URL), under ``$XDG_CACHE_HOME`` (default ``~/.cache``)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "conversation-session" / "kv"
    return base / hashlib.sha256(description.encode()).hexdigest()[:16]

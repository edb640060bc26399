"""Durability levels: what a returned turn survives (see docs/durability.md)."""

from __future__ import annotations

import os

__all__ = ["DEFAULT_DURABILITY", "DURABILITY_ENV", "DURABILITY_LEVELS", "resolve_durability"]

DURABILITY_LEVELS = ("process", "power")
"""``process``: a returned turn survives the process dying (kill -9, a crash, an OOM kill): its
journal line is written (in the kernel's page cache) before ``chat()`` returns.
``power``: it also survives the machine losing power or the kernel crashing: the line, and
every directory entry it depends on, is on the disk (``fdatasync``, ``fsync`` of the folder)
before ``chat()`` returns."""

DEFAULT_DURABILITY = "power"
"""Chosen from bench/bench_durability.py (BENCHMARKS.md): the flush costs a fraction of a
millisecond per turn here, tens of milliseconds on a slow SD card, against a reply that takes
hundreds of milliseconds to seconds; and group commit keeps it flat with many sessions."""

DURABILITY_ENV = "CONVERSATION_SESSION_DURABILITY"


def resolve_durability(value: str | None = None) -> str:
    """``value``, else ``$CONVERSATION_SESSION_DURABILITY``, else the default; ``ValueError``
    naming the levels if it is none of them."""
    source = "durability"
    if value is None:
        env = os.environ.get(DURABILITY_ENV, "").strip()
        if not env:
            return DEFAULT_DURABILITY
        value, source = env, f"${DURABILITY_ENV}"
    if not isinstance(value, str) or value.strip().lower() not in DURABILITY_LEVELS:
        raise ValueError(f"{source}={value!r} is not a durability level; use one of: "
                         f"{', '.join(DURABILITY_LEVELS)}")
    return value.strip().lower()

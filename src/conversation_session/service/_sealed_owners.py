"""The ownership table of a service that encrypts its sessions: the persona a session was created
with (``POST /v1/sessions {"system_prompt"}``, kept in the table until the session's first turn
puts it into the store) is sealed under the store's key, like the sessions themselves.

A wrapper around either table (``_owners.py``), so the tables stay unaware of keys; owners,
ids, aliases and dates stay plain (they say who, not what was said).
"""

from __future__ import annotations

import logging
from typing import Any

from ..stores._crypto import Keyring
from ._owners import BindOutcome, OwnerEntry, OwnerTable

__all__ = ["SealedOwners"]

logger = logging.getLogger("conversation_session.service")

_PREFIX = "cs-sealed:"
_LABEL = b"conversation-session service persona"


class SealedOwners:
    """``OwnerTable`` whose entries' ``system_prompt`` is stored sealed by ``keyring``."""

    def __init__(self, inner: OwnerTable, keyring: Keyring):
        self._inner = inner
        self._keys = keyring

    def _open(self, entry: OwnerEntry) -> OwnerEntry:
        stored = entry.get("system_prompt")
        if not isinstance(stored, str) or not stored.startswith(_PREFIX):
            return entry  # written before the key was given: plain, as it was
        plain = self._keys.unseal(stored[len(_PREFIX):], _LABEL)
        if plain is None:
            logger.warning("a session's persona is sealed by another key; it is not used")
        return {**entry, "system_prompt": None if plain is None else plain.decode("utf-8", "surrogatepass")}

    def get(self, sid: str) -> OwnerEntry | None:
        entry = self._inner.get(sid)
        return None if entry is None else self._open(entry)

    def list(self, owner: str) -> list[tuple[str, OwnerEntry]]:
        return [(sid, self._open(e)) for sid, e in self._inner.list(owner)]

    def create(self, owner: str, alias: str | None = None, system_prompt: str | None = None,
               sid: str | None = None) -> tuple[str, OwnerEntry]:
        sealed = None if system_prompt is None else _PREFIX + self._keys.seal(
            system_prompt.encode("utf-8", "surrogatepass"), _LABEL)
        made, entry = self._inner.create(owner, alias, sealed, sid)
        return made, self._open(entry)

    def find_alias(self, owner: str, alias: str) -> str | None:
        return self._inner.find_alias(owner, alias)

    def bind(self, sid: str, expected: str | None, store_id: str) -> BindOutcome:
        return self._inner.bind(sid, expected, store_id)

    def remove(self, sid: str) -> bool:
        return self._inner.remove(sid)

    def take_rate(self, owner: str, rate: float, burst: float, cost: float = 1.0) -> float:
        return self._inner.take_rate(owner, rate, burst, cost)

    def check(self) -> None:
        self._inner.check()

    def close(self) -> None:
        self._inner.close()

    def __getattr__(self, name: str) -> Any:  # anything else a table offers (paths, descriptions)
        return getattr(self._inner, name)

"""Sealed exports: an encrypted session leaves its store encrypted (docs/encryption.md).

A sealed export file is the encrypted snapshot format of ``_crypto`` (a plaintext header line
naming the session and carrying a wrapped data key, then the nonce and ciphertext), so it is
portable: the one key that wraps its data key opens it anywhere, with no other file.  Its
plaintext is exactly the plain export's bytes (the session JSON format).  The data key is a
fresh one, not the session's own: a backup stays readable after the session is deleted, and
the export reveals nothing of the store's keys.
"""

from __future__ import annotations

import json

from .._exceptions import SessionFormatError
from ._api import StoreAPI
from ._crypto import Keyring, is_encrypted_snapshot, open_snapshot

__all__ = ["encrypted_map", "is_sealed_export", "needs_seal", "open_export", "seal_export", "store_keyring"]


def store_keyring(store: StoreAPI) -> Keyring | None:
    """The store's key (both stores keep it as ``keyring``); None for a store without one."""
    keyring = getattr(store, "keyring", None)
    return keyring if isinstance(keyring, Keyring) else None


def encrypted_map(store: StoreAPI) -> dict[str, bool] | None:
    """Which listed sessions are stored encrypted (their exports are sealed); None when every
    session the store can load is plain (it has no key, and an encrypted session does not
    load without one).  From the store's own listing (``SessionInfo.encrypted``), which knows
    for either store; one listing serves a whole ``export --all``."""
    if store_keyring(store) is None:
        return None
    return {i.session_id: i.encrypted for i in store.list_sessions()}


def needs_seal(session_id: str, encrypted: dict[str, bool] | None) -> bool:
    """True if ``session_id`` (loaded from the store ``encrypted`` describes) must be exported
    sealed.  A session the listing left out (no messages yet, or created meanwhile) is sealed
    when the store has a key: the safe side."""
    return encrypted is not None and encrypted.get(session_id, True)


def seal_export(plain: bytes, session_id: str, keyring: Keyring) -> bytes:
    """``plain`` (a session's JSON export) sealed under a fresh data key wrapped by ``keyring``."""
    return keyring.new_cipher(session_id, inline=True).seal_snapshot(plain)  # opens with the key alone


def is_sealed_export(raw: bytes | bytearray) -> bool:
    return is_encrypted_snapshot(raw)


def open_export(raw: bytes | bytearray, keyring: Keyring | None, where: str) -> tuple[bytes, str]:
    """The plaintext (session JSON) of a sealed export, and the session id it was sealed for.

    ``EncryptionKeyError`` without the key or with another one; ``SessionFormatError`` for a
    damaged or altered file (the header is authenticated too, so its session id can be trusted
    once the file opens)."""
    end = raw.find(b"\n")
    try:
        head = json.loads(bytes(raw[:end])) if end > 0 else None
    except ValueError:
        head = None
    session_id = head.get("session_id") if isinstance(head, dict) else None
    if not isinstance(session_id, str):
        raise SessionFormatError(f"{where}: damaged encrypted header (no session id); refused")
    plain, _cipher = open_snapshot(raw, session_id, keyring, where)
    return plain, session_id

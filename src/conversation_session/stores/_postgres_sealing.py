"""Which values of a PostgreSQL session are encrypted, and how (docs/encryption.md).

An encrypted session's row holds its data key wrapped by the user's key (``sessions.data_key``,
NULL for a plain session), or a reference to it in the keystore database (_postgres_keystore.py).
Sealed under the data key (AES-256-GCM), as base64 text in the
columns that hold them in a plain session:

* each message as its whole JSON object (content, ``interrupted``, tool calls and results) in
  ``messages.content``; its ``role`` stays plain (the turn count and the role check read it);
* the system prompt, the title, the first user line (listings) and the summary (a JSON string
  in the ``jsonb`` column);
* what undo withdrew: the server copies the sealed rows into ``undone`` as they are.

Associated data binds each value to its session and its place (a message's index, a column's
name): a value copied to another row, another index or another session fails authentication,
and so does any change of a byte.  Plain: ids, dates, the model's name, the counts and sizes,
the lease.  Only this module knows the layout; ``_postgres.py`` calls it where rows are built
and read.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .._exceptions import SessionFormatError
from ._crypto import SessionCipher, unb64
from ._record import MessageDict

__all__ = ["open_field", "open_messages", "open_summary", "seal_field", "seal_message", "seal_summary"]


def _ad(cipher: SessionCipher, place: str) -> bytes:
    return f"conversation-session postgresql\0{cipher.session_id}\0{place}".encode()


def _seal(cipher: SessionCipher, place: str, plain: bytes) -> str:
    return base64.b64encode(cipher.seal(plain, _ad(cipher, place))).decode("ascii")


def _open(cipher: SessionCipher, place: str, text: object, where: str) -> bytes:
    try:
        if not isinstance(text, str):
            raise ValueError(f"a {type(text).__name__}, not sealed text")
        blob = unb64(text)
    except (ValueError, binascii.Error) as exc:
        raise SessionFormatError(f"{where}: not an encrypted value ({exc}); refused") from None
    return cipher.open(blob, _ad(cipher, place), where)


def seal_field(cipher: SessionCipher | None, name: str, value: str | None) -> str | None:
    """A session column's value as stored: sealed in an encrypted session, else as is; None and
    "" stay what they are (an empty first line means "not known yet" to the append statement)."""
    if cipher is None or not value:
        return value
    return _seal(cipher, name, value.encode("utf-8", "surrogatepass"))


def open_field(cipher: SessionCipher | None, name: str, stored: str | None) -> str | None:
    if cipher is None or not stored:
        return stored
    return _open(cipher, name, stored, f"session {cipher.session_id}'s {name}").decode("utf-8", "surrogatepass")


def seal_summary(cipher: SessionCipher | None, summary: Mapping[str, Any] | None) -> str | None:
    """The ``summary`` parameter (JSON text for the jsonb column), sealed in an encrypted session."""
    if summary is None:
        return None
    text = json.dumps(summary, ensure_ascii=False)
    return text if cipher is None else json.dumps(_seal(cipher, "summary", text.encode()))


def open_summary(cipher: SessionCipher | None, stored: Any) -> Any:
    if cipher is None or stored is None:
        return stored
    return json.loads(_open(cipher, "summary", stored, f"session {cipher.session_id}'s summary"))


def seal_message(cipher: SessionCipher, index: int, message: MessageDict, encode: Any) -> str:
    """A message's ``content`` column: its whole JSON object (``encode``: the store's JSON
    encoder), sealed at its index."""
    return _seal(cipher, f"message {index}", encode(message).encode("utf-8"))


def open_messages(cipher: SessionCipher, rows: Iterable[tuple[int, str, str]], where: str) -> list[MessageDict]:
    """The messages of ``(index, role, stored)`` rows.  Each is authenticated and decrypted on
    its own, then all are parsed as one JSON array (one parser call, not one per message: a
    5,000-message load spends its time here)."""
    roles: list[str] = []
    texts: list[str] = []
    for index, role, stored in rows:
        plain = _open(cipher, f"message {index}", stored, f"{where} message {index}")
        roles.append(role)
        texts.append(plain.decode("utf-8"))
    try:
        messages = json.loads("[" + ",".join(texts) + "]")
    except ValueError as exc:  # pragma: no cover - authenticated: only this module wrote them
        raise SessionFormatError(f"{where}: a sealed message is not JSON ({exc})") from None
    if len(messages) != len(roles):  # pragma: no cover - each authenticated value is one object
        raise SessionFormatError(f"{where}: a sealed message is not one JSON object; refused")
    for message, role in zip(messages, roles, strict=True):
        if not isinstance(message, dict) or message.get("role") != role:
            raise SessionFormatError(f"{where}: a message's role does not match its row; refused")
    return messages

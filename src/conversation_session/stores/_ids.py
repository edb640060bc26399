"""The one rule for a session id, used by every store, the service and the chat app.

Only letters, digits, ``_`` and ``-`` (1 to 128 of them), so no id can name a path outside a
sessions folder (no separators, no ``..``, no NUL, nothing absolute) and every id is safe in a
URL path, a file name and a SQL parameter alike.
"""

from __future__ import annotations

import re
from typing import TypeGuard

__all__ = ["SESSION_ID_PATTERN", "SESSION_ID_RE", "SESSION_ID_RE_BYTES", "is_session_id", "validate_session_id"]

SESSION_ID_PATTERN = r"[A-Za-z0-9_-]{1,128}"
SESSION_ID_RE = re.compile(SESSION_ID_PATTERN)
SESSION_ID_RE_BYTES = re.compile(SESSION_ID_PATTERN.encode())


def is_session_id(value: object) -> TypeGuard[str]:
    """True if ``value`` is a string that is a valid session id."""
    return isinstance(value, str) and SESSION_ID_RE.fullmatch(value) is not None


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is a plain session name, else raise ``ValueError``."""
    if not is_session_id(session_id):
        raise ValueError(
            f"invalid session id {session_id!r}: use 1-128 letters, digits, '_' or '-' "
            "(a name such as 'session_1730000001', not a path)"
        )
    return session_id

"""The exceptions of conversation_session.

Every error the library raises on purpose derives from ``SessionError``::

    SessionError
    ├── SessionTimeoutError        (also a built-in TimeoutError)
    │   └── TTSTimeoutError        speech outlived tts_wait_timeout; the turn is saved
    ├── BackendError               the model backend failed (server down, model missing, ...)
    │   └── ModelNotFoundError
    ├── SessionFormatError         a session file is unreadable, corrupt or malformed
    ├── SessionLockedError         another process (or host) has the session open for writing
    ├── SessionNotFoundError       no such session in the store (also a FileNotFoundError)
    └── StoreUnavailableError      the store cannot be reached (database down, folder gone)

Errors from third-party libraries (httpx, llama-cpp, OSError from the disk) are translated at
the boundary with ``raise ... from exc``, so callers only ever need to catch ``SessionError``.
An invalid session id is a programming error and raises the built-in ``ValueError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._result import ChatResult

__all__ = [
    "BackendError",
    "EncryptionKeyError",
    "ModelNotFoundError",
    "SessionError",
    "SessionFormatError",
    "SessionLockedError",
    "SessionNotFoundError",
    "SessionTimeoutError",
    "StoreUnavailableError",
    "TTSTimeoutError",
]


class SessionError(Exception):
    """Base class of every error raised by conversation_session."""


class SessionTimeoutError(SessionError, TimeoutError):
    """A turn ran past ``timeout``; the completed history and the KV cache are kept.

    Attributes:
        partial_response: the text generated before the deadline (not saved).
        timeout: the limit that expired, in seconds.
    """

    def __init__(self, message: str, *, partial_response: str = "", timeout: float | None = None):
        super().__init__(message)
        self.partial_response = partial_response
        self.timeout = timeout


class TTSTimeoutError(SessionTimeoutError):
    """Speech did not finish within ``tts_wait_timeout``; the turn itself is complete and saved.

    Attributes:
        result: the ``ChatResult`` of the completed turn.
    """

    def __init__(self, message: str, *, result: ChatResult, timeout: float | None = None):
        super().__init__(message, partial_response=result.response, timeout=timeout)
        self.result = result


class BackendError(SessionError):
    """The model backend failed: the message says what, where (path, URL) and what to do."""


class ModelNotFoundError(BackendError):
    """The backend does not have the requested model."""

    def __init__(self, message: str, *, model: str):
        super().__init__(message)
        self.model = model


class SessionFormatError(SessionError):
    """A session file cannot be used: unreadable, not JSON, or not a session."""

    def __init__(self, message: str, *, path: Any = None):
        super().__init__(message)
        self.path = path


class EncryptionKeyError(SessionError):
    """An encrypted session cannot be read: no key was given, or not the key it was written with.

    Nothing was changed: no file is rewritten or moved aside (docs/encryption.md)."""


class SessionLockedError(SessionError):
    """The session is open for writing in another process (or another session object)."""

    def __init__(self, message: str, *, session_id: str, holder: str | None = None):
        super().__init__(message)
        self.session_id = session_id
        self.holder = holder


class SessionNotFoundError(SessionError, FileNotFoundError):
    """The store has no session by that id.  Also a ``FileNotFoundError``, which is what the
    file store raised before stores were pluggable, so existing ``except`` clauses still work."""

    def __init__(self, message: str, *, session_id: str | None = None):
        super().__init__(message)
        self.session_id = session_id


class StoreUnavailableError(SessionError):
    """The session store cannot be reached or used (PostgreSQL down, a lost connection, a folder
    that cannot be created).  The message names the store (a URL without its password) and what
    to do.  A turn whose save failed this way still returns, with ``saved=False``."""

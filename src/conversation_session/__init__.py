"""conversation_session: local-LLM conversations that never lose their memory.

    from conversation_session import ConversationSession, SessionTimeoutError

    with ConversationSession(timeout=60) as session:
        session.load_history()                 # continue the newest saved session, if any
        result = session.chat("你好")           # saved to sessions/<session_id>.json
        print(result.response)
"""

from ._async import AsyncConversationSession
from ._core import STORE_ENV
from ._exceptions import (
    BackendError,
    ModelNotFoundError,
    SessionError,
    SessionFormatError,
    SessionLockedError,
    SessionNotFoundError,
    SessionTimeoutError,
    StoreUnavailableError,
    TTSTimeoutError,
)
from ._format import SCHEMA_VERSION, MessageDict, SessionFileDict, SessionRecord
from ._logging import setup_logger
from ._result import ChatResult
from ._session import SESSIONS_DIR_ENV, ConversationSession
from ._store import HistoryStore
from ._store_api import SessionInfo, SessionWriterAPI, StoreAPI
from ._turn import AsyncTurn, Turn
from ._version import __version__
from .backends import Backend, CancelToken, FakeBackend, GenerationRequest, HttpTimeouts, Usage

__all__ = [
    "SCHEMA_VERSION",
    "SESSIONS_DIR_ENV",
    "STORE_ENV",
    "AsyncConversationSession",
    "AsyncTurn",
    "Backend",
    "BackendError",
    "CancelToken",
    "ChatResult",
    "ConversationSession",
    "FakeBackend",
    "GenerationRequest",
    "HistoryStore",
    "HttpTimeouts",
    "MessageDict",
    "ModelNotFoundError",
    "SessionError",
    "SessionFileDict",
    "SessionFormatError",
    "SessionInfo",
    "SessionLockedError",
    "SessionNotFoundError",
    "SessionRecord",
    "SessionTimeoutError",
    "SessionWriterAPI",
    "StoreAPI",
    "StoreUnavailableError",
    "TTSTimeoutError",
    "Turn",
    "Usage",
    "__version__",
    "setup_logger",
]


def __getattr__(name: str) -> object:
    """``PostgresStore`` / ``AsyncPostgresStore`` on first use: they need the ``[postgres]`` extra."""
    if name in ("PostgresStore", "AsyncPostgresStore"):
        try:
            if name == "PostgresStore":
                from ._pgstore import PostgresStore as found
            else:
                from ._apgstore import AsyncPostgresStore as found  # type: ignore[assignment]
        except ImportError as exc:
            raise ImportError(f"{name} needs the postgres extra: pip install 'conversation-session[postgres]'") from exc
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""conversation_session: local-LLM conversations that never lose their memory.

    from conversation_session import ConversationSession, SessionTimeoutError

    with ConversationSession(timeout=60) as session:
        session.load_history()                 # continue the newest saved session, if any
        result = session.chat("你好")           # saved to sessions/<session_id>.json
        print(result.response)
"""

from ._exceptions import (
    BackendError,
    EncryptionKeyError,
    ModelNotFoundError,
    SessionError,
    SessionFormatError,
    SessionLockedError,
    SessionNotFoundError,
    SessionTimeoutError,
    StoreUnavailableError,
    TTSTimeoutError,
)
from ._logging import setup_logger
from ._result import ChatResult
from ._version import __version__
from .backends import Backend, CancelToken, FakeBackend, GenerationRequest, HttpTimeouts, ToolCall, ToolCalls, Usage
from .session._aio import AsyncConversationSession
from .session._sync import ConversationSession
from .session._turn import AsyncTurn, Turn
from .stores import SESSIONS_DIR_ENV, STORE_ENV, HistoryStore, SessionInfo, SessionWriterAPI, StoreAPI
from .stores._record import SCHEMA_VERSION, MessageDict, SessionFileDict, SessionRecord
from .tools import Tool, tool

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
    "EncryptionKeyError",
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
    "Tool",
    "ToolCall",
    "ToolCalls",
    "Turn",
    "Usage",
    "__version__",
    "setup_logger",
    "tool",
]


def __getattr__(name: str) -> object:
    """``PostgresStore`` on first use: it needs the ``[postgres]`` extra."""
    if name == "PostgresStore":
        try:
            from .stores._postgres import PostgresStore as found
        except ImportError as exc:
            raise ImportError(f"{name} needs the postgres extra: pip install 'conversation-session[postgres]'") from exc
        return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""conversation_session: local-LLM conversations that never lose their memory.

    from conversation_session import ConversationSession, SessionTimeoutError

    with ConversationSession(timeout=60) as session:
        session.load_history()                 # continue the newest saved session, if any
        result = session.chat("你好")           # saved to sessions/<session_id>.json
        print(result.response)
"""

from ._exceptions import (
    BackendError,
    ModelNotFoundError,
    SessionError,
    SessionFormatError,
    SessionLockedError,
    SessionTimeoutError,
    TTSTimeoutError,
)
from ._format import SCHEMA_VERSION, MessageDict, SessionFileDict, SessionRecord
from ._logging import setup_logger
from ._result import ChatResult
from ._session import SESSIONS_DIR_ENV, ConversationSession
from ._store import HistoryStore, SessionInfo
from ._version import __version__
from .backends import Backend, CancelToken, FakeBackend, GenerationRequest, HttpTimeouts, Usage

__all__ = [
    "SCHEMA_VERSION",
    "SESSIONS_DIR_ENV",
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
    "SessionRecord",
    "SessionTimeoutError",
    "TTSTimeoutError",
    "Usage",
    "__version__",
    "setup_logger",
]

"""The project's own checks: ruff over the whole tree, and the public API's shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import conversation_session

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_is_clean():
    proc = subprocess.run([sys.executable, "-m", "mypy", str(ROOT / "src" / "conversation_session")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_api():
    for name in ("ConversationSession", "ChatResult", "SessionError", "SessionTimeoutError", "BackendError",
                 "setup_logger", "Backend", "FakeBackend"):
        assert name in conversation_session.__all__
        assert hasattr(conversation_session, name)
    assert issubclass(conversation_session.SessionTimeoutError, TimeoutError)
    assert issubclass(conversation_session.BackendError, conversation_session.SessionError)
    assert (Path(conversation_session.__file__).parent / "py.typed").exists()

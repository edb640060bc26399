"""Shared fixtures: every test gets its own sessions folder, through the environment variable
the library reads (so code that never passes sessions_dir is isolated too)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conversation_session import SESSIONS_DIR_ENV, FakeBackend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def sessions_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "sessions"
    monkeypatch.setenv(SESSIONS_DIR_ENV, str(path))
    return path


@pytest.fixture(autouse=True)
def _reset_package_logger():
    """setup_logger() (called by the app) stops propagation; undo it so caplog sees every test's logs."""
    yield
    logger = logging.getLogger("conversation_session")
    for handler in [h for h in logger.handlers if getattr(h, "_conversation_session", False)]:
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()

"""Shared fixtures: every test gets its own sessions folder, through the environment variable
the library reads (so code that never passes sessions_dir is isolated too)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from conversation_session import SESSIONS_DIR_ENV, FakeBackend

# A test run started in the background by a non-interactive shell (`./scripts/test &`, nohup)
# inherits SIGINT ignored, and so would every child it starts: Python keeps an inherited SIG_IGN,
# so the Ctrl-C tests' children would never see their SIGINT.  Give them the default back (an
# ignored signal stays ignored across exec; a handled one becomes the default).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent

# The lanes.  `./scripts/test --fast` runs what is left once these are deselected: in-process
# tests (the Ollama-API test server is a thread of the test process), in well under two minutes.
# - model: the real embedded model (marked in the test files) or llama.cpp's server;
# - process: real processes: PostgreSQL, `serve` workers, `python main.py` on a pty or a pipe, a
#   fresh venv, the benchmarks' smoke runs, a browser, strace;
# - slow: long runs (fuzzing, many processes).
# A new test file is in the process lane unless it is listed as in-process here: a new test
# that starts processes must never slow the fast lane by accident.
_IN_PROCESS_FILES = {
    "test_async_session.py", "test_backends_async.py", "test_format.py", "test_interrupt.py",
    "test_interrupt_result.py", "test_memory_summary.py", "test_ollama_backend.py", "test_session.py",
    "test_speech.py", "test_store.py", "test_store_conformance.py", "test_store_hardening.py", "test_undo.py",
    "test_cli_undo.py", "test_cli_models.py", "test_docs_examples.py", "test_service_guard.py", "test_options.py",
}
_PROCESS_FIXTURES = {"pg_url", "pg_server", "llama_server", "core_venv", "server", "instant_server"}
# In an in-process file, a test whose name or parameters say it runs real processes.
_PROCESS_WORDS = ("kill_9", "real_process", "terminal", "pty", "postgres", "thousand", "twenty_sessions",
                  "command_lines", "espeak")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        in_process = item.path.name in _IN_PROCESS_FILES
        if (not in_process or _PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ()))
                or any(word in item.name for word in _PROCESS_WORDS)):
            item.add_marker(pytest.mark.process)


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Each phase's report on the item (``item.rep_call``): fixtures can see whether the test
    failed (the browser tests save a screenshot then)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)

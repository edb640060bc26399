"""Lets the seed's `python main.py` / `python test_session.py` work with any python3.

If the package is not importable from the interpreter that was used, but the project's
virtual environment exists (made by ./scripts/chat or ./scripts/test), re-run in it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"


def ensure_environment() -> None:
    try:
        import conversation_session  # noqa: F401
        return
    except ImportError:
        pass
    if VENV_PYTHON.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), *sys.argv])
    sys.exit("conversation_session is not installed. Run ./scripts/chat once: it installs "
             "everything and starts the chat.")

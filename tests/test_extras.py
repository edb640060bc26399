"""The core install (no extras) in a fresh virtualenv: it talks to an Ollama server and says in
one line how to get the embedded model.  Slow-ish (a venv and a pip install, about a minute
with pip's cache warm), but it is the only test that sees what a user without the
``[embedded]`` extra gets, so it stays in the suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ollama_api_server import OllamaAPIServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server():
    srv = OllamaAPIServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with ``pip install conversation-session`` from this checkout, no extras."""
    base = tmp_path_factory.mktemp("core")
    # A copy of what the package is built from, so the build never writes into the checkout.
    src = base / "checkout"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return python


def test_core_install_chats_with_ollama_without_llama_cpp(core_venv, server, sessions_dir):
    script = textwrap.dedent(f"""
        import importlib.util, sys
        from conversation_session import BackendError, ConversationSession
        from conversation_session.backends import create_backend
        assert importlib.util.find_spec("llama_cpp") is None, "llama_cpp must not be installed"
        try:
            create_backend("llama-cpp")
        except BackendError as exc:
            print("EMBEDDED:", exc)
        with ConversationSession(backend="ollama", base_url={server.url!r}) as s:
            s.backend.check(timeout=2)
            print("REPLY:", s.chat("hello from the core install").response)
            print("REPLY:", s.chat("again").response)
        print("LOADED:", sorted(m for m in ("llama_cpp", "numpy") if m in sys.modules))
    """)
    proc = subprocess.run([str(core_venv), "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    embedded = next(line for line in lines if line.startswith("EMBEDDED:"))
    assert "pip install 'conversation-session[embedded]'" in embedded
    assert [line for line in lines if line.startswith("REPLY:")] == [
        "REPLY: You said: hello from the core install. I remember 1 messages.",
        "REPLY: You said: again. I remember 3 messages.",
    ]
    assert "LOADED: []" in lines
    assert server.chats[-1].body["messages"][0]["content"] == "hello from the core install"

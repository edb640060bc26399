"""Syntax highlighting inside the fenced code blocks of a rendered reply: on a terminal with
Pygments, code in its colours; plain when piped; cyan when Pygments is missing or the fence
names no language it knows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from conversation_session.cli._markdown import pygments_highlighter, render_markdown

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "您:"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
KEYWORD = "\x1b[34mdef\x1b[39;49;00m"  # Pygments' TerminalFormatter: a Python keyword in blue


def cyan(text: str, *names: str) -> str:
    return f"<{','.join(names)}>{text}</>"


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_code_is_highlighted_line_for_line_without_changing_the_text():
    highlight = pygments_highlighter()
    assert highlight is not None  # Pygments comes with the `all` and `dev` extras
    code = 'def f():\n    """a doc\n    string"""\n\n    return 1  # **not bold**'
    text = f"Here:\n```python\n{code}\n```\nafter `x`"
    lines = render_markdown(text, cyan, highlight).split("\n")
    assert lines[:2] == ["Here:", "<dim>── python</>"] and lines[-2:] == ["<dim>──</>", "after <cyan>x</>"]
    body = lines[2:-2]
    assert body[0].startswith(KEYWORD)
    assert [ANSI.sub("", line) for line in body] == code.split("\n")  # the same characters, the same rows
    # A language Pygments does not know, or none: cyan as before.
    assert render_markdown("```nosuchlang\nx = 1\n```", cyan, highlight).split("\n")[1] == "<cyan>x = 1</>"
    assert render_markdown("```\ndef f(): pass\n```", cyan, highlight).split("\n")[1] == "<cyan>def f(): pass</>"
    # A block left open by a reply cut short is highlighted too.
    assert render_markdown("```python\ndef g(): pass", cyan, highlight).split("\n")[1].startswith(KEYWORD)


def test_without_pygments_code_blocks_stay_plain_cyan(monkeypatch):
    monkeypatch.setitem(sys.modules, "pygments", None)  # as if not installed: import fails
    assert pygments_highlighter() is None
    assert render_markdown("```python\ndef f(): pass\n```", cyan, None).split("\n")[1] == "<cyan>def f(): pass</>"


def test_code_blocks_are_highlighted_on_a_terminal_and_plain_in_a_pipe(sessions_dir):
    child = pexpect.spawn(
        sys.executable, [str(ROOT / "main.py"), "--backend", "fake"], cwd=str(ROOT),
        env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(sessions_dir), "TERM": "xterm",
             "PROMPT_TOOLKIT_NO_CPR": "1"},
        encoding="utf-8", timeout=30, dimensions=(40, 200))
    child.expect(PROMPT)
    # Alt-Enter between lines: one message holding a fenced block, which the fake backend echoes.
    for line in ("see:", "```python", "def f(): return 1"):
        child.send(line)
        child.send("\x1b\r")
    child.send("```\r")
    child.expect(re.escape(KEYWORD + "\x1b[37m \x1b[39;49;00m\x1b[32mf\x1b[39;49;00m"))
    child.expect(PROMPT)
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    piped = subprocess.run([sys.executable, str(ROOT / "main.py"), "--backend", "fake"],
                           input='"""\nsee:\n```python\ndef f(): return 1\n```\n"""\n',
                           capture_output=True, text=True, timeout=30)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == "Reply 1: see:\n```python\ndef f(): return 1\n```\n"

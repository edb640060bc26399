"""The documentation's examples run as written.

Every ```python block of README.md and docs/*.md runs in a fresh process, in an empty working
folder, with its own sessions folder ($CONVERSATION_SESSIONS_DIR), and must exit 0. A block that
cannot run here says so on its first line, with the reason: ``# not run: needs a PostgreSQL
server``. Every command line the docs show (``python main.py ...``, ``./scripts/chat ...``,
``conversation-session ...``) uses only flags its ``--help`` lists; the chat's command table
lists exactly the commands its ``help`` prints; links between the pages lead somewhere.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conversation_session import SESSIONS_DIR_ENV
from conversation_session.cli._commands import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"#\s*not run:\s*(\S.*)")
RUN_TIMEOUT_S = 300     # the embedded model loads in seconds; this only stops a hung example


def _blocks(language: str) -> list[tuple[str, str]]:
    """(``page:line``, code) of every fenced block in that language, in page order."""
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if start is None and line.strip() == f"```{language}":
                start = number
            elif start is not None and line.strip() == "```":
                found.append((f"{page.relative_to(ROOT)}:{start}", "\n".join(lines[start:number - 1]) + "\n"))
                start = None
        assert start is None, f"{page.name}:{start}: a ``` block is never closed"
    return found


def _python_params() -> list:
    params = []
    for where, code in _blocks("python"):
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        skip = NOT_RUN.match(first)
        marks = []
        if skip:
            marks.append(pytest.mark.skip(reason=f"{where}: {skip.group(1)}"))
        elif "FakeBackend" not in code:
            marks.append(pytest.mark.model)     # the default backend: the embedded model
        params.append(pytest.param(code, id=where, marks=marks))
    return params


def test_the_docs_have_runnable_examples():
    runnable = [code for _, code in _blocks("python") if not NOT_RUN.match(code.lstrip().splitlines()[0])]
    # The front page's library example, the async and barge-in examples, FakeBackend in tests.
    assert len(runnable) >= 4, runnable


@pytest.mark.parametrize("code", _python_params())
def test_python_example_runs(code: str, tmp_path: Path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "example.py").write_text(code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "CONVERSATION_SESSIONS_STORE"}
    env[SESSIONS_DIR_ENV] = str(tmp_path / "sessions")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "example.py"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert list(work.iterdir()) == [work / "example.py"], "an example wrote into the working folder"


# -- command lines ---------------------------------------------------------------------------
_PROGRAMS = {("python", "main.py"), ("python3", "main.py"), ("./scripts/chat",), ("conversation-session",),
             ("python", "-m", "conversation_session"), ("python", "-m", "conversation_session.service")}
_SUBCOMMANDS = {"serve", "sessions", "models", "doctor"}


def _invocations() -> list[tuple[str, list[str]]]:
    """(``page``, the words after the program) of each command line shown: bash blocks and
    inline spans such as `python main.py --backend ollama`."""
    lines: list[tuple[str, str]] = [(where, line) for where, code in _blocks("bash") for line in code.splitlines()]
    for page in PAGES:
        text = re.sub(r"^```.*?^```$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        lines += [(page.name, span.replace("\n", " ")) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]
    found = []
    for where, line in lines:
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            continue
        for i in range(len(words)):
            for program in _PROGRAMS:
                if tuple(words[i:i + len(program)]) == program:
                    rest = words[i + len(program):]
                    end = next((j for j, w in enumerate(rest) if w in {"|", "&&", ";", "||"}), len(rest))
                    found.append((where, rest[:end] if program[-1] != "conversation_session.service"
                                  else ["serve", *rest[:end]]))
    return found


@functools.cache
def _help(command: tuple[str, ...]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), *command, "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _command_of(words: list[str]) -> tuple[str, ...]:
    for i, word in enumerate(words):
        if word in _SUBCOMMANDS:
            if word == "sessions" and i + 1 < len(words) and not words[i + 1].startswith("-"):
                return (word, words[i + 1])
            return (word,)
    return ()


def test_command_lines_use_flags_that_exist():
    invocations = _invocations()
    assert len(invocations) >= 20, invocations      # the chat, serve and housekeeping lines at least
    unknown = []
    for where, words in invocations:
        command = _command_of(words)
        text = _help(command)
        for word in words:
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", word):
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                    unknown.append(f"{where}: {' '.join(['main.py', *command])} {flag}")
    assert not unknown, "flags the program does not have:\n" + "\n".join(unknown)


# -- the chat's command table ----------------------------------------------------------------
def test_chat_command_table_lists_every_command_of_help():
    text = (ROOT / "docs" / "chat.md").read_text(encoding="utf-8")
    table = [line.split("|")[1] for line in text.splitlines() if line.startswith("| `")]
    listed = {m.lstrip("/").split()[0] for cell in table for m in re.findall(r"`([^`]+)`", cell)}
    expected = {name for c in COMMANDS for name in (c.name, *c.aliases)}
    assert listed == expected, f"missing from docs/chat.md: {expected - listed}; not a command: {listed - expected}"


# -- links -----------------------------------------------------------------------------------
def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_lead_somewhere():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)

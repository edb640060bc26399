"""The chat in a real pseudo-terminal, without the embedded model (``--backend fake``, or the
Ollama-API test server for slow replies): Tab completion, Alt-Enter, notices that do not land
on the spinner or inside a reply, control characters in a streamed reply, the timeout notice."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from conversation_session import HistoryStore
from ollama_api_server import OllamaAPIServer

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "您:"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def spawn(*args: str, sessions_dir: Path) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable, [str(ROOT / "main.py"), *args], cwd=str(ROOT),
        env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(sessions_dir), "TERM": "xterm",
             "PROMPT_TOOLKIT_NO_CPR": "1"},
        encoding="utf-8", timeout=30, dimensions=(40, 200),
    )
    child.expect(PROMPT)
    return child


def quit_(child: pexpect.spawn) -> None:
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_messages_starting_with_command_words_are_sent_on_a_terminal(sessions_dir):
    child = spawn("--backend", "fake", sessions_dir=sessions_dir)
    child.sendline("quit smoking tips please")
    child.expect("Reply 1: quit smoking tips please")
    child.expect(PROMPT)
    child.sendline("help me write a poem")
    child.expect("Reply 2: help me write a poem")
    child.expect(PROMPT)
    quit_(child)


def test_tab_completes_commands_and_alt_enter_adds_a_line(sessions_dir):
    child = spawn("--backend", "fake", sessions_dir=sessions_dir)
    child.send("/his\t")
    child.expect("tory")  # completed in place: "/his" then "tory"
    child.send("\r")
    child.expect(r"0 turn\(s\)")
    child.expect(PROMPT)
    child.send("first line")
    child.send("\x1b\r")  # Alt-Enter: a new line, not "send"
    child.send("second line\r")
    child.expect("Reply 1: first line")
    child.expect(PROMPT)
    quit_(child)
    store = HistoryStore(sessions_dir)
    (info,) = store.list_sessions()
    assert store.load(info.session_id).messages[0]["content"] == "first line\nsecond line"


def test_the_trimming_notice_is_one_line_after_the_reply(sessions_dir):
    child = spawn("--backend", "fake", "--context-length", "60", "--max-tokens", "10", sessions_dir=sessions_dir)
    seen = io.StringIO()
    child.logfile_read = seen
    words = " ".join(["word"] * 15)
    for n in range(1, 5):
        child.sendline(words)
        child.expect(f"Reply {n}: ")
        child.expect(PROMPT)
    quit_(child)
    screen = ANSI.sub("", seen.getvalue())
    notices = re.findall(r"(.*)the oldest \d+ turn\(s\) are left out of what the model sees", screen)
    assert notices and all(line.lstrip(" \r").startswith("ℹ️") for line in notices)  # at the start of a line
    assert "WARNING" not in screen and "left out of the prompt" not in screen  # no raw log line


def test_streamed_control_characters_and_the_timeout_notice(sessions_dir):
    server = OllamaAPIServer(token_delay=0.05).start()
    try:
        child = spawn("--backend", "ollama", "--base-url", server.url, "--timeout", "1.5",
                      sessions_dir=sessions_dir)
        # A bracketed paste brings ESC and BEL into the message; the test server echoes it.
        child.send("\x1b[200~say \x1b]0;pwned\x07 please\x1b[201~")
        child.send("\r")
        child.expect(r"You said: say \\x1b\]0;pwned\\x07 please")
        child.expect(PROMPT)
        child.sendline("tell me something long")
        child.expect(r"timed out after 1\.5 s; the partial reply above was not kept")
        child.expect(PROMPT)
        child.sendline("history")
        child.expect(r"1 turn\(s\), 2 message\(s\)")
        child.expect(PROMPT)
        quit_(child)
    finally:
        server.stop()


def test_export_to_a_terminal_shows_control_characters_and_to_a_pipe_writes_them(sessions_dir):
    from conversation_session import ConversationSession, FakeBackend

    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir) as s:
        s.chat("title \x1b]0;pwned\x07 here")
        sid = s.session_id
    child = pexpect.spawn(sys.executable, [str(ROOT / "main.py"), "sessions", "export", sid, "--format", "md"],
                          env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(sessions_dir)}, encoding="utf-8",
                          timeout=30)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "title \\x1b]0;pwned\\x07 here" in child.before and "\x1b]0" not in child.before
    piped = subprocess.run([sys.executable, str(ROOT / "main.py"), "sessions", "export", sid, "--format", "md"],
                           capture_output=True, text=True, timeout=30)
    assert "title \x1b]0;pwned\x07 here" in piped.stdout  # a pipe gets the content exactly


def test_a_completed_reply_is_rendered_as_markdown_on_a_terminal_and_plain_in_a_pipe(sessions_dir):
    child = spawn("--backend", "fake", sessions_dir=sessions_dir)
    child.sendline("here is **bold** and `code`")  # the fake backend echoes it in its reply
    child.expect("Reply 1: here is \\*\\*bold\\*\\* and `code`")  # streamed as it comes
    child.expect(re.escape("\x1b[J\x1b[36m🤖 \x1b[0mReply 1: here is \x1b[1mbold\x1b[0m and \x1b[36mcode\x1b[0m"))
    child.expect(PROMPT)
    quit_(child)
    plain = spawn("--backend", "fake", "--no-markdown", sessions_dir=sessions_dir)
    plain.sendline("more **bold**")
    plain.expect("Reply 1: more \\*\\*bold\\*\\*")
    plain.expect(PROMPT)
    assert "\x1b[1mbold" not in (plain.before or "")
    quit_(plain)
    piped = subprocess.run([sys.executable, str(ROOT / "main.py"), "--backend", "fake"], input="**bold**\n",
                           capture_output=True, text=True, timeout=30)
    assert piped.stdout == "Reply 1: **bold**\n"


def test_markdown_rendering_rules():
    from conversation_session.cli._markdown import looks_like_markdown, render_markdown, screen_rows

    def tag(text: str, *names: str) -> str:
        return f"<{','.join(names)}>{text}</>"

    text = "# Title\n- one *two*\n```python\nx = 1  # **not bold**\n```\nplain `x` __b__"
    assert render_markdown(text, tag).split("\n") == [
        "<bold>Title</>", "• one <italic>two</>", "<dim>── python</>", "<cyan>x = 1  # **not bold**</>",
        "<dim>──</>", "plain <cyan>x</> <bold>b</>"]
    assert looks_like_markdown(text) and not looks_like_markdown("2 * 3 = 6, and that is all")
    assert screen_rows("🤖 " + "你" * 100, 80) == 3 and screen_rows("a\nb", 80) == 2


def test_a_log_line_from_another_thread_prints_above_the_prompt(sessions_dir):
    """The snapshot is saved by a background thread after the reply; its DEBUG line must not be
    left on the prompt's line: the prompt is drawn again below it."""
    child = spawn("--backend", "fake", "--log-level", "DEBUG", sessions_dir=sessions_dir)
    child.sendline("hello")
    child.expect("Reply 1: hello")
    child.expect(r"saved \S+session_\d+\.json")
    child.expect(PROMPT)  # drawn again after the line
    child.send("typed")
    child.expect("typed")
    child.sendcontrol("u")
    quit_(child)


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_planted_input_history_is_treated_as_absent_and_said_once(sessions_dir, tmp_path, kind):
    """A FIFO planted as ``.input_history`` hung the chat at the first message (opening it for
    writing waits for a reader); a symlink would have written through to its target.  Either is
    now left alone: the history is kept in memory for the run, and that is said once."""
    sessions_dir.mkdir(parents=True)
    planted = sessions_dir / ".input_history"
    target = tmp_path / "elsewhere"
    if kind == "fifo":
        os.mkfifo(planted)
    else:
        target.write_text("")
        planted.symlink_to(target)
    seen = io.StringIO()
    child = pexpect.spawn(
        sys.executable, [str(ROOT / "main.py"), "--backend", "fake"], cwd=str(ROOT),
        env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(sessions_dir), "TERM": "xterm",
             "PROMPT_TOOLKIT_NO_CPR": "1"},
        encoding="utf-8", timeout=15, dimensions=(40, 200))
    child.logfile_read = seen
    child.expect("input history is kept for this run only")
    child.expect(PROMPT)
    for n, text in enumerate(("hello", "again"), start=1):
        child.sendline(text)
        child.expect(f"Reply {n}: {text}")
        child.expect(PROMPT)
    child.send("\x1b[A")  # up arrow: this run's input is still recalled
    child.expect("again")
    child.sendcontrol("u")
    quit_(child)
    assert ANSI.sub("", seen.getvalue()).count("input history is kept for this run only") == 1
    if kind == "fifo":
        assert planted.is_fifo()
    else:
        assert planted.is_symlink() and target.read_text() == ""

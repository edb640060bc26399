"""The terminal app, driven as a user would: through pipes and in a real pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pexpect
import pytest

from conversation_session import HistoryStore

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "您:"  # prompt_toolkit draws the trailing space as a cursor move
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
pytestmark = pytest.mark.model


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    """The user's own config file must not change what these tests see."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def run_app(lines: list[str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The app on piped input: replies (and what commands print) on stdout, notices on stderr."""
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--max-tokens", "8", "--temperature", "0", *args],
        input="".join(line + "\n" for line in lines), capture_output=True, text=True, timeout=timeout,
        cwd=ROOT,
    )


def spawn(*args: str, sessions_dir: Path) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable, [str(ROOT / "main.py"), "--temperature", "0", *args], cwd=str(ROOT),
        # pexpect answers no cursor-position requests; tell prompt_toolkit not to wait for them.
        env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(sessions_dir), "TERM": "xterm",
             "PROMPT_TOOLKIT_NO_CPR": "1"},
        encoding="utf-8", timeout=60, dimensions=(40, 200),
    )
    child.expect(PROMPT)
    return child


def test_pipe_mode_runs_every_seed_command_plainly(sessions_dir):
    proc = run_app(["你好", "history", "stats", "help", "sessions", "\\help", "/history", "clear", "history", "quit"])
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not ANSI.search(out + proc.stderr) and "⠋" not in out + proc.stderr  # no colour, no spinner
    assert "1 turn(s), 2 message(s)" in out and "您: 你好" in out
    assert "📊 KV cache" in out and "context window" in out and "8192 tokens" in out
    assert "Commands (a word alone on its line" in out
    assert "2 turn(s), 4 message(s)" in out  # /history, after `\help` was sent as a message
    assert "🧹 new session" in proc.stderr and "0 turn(s), 0 message(s)" in out
    sessions = HistoryStore(sessions_dir).list_sessions()
    assert len(sessions) == 1 and sessions[0].turns == 2
    messages = [m["content"] for m in HistoryStore(sessions_dir).load(sessions[0].session_id).messages]
    assert messages[0] == "你好" and messages[2] == "help"


def test_end_of_input_exits_cleanly_and_says_where_it_saved(sessions_dir):
    proc = run_app(["hello"])
    assert proc.returncode == 0
    assert "saved 1 turn(s) in" in proc.stderr and "saved" not in proc.stdout


def test_resume_latest_and_by_id_and_the_startup_hint(sessions_dir):
    run_app(["My name is Xiaoming."])
    (sid,) = [s.session_id for s in HistoryStore(sessions_dir).list_sessions()]
    hint = run_app(["quit"])
    assert f"An earlier session exists: {sid}" in hint.stderr and f"/resume {sid}" in hint.stderr
    assert "An earlier session exists" not in run_app(["quit"]).stderr  # once per session, not every start
    latest = run_app(["history", "quit"], "--resume")
    assert f"resumed {sid}: 1 turn(s)" in latest.stderr and "My name is Xiaoming." in latest.stdout
    by_id = run_app(["What is my name?", "quit"], "--resume", sid)
    assert f"resumed {sid}" in by_id.stderr
    assert HistoryStore(sessions_dir).load(sid).turns == 2
    missing = run_app([], "--resume", "session_404")
    assert missing.returncode == 1 and "no saved session session_404" in missing.stderr
    hostile = run_app([], "--resume", "../etc/passwd")
    assert hostile.returncode == 1 and "invalid session id" in hostile.stderr


def test_in_chat_resume_new_delete_and_export(sessions_dir, tmp_path):
    run_app(["first session"])
    (old,) = [s.session_id for s in HistoryStore(sessions_dir).list_sessions()]
    export_md = tmp_path / "out.md"
    proc = run_app(["hello", f"resume {old}", "history", "new", f"/delete {old}", f"export {old} {export_md}",
                    f"/delete {old} --yes", "sessions", "/delete ../x", "/resume session_404"])
    err = proc.stderr
    assert f"resumed {old}: 1 turn(s)" in err
    assert "not confirmed" in err and "add --yes" in err and f"deleted {old}" in err
    assert export_md.read_text().startswith(f"# {old}")
    assert "invalid session id" in err and "no saved session session_404" in err
    assert old not in [s.session_id for s in HistoryStore(sessions_dir).list_sessions()]


def test_a_timeout_prints_one_line_and_the_chat_goes_on(sessions_dir):
    # The first turn has no time limit, so only the second one can time out.
    proc = run_app(["/set timeout 0", "Hi", "/set timeout 0.5", "/set max_tokens 4000",
                    "Write a very long story about a dragon and a knight.", "history"])
    assert proc.returncode == 1  # piped: a failed turn makes the status non-zero
    assert re.search(r"timed out after 0\.5 s; (the partial reply above was not kept; )?the conversation so far "
                     "is kept", proc.stderr)
    history = proc.stdout.split("📜")[-1]
    assert "1 turn(s), 2 message(s)" in history


def test_module_and_console_script_entry_points():
    version = subprocess.run([sys.executable, "-m", "conversation_session", "--version"],
                             capture_output=True, text=True, check=True).stdout
    script = Path(sys.executable).parent / "conversation-session"
    assert script.exists()
    assert subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True).stdout == version
    assert re.match(r"conversation-session \d+\.\d+", version)


# -- a real terminal ------------------------------------------------------------------------

def test_ctrl_c_stops_the_reply_and_does_not_save_it(sessions_dir):
    child = spawn("--max-tokens", "4000", sessions_dir=sessions_dir)
    child.sendline("Write a very long story about a dragon and a knight.")
    child.expect("🤖 ")
    child.expect(r"\w+ \w+ \w+")  # some of the reply has streamed
    child.sendintr()
    child.expect("interrupted: this reply was not saved")
    child.expect(PROMPT)
    child.sendline("history")
    child.expect(r"0 turn\(s\)")
    child.expect(PROMPT)
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    for info in HistoryStore(sessions_dir).list_sessions():
        assert "dragon" not in json.dumps(HistoryStore(sessions_dir).load(info.session_id).messages)


def test_ctrl_c_at_the_prompt_explains_and_a_second_one_quits(sessions_dir):
    child = spawn(sessions_dir=sessions_dir)
    child.sendintr()
    child.expect("Ctrl-C again, Ctrl-D or `quit` to leave")
    child.expect(PROMPT)  # back at the prompt (a person's second press comes after it)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_spinner_streaming_and_arrow_key_history_across_runs(sessions_dir):
    child = spawn("--max-tokens", "8", sessions_dir=sessions_dir)
    child.sendline("hello there")
    child.expect("thinking…")  # the spinner shows until the first token
    child.expect("🤖 ")
    child.expect(PROMPT)
    child.send("\x1b[A")  # Up: the previous input comes back for editing
    child.expect("hello there")
    child.send("\r")
    child.expect("🤖 ")
    child.expect(PROMPT)
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    (info,) = HistoryStore(sessions_dir).list_sessions()
    assert [m["content"] for m in HistoryStore(sessions_dir).load(info.session_id).messages][::2] == [
        "hello there", "hello there"]
    again = spawn("--max-tokens", "8", sessions_dir=sessions_dir)
    again.send("\x1b[A")  # input history is kept across runs
    again.expect("hello there")
    again.sendcontrol("u")
    again.sendline("你好，世界")  # wide characters are echoed and sent intact
    again.expect("🤖 ")
    again.expect(PROMPT)
    again.sendline("quit")
    again.expect(pexpect.EOF)
    contents = [HistoryStore(sessions_dir).load(i.session_id).messages[0]["content"]
                for i in HistoryStore(sessions_dir).list_sessions()]
    assert "你好，世界" in contents


def test_seed_scripts_interactive_test_chat_and_debug_logging(sessions_dir):
    run_app(["my real conversation"])
    (real,) = HistoryStore(sessions_dir).list_sessions()
    demo = subprocess.run([sys.executable, str(ROOT / "test_session.py"), "interactive", "--max-tokens", "8"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          input="My name is Xiaoming.\nWhat is my name?\n")
    assert demo.returncode == 0, demo.stderr
    assert "交互式测试" in demo.stderr
    assert "对话轮次: 2" in demo.stdout and "消息总数: 4" in demo.stdout and "已保存: 是" in demo.stdout
    # A session of its own: the user's latest real session is untouched and stays the latest.
    (after,) = HistoryStore(sessions_dir).list_sessions()
    assert after.session_id == real.session_id and after.turns == 1
    (test_chat,) = HistoryStore(sessions_dir / "interactive-test").list_sessions()
    assert test_chat.turns == 2 and f"会话ID: {test_chat.session_id}" in demo.stdout
    no_pytest = f"""
import runpy, sys
sys.path.insert(0, {str(ROOT)!r})
sys.modules["pytest"] = None  # as after only ./scripts/chat, which installs no test tools
sys.argv = ["test_session.py"]
runpy.run_path({str(ROOT / "test_session.py")!r}, run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", no_pytest], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "./scripts/test" in proc.stderr and "Traceback" not in proc.stderr
    code = """
        from logger_config import setup_logger
        from conversation_session import ConversationSession, FakeBackend
        logger = setup_logger(level="DEBUG")
        with ConversationSession(backend=FakeBackend()) as s:
            s.chat("你好")
            s.save_history()
        with ConversationSession(backend=FakeBackend()) as s:
            s.load_history()
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"DEBUG .*saved .*session_\d+\.json: 2 messages, \d+ bytes in [\d.]+ ms", proc.stderr)
    assert re.search(r"DEBUG .*loaded .*session_\d+\.json: 2 messages, \d+ bytes in [\d.]+ ms", proc.stderr)

"""``/undo``, ``/retry`` and ``/title`` in the chat; ``sessions rename`` and ``sessions search``;
titles in the listings.  Undo and retry are durable: the tests restart the app and look at the
history it resumes, and at the file's ``undone`` list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pexpect
import pytest

from conversation_session import HistoryStore
from conversation_session.cli._commands import completions
from conversation_session.stores._record import SessionRecord

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"
PROMPT = "您:"


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def run(*args: str, input: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(MAIN), *args], input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ))


def lines(*texts: str) -> str:
    return "".join(t + "\n" for t in texts)


def only_session(sessions_dir: Path) -> SessionRecord:
    store = HistoryStore(sessions_dir)
    (info,) = store.list_sessions()
    return store.load(info.session_id)


def test_undo_and_retry_in_a_pipe_survive_a_restart(sessions_dir):
    first = run("--backend", "fake", input=lines("one", "two", "three", "/undo", "retry"))
    assert first.returncode == 0, first.stderr
    assert first.stdout == "Reply 1: one\nReply 2: two\nReply 3: three\nReply 4: two\n"
    assert "withdrew the last turn (three); 2 turn(s) left" in first.stderr
    assert "asking the last message again" in first.stderr
    # The file says so: two turns, the withdrawn ones kept in its undone list, in order.
    record = only_session(sessions_dir)
    assert [m["content"] for m in record.messages] == ["one", "Reply 1: one", "two", "Reply 4: two"]
    assert [[m["content"] for m in u["messages"]] for u in record.undone] == [
        ["three", "Reply 3: three"], ["two", "Reply 2: two"]]  # retry withdraws the whole old turn
    # Restarted: the conversation goes on from what undo and retry left.
    again = run("--backend", "fake", "-c", input=lines("history", "/undo", "/undo", "/undo", "/retry"))
    assert again.returncode == 0, again.stderr
    assert "2 turn(s), 4 message(s)" in again.stdout and "Reply 4: two" in again.stdout
    assert "Reply 3" not in again.stdout
    assert again.stderr.count("withdrew the last turn") == 2
    assert "nothing to undo: this session has no turn yet" in again.stderr
    assert "nothing to retry: this session has no reply yet" in again.stderr
    emptied = HistoryStore(sessions_dir).load(record.session_id)  # listings hide it: no turns left
    assert emptied.messages == [] and len(emptied.undone) == 4


def test_undo_and_retry_on_a_terminal_then_a_restart(sessions_dir):
    def spawn(*args: str) -> pexpect.spawn:
        child = pexpect.spawn(
            sys.executable, [str(MAIN), "--backend", "fake", *args], cwd=str(ROOT),
            env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(sessions_dir), "TERM": "xterm",
                 "PROMPT_TOOLKIT_NO_CPR": "1"},
            encoding="utf-8", timeout=30, dimensions=(40, 200))
        child.expect(PROMPT)
        return child

    child = spawn()
    for n, text in enumerate(("alpha", "beta"), 1):
        child.sendline(text)
        child.expect(f"Reply {n}: {text}")
        child.expect(PROMPT)
    child.send("/ret\t")  # Tab completes the new commands
    child.expect("ry")
    child.send("\r")
    child.expect("Reply 3: beta")
    child.expect(PROMPT)
    child.sendline("/undo")
    child.expect(r"withdrew the last turn \(beta\); 1 turn\(s\) left")
    child.expect(PROMPT)
    child.sendline("/title Greek letters")
    child.expect("title: Greek letters")
    child.expect(PROMPT)
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    child = spawn("-c")
    child.sendline("history")
    child.expect(r"1 turn\(s\), 2 message\(s\)")
    child.expect("title: Greek letters")
    child.expect("Reply 1: alpha")
    child.expect(PROMPT)
    child.sendline("sessions")
    child.expect("Greek letters")
    child.expect(PROMPT)
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    record = only_session(sessions_dir)
    assert record.title == "Greek letters" and [m["content"] for m in record.messages] == ["alpha", "Reply 1: alpha"]
    assert [[m["content"] for m in u["messages"]] for u in record.undone] == [
        ["beta", "Reply 2: beta"], ["beta", "Reply 3: beta"]]


def test_titles_in_listings_rename_and_the_default_first_line(sessions_dir):
    assert run("--backend", "fake", "planning the garden").returncode == 0
    assert run("--backend", "fake", input=lines("a question about taxes", "/title Taxes 2026", "title")
               ).stdout.endswith("title: Taxes 2026\n")
    store = HistoryStore(sessions_dir)
    by_line = {i.first_user_line: i for i in store.list_sessions()}
    garden, taxes = by_line["planning the garden"], by_line["a question about taxes"]
    assert taxes.title == "Taxes 2026" and garden.title is None
    listing = run("sessions", "list").stdout
    assert "TITLE" in listing.splitlines()[0]
    assert "Taxes 2026" in listing and "a question about taxes" not in listing
    assert "planning the garden" in listing  # no title: the first line
    renamed = run("sessions", "rename", garden.session_id, "Garden", "plans")
    assert renamed.returncode == 0 and f"renamed {garden.session_id}: Garden plans" in renamed.stdout
    rows = {r["session_id"]: r for r in json.loads(run("sessions", "list", "--json").stdout)}
    assert rows[garden.session_id]["title"] == "Garden plans"
    chat = run("--backend", "fake", input=lines("sessions", "/search TAXES", "/search durian"))
    assert "Garden plans" in chat.stdout and "Taxes 2026" in chat.stdout
    rows = [line.split() for line in chat.stdout.splitlines() if line.startswith(f"  {taxes.session_id}")]
    hits = [h for h in rows if h[2] == "title" or h[2].startswith("#")]  # not the listing's row (dates there)
    assert len(rows) == len(hits) + 1
    assert [h[2:4] for h in hits] == [["title", "Taxes"], ["#0", "user"], ["#1", "assistant"]]
    assert "no saved session holds 'durian'" in chat.stdout
    assert run("sessions", "rename", garden.session_id, "").stdout.startswith("removed the title")
    assert store.load(garden.session_id).title is None
    missing = run("sessions", "rename", "session_404", "x")
    assert missing.returncode == 1 and "no saved session session_404" in missing.stderr


def test_search_over_a_thousand_sessions(sessions_dir):
    store = HistoryStore(sessions_dir)
    base = time.time()
    for i in range(1000):
        fruit = "apples" if i % 100 == 7 else "pears"
        record = SessionRecord(session_id=f"session_{i:04d}", llm_model="fake",
                               created_at=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(base - 1000 + i)),
                               messages=[{"role": "user", "content": f"note {i}: buy {fruit}"},
                                         {"role": "assistant", "content": f"Noted item {i}."}],
                               title=f"Shopping {i}" if i == 500 else None)
        store.import_record(record)
    assert len(store.newest_first()) == 1000
    proc = run("sessions", "search", "APPLES")
    assert proc.returncode == 0, proc.stderr
    found = sorted(line.split()[0] for line in proc.stdout.splitlines())
    assert found == [f"session_{i:04d}" for i in range(7, 1000, 100)]  # case-insensitive, every one
    assert all("#0 user" in line and "buy apples" in line for line in proc.stdout.splitlines())
    rows = json.loads(run("sessions", "search", "shopping", "--json").stdout)
    assert [(r["session_id"], r["role"], r["snippet"]) for r in rows] == [("session_0500", "title", "Shopping 500")]
    limited = run("sessions", "search", "pears", "--limit", "5")
    assert len(limited.stdout.splitlines()) == 5 and "--limit N shows more" in limited.stderr
    nothing = run("sessions", "search", "durian")
    assert nothing.returncode == 1 and nothing.stdout == "" and "holds 'durian'" in nothing.stderr


def test_tab_completion_knows_the_new_commands():
    names = {text for text, _ in completions("/", lambda: [])}
    assert {"/undo", "/retry", "/title", "/model", "/models"} <= names
    assert completions("und", lambda: []) == [("undo", 3)]
    assert completions("/ti", lambda: []) == [("/title", 3)]
    models = ["llama3.2:1b", "qwen2.5:3b"]
    assert completions("/model q", lambda: [], lambda: models) == [("qwen2.5:3b", 1)]
    assert completions("/model ", lambda: [], lambda: models) == [(m, 0) for m in models]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt install espeak-ng)")
def test_retry_with_speech_on_a_terminal(sessions_dir, tmp_path):
    """With speech on, /retry streams and speaks the new reply (``stream_retry``); typed while
    the first reply is still spoken, it is a barge-in first, as any input is."""
    child = pexpect.spawn(
        sys.executable, [str(MAIN), "--backend", "fake", "--tts", "espeak", "--tts-playback", "silent",
                         "--tts-output-dir", str(tmp_path / "wav")], cwd=str(ROOT),
        env={**os.environ, "CONVERSATION_SESSIONS_DIR": str(sessions_dir), "TERM": "xterm",
             "PROMPT_TOOLKIT_NO_CPR": "1"},
        encoding="utf-8", timeout=30, dimensions=(40, 200))
    child.expect(PROMPT)
    child.sendline("hello there")
    child.expect("Reply 1: hello there")
    child.expect(PROMPT)
    child.sendline("/retry")
    child.expect("Reply 2: hello there")
    child.expect(PROMPT)
    time.sleep(5)  # let it be spoken to the end (about a second of speech): `quit` would cut it
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    record = only_session(sessions_dir)
    assert [m["content"] for m in record.messages] == ["hello there", "Reply 2: hello there"]
    (undone,) = record.undone  # the first turn (all of it, or as far as it was heard), withdrawn
    assert undone["messages"][0]["content"] == "hello there"


def test_every_command_has_exactly_one_handler_in_the_chat():
    from conversation_session.cli._chat import _HANDLERS
    from conversation_session.cli._commands import COMMANDS

    assert {c.name for c in COMMANDS} == set(_HANDLERS)

"""Barge-in in the chat, in a real pseudo-terminal with real espeak-ng speech played in real time
into the silent sink (``--tts-playback silent``; no sound device needed), WAV files written with
``--tts-output-dir`` so the test knows when the audio has started: Ctrl-C or typing while the
reply is spoken keeps what was spoken, marked interrupted; with speech off Ctrl-C during a reply
keeps nothing, as before."""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pexpect
import pytest

from conversation_session import HistoryStore
from ollama_api_server import OllamaAPIServer

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "您:"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
LONG = ("The first sentence is here. The second sentence is a bit longer than the first one. "
        "The third one ends the story.")
INTERRUPTED = re.compile(r"interrupted — kept what was spoken \((\d+)%\)")

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt install espeak-ng)")


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


def speech_args(wav_dir: Path) -> tuple[str, ...]:
    return ("--tts", "espeak", "--tts-playback", "silent", "--tts-output-dir", str(wav_dir))


def wait_for_audio(wav_dir: Path, turn: int, seconds: float) -> None:
    """Wait until the turn's first sentence is playing, then ``seconds`` more."""
    deadline = time.monotonic() + 20
    while not list(wav_dir.glob(f"*_turn{turn:04d}_*.wav")):
        assert time.monotonic() < deadline, "no speech was produced"
        time.sleep(0.02)
    time.sleep(seconds)


def saved(sessions_dir: Path) -> list[dict]:
    store = HistoryStore(sessions_dir)
    (info,) = store.list_sessions()
    return store.load(info.session_id).messages


def quit_(child: pexpect.spawn) -> None:
    child.sendline("quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_while_the_reply_is_spoken_keeps_what_was_spoken(sessions_dir, tmp_path):
    wav = tmp_path / "wav"
    child = spawn("--backend", "fake", *speech_args(wav), sessions_dir=sessions_dir)
    child.sendline(LONG)
    child.expect("Reply 1: The first sentence")
    child.expect(PROMPT)  # the prompt is back while the reply is still being spoken
    wait_for_audio(wav, 1, 1.2)  # about half of the first sentence (~2.7 s of audio)
    child.sendcontrol("c")
    child.expect(INTERRUPTED)
    percent = int(child.match.group(1))
    assert 0 < percent < 60
    child.expect(PROMPT)
    child.sendline("history")
    child.expect(r"🤖: Reply 1: [^\r\n]*⏹ \(interrupted\)")
    child.expect(PROMPT)
    child.sendline("stats")
    child.expect(r"interruptions \(barge-in\) +1; the last reply: \d+% heard, silent [\d.]+ ms after the interrupt")
    child.expect(PROMPT)
    quit_(child)
    user, reply = saved(sessions_dir)
    full = f"Reply 1: {LONG}"
    assert user == {"role": "user", "content": LONG}
    assert reply["interrupted"] is True and reply["role"] == "assistant"
    assert reply["content"] and full.startswith(reply["content"]) and len(reply["content"]) < len(full) / 2
    assert "The second sentence" not in reply["content"]  # never played


def test_typing_while_the_reply_is_spoken_interrupts_it_and_becomes_the_next_message(sessions_dir, tmp_path):
    wav = tmp_path / "wav"
    child = spawn("--backend", "fake", *speech_args(wav), sessions_dir=sessions_dir)
    child.sendline(LONG)
    child.expect(PROMPT)
    wait_for_audio(wav, 1, 3.2)  # into the second sentence
    child.send("wait, what")
    child.expect(INTERRUPTED)  # at the first key, not at Enter
    child.send(" about it?\r")
    child.expect("Reply 2: wait, what about it\\?")
    child.expect(PROMPT)
    wait_for_audio(wav, 2, 3.5)  # a short reply: spoken to its end
    child.sendline("history")
    child.expect(r"2 turn\(s\), 4 message\(s\)")
    child.expect(PROMPT)
    quit_(child)
    messages = saved(sessions_dir)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    first = messages[1]["content"]
    assert messages[1]["interrupted"] is True
    assert first.startswith("Reply 1: The first sentence is here. The second")  # whole first sentence heard
    assert not first.endswith("story.")
    assert messages[2]["content"] == "wait, what about it?"
    assert messages[3] == {"role": "assistant", "content": "Reply 2: wait, what about it?"}  # heard to the end


def test_ctrl_c_while_a_spoken_reply_is_still_being_written(sessions_dir, tmp_path):
    """Speech on: Ctrl-C during generation stops it and keeps what was already spoken."""
    wav = tmp_path / "wav"
    server = OllamaAPIServer(token_delay=0.25).start()
    try:
        child = spawn("--backend", "ollama", "--base-url", server.url, *speech_args(wav),
                      sessions_dir=sessions_dir)
        child.sendline("Hello there. " + " ".join(f"w{i}" for i in range(40)))
        child.expect("You said: Hello there.")
        wait_for_audio(wav, 1, 0.6)
        child.sendcontrol("c")
        child.expect(INTERRUPTED)
        child.expect(PROMPT)
        quit_(child)
        record = server.wait_for_chat_end()
        assert not record.finished and record.words_sent < 30  # the generation was stopped, not waited for
    finally:
        server.stop()
    _user, reply = saved(sessions_dir)
    assert reply["interrupted"] is True and "You said: Hello there.".startswith(reply["content"])


def test_ctrl_c_with_speech_off_keeps_nothing_of_the_reply(sessions_dir):
    server = OllamaAPIServer(token_delay=0.05).start()
    try:
        child = spawn("--backend", "ollama", "--base-url", server.url, sessions_dir=sessions_dir)
        seen = io.StringIO()
        child.logfile_read = seen
        child.sendline("remember this")
        child.expect("You said: remember this")
        child.expect(PROMPT)
        child.sendline("tell me something long")
        child.expect("word5")
        child.sendcontrol("c")
        child.expect("interrupted: this reply was not saved")
        child.expect(PROMPT)
        quit_(child)
    finally:
        server.stop()
    assert "kept what was spoken" not in ANSI.sub("", seen.getvalue())
    assert [m["content"] for m in saved(sessions_dir)][::2] == ["remember this"]
    assert not any(m.get("interrupted") for m in saved(sessions_dir))


def test_sigint_while_a_piped_reply_is_spoken_keeps_what_was_spoken_and_exits_130(sessions_dir, tmp_path):
    import signal
    import subprocess

    wav = tmp_path / "wav"
    child = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "--backend", "fake", *speech_args(wav)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT)
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(LONG + "\n")
    child.stdin.flush()
    expected = f"Reply 1: {LONG}"
    assert child.stdout.read(len(expected)) == expected  # the text is out (its line ends once spoken)
    wait_for_audio(wav, 1, 1.2)
    child.send_signal(signal.SIGINT)
    try:
        _, err = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 130
    match = INTERRUPTED.search(err)
    assert match and 0 < int(match.group(1)) < 60, err
    (_user, reply) = saved(sessions_dir)
    assert reply["interrupted"] is True and f"Reply 1: {LONG}".startswith(reply["content"])

"""Barge-in without speech: interrupt() keeps what reached the user, in order, crash-safely."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conversation_session import AsyncConversationSession, ConversationSession, FakeBackend, HistoryStore


def _saved(sessions_dir, sid):
    return HistoryStore(sessions_dir).load(sid).messages


def test_interrupt_mid_stream_keeps_the_streamed_part_marked_and_in_order(sessions_dir):
    fake = FakeBackend()
    with ConversationSession(backend=fake) as s:
        s.chat("first")
        fake.enqueue(["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "fox."])
        with s.stream("tell me a story") as turn:
            for piece in turn:
                if piece == "time ":
                    turn.interrupt()
            result = turn.result()
        assert result.interrupted and result.response == "Once upon a time "
        assert result.finish_reason == "interrupted" and result.heard_fraction == 1.0  # all it streamed was shown
        assert s.turns == 2
        s.chat("what were you saying?")
        sent = fake.requests[-1].messages
        assert [m["content"] for m in sent] == ["first", "Reply 1: first", "tell me a story", "Once upon a time ",
                                                "what were you saying?"]
        assert all(set(m) == {"role", "content"} for m in sent)  # the marker never reaches the model
        assert s.get_cache_stats()["interruptions"] == 1
        sid = s.session_id
    messages = _saved(sessions_dir, sid)
    assert messages[3] == {"role": "assistant", "content": "Once upon a time ", "interrupted": True}
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    data = json.loads((sessions_dir / f"{sid}.json").read_text())
    assert data["conversation_history"][3]["interrupted"] is True
    assert "interrupted" not in data["conversation_history"][1]


@pytest.mark.parametrize(("heard", "heard_ms", "expected"), [
    ("Once upon", None, "Once upon"),
    (5, None, "Once "),
    ("Once upon a dog", None, "Once upon a "),  # not a prefix: the shared part
])
def test_the_caller_says_what_was_presented(sessions_dir, heard, heard_ms, expected):
    fake = FakeBackend()
    with ConversationSession(backend=fake) as s:
        fake.enqueue(["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "fox."])
        with s.stream("story") as turn:
            for piece in turn:
                if piece == "there ":
                    turn.interrupt(heard, heard_ms=heard_ms)
            result = turn.result()
        assert result.response == expected
        assert s.history[-1] == {"role": "assistant", "content": expected, "interrupted": True}


def test_heard_ms_from_a_remote_device_cuts_at_a_word_and_grows_with_time(sessions_dir):
    reply = ["Once ", "upon ", "a ", "time ", "there ", "was ", "a ", "fox ", "in ", "the ", "woods."]
    kept = []
    for ms in (0, 400, 900, 60_000):
        fake = FakeBackend()
        with ConversationSession(backend=fake) as s:
            fake.enqueue(reply)
            with s.stream("story") as turn:
                for piece in turn:
                    if piece == "woods.":
                        turn.interrupt(heard_ms=ms)
                result = turn.result()
            kept.append(result.response)
    full = "".join(reply)
    assert kept[0] == "" and kept[-1] == full  # nothing played / everything played
    assert all(full.startswith(k) for k in kept)
    assert 0 < len(kept[1]) < len(kept[2]) < len(full)  # more audio, more text
    assert all(k == "" or k == full or full[len(k)] == " " for k in kept)  # cut at a word's end


def test_nothing_heard_keeps_nothing_and_roles_alternate(sessions_dir):
    fake = FakeBackend()
    with ConversationSession(backend=fake) as s:
        s.chat("one")
        fake.enqueue(["a ", "b ", "c "])
        with s.stream("two") as turn:
            for _piece in turn:
                turn.interrupt(heard="")
            result = turn.result()
        assert result.interrupted and result.response == "" and result.turn == 1 and s.turns == 1
        s.chat("three")
        assert [m["role"] for m in fake.requests[-1].messages] == ["user", "assistant", "user"]
        sid = s.session_id
    assert [m["content"] for m in _saved(sessions_dir, sid)][::2] == ["one", "three"]


def test_interrupt_after_completion_changes_nothing(fake):
    with ConversationSession(backend=fake) as s:
        turn = s.stream("hi")
        full = turn.result()
        again = turn.interrupt()
        assert again is full and not full.interrupted
        assert s.history[-1] == {"role": "assistant", "content": full.response}


def test_interrupt_from_another_thread_while_the_model_generates(sessions_dir):
    fake = FakeBackend(piece_delay=0.05)
    with ConversationSession(backend=fake, timeout=None) as s:
        fake.enqueue([f"w{i} " for i in range(100)])
        turn = s.stream("long")
        got: list[str] = []

        def consume():
            got.extend(turn)

        t = threading.Thread(target=consume)
        t.start()
        while len(got) < 4:
            time.sleep(0.01)
        turn.interrupt()
        t.join(5)
        result = turn.result()
        assert result.interrupted and result.response == "".join(got) and len(got) < 20
        assert fake.requests[-1].cancel.cancelled  # the generation itself stopped


def test_async_interrupt(sessions_dir):
    async def main():
        fake = FakeBackend(piece_delay=0.01)
        async with AsyncConversationSession(backend=fake) as s:
            fake.enqueue(["Hello ", "there, ", "how ", "are ", "you?"])
            async with s.stream("hi") as turn:
                async for piece in turn:
                    if piece == "how ":
                        await turn.interrupt()
                result = await turn.result()
            assert result.interrupted and result.response == "Hello there, how "
            r2 = await s.chat("next")
            assert [m["content"] for m in fake.requests[-1].messages][1] == "Hello there, how "
            return s.session_id, r2

    sid, r2 = asyncio.run(main())
    assert r2.turn == 2
    assert _saved(sessions_dir, sid)[1]["interrupted"] is True


KILL_SCRIPT = """
import sys, time
from conversation_session import ConversationSession, FakeBackend
fake = FakeBackend()
s = ConversationSession(backend=fake)
fake.enqueue(["one ", "two ", "three ", "four "])
with s.stream("count") as turn:
    for piece in turn:
        if piece == "two ":
            turn.interrupt()
    turn.result()
print(s.session_id, flush=True)
time.sleep(60)
"""


def test_the_interrupted_turn_survives_kill_9_right_after(sessions_dir):
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ})
    assert proc.stdout is not None
    sid = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    messages = _saved(sessions_dir, sid)
    assert messages == [{"role": "user", "content": "count"},
                        {"role": "assistant", "content": "one two ", "interrupted": True}]

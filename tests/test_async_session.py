"""The asyncio session: same behaviour as the sync one, awaited, and many sessions per process."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time

import pytest

from conversation_session import (
    AsyncConversationSession,
    ConversationSession,
    FakeBackend,
    HistoryStore,
    SessionError,
    SessionLockedError,
    SessionTimeoutError,
)


def run(coro):
    return asyncio.run(coro)


def test_chat_stream_and_resume(sessions_dir):
    async def main():
        fake = FakeBackend()
        async with AsyncConversationSession(backend=fake) as s:
            r1 = await s.chat("我叫小明")
            assert r1.saved and r1.turn == 1 and r1.response == "Reply 1: 我叫小明"
            pieces = []
            async with s.stream("我叫什么名字？") as turn:
                async for piece in turn:
                    pieces.append(piece)
                result = await turn.result()
            assert "".join(pieces) == result.response and result.turn == 2
            sid = s.session_id
        async with AsyncConversationSession(backend=FakeBackend()) as again:
            assert await again.load_history() is True
            assert again.session_id == sid and again.turns == 2
        return sid

    sid = run(main())
    assert HistoryStore(sessions_dir).load(sid).turns == 2


def test_task_cancel_mid_stream_keeps_only_completed_turns(sessions_dir):
    fake = FakeBackend(piece_delay=0.05)

    async def main():
        async with AsyncConversationSession(backend=fake, timeout=None) as s:
            await s.chat("first")
            fake.enqueue([f"w{i} " for i in range(100)])
            seen = []
            task = asyncio.create_task(s.chat("long one", on_token=seen.append))
            while len(seen) < 3:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert s.turns == 1
            result = await s.chat("after")
            assert result.turn == 2
            sent = [m["content"] for m in fake.requests[-1].messages]
            assert sent == ["first", "Reply 1: first", "after"]
            return s.session_id

    sid = run(main())
    # The backend was told to stop (it stops within one piece), and the file has no trace of it.
    assert fake.requests[1].cancel.cancelled
    texts = [m["content"] for m in HistoryStore(sessions_dir).load(sid).messages]
    assert "long one" not in texts and len(texts) == 4


def test_asyncio_timeout_around_chat_and_the_sessions_own_timeout(sessions_dir):
    fake = FakeBackend(piece_delay=0.05)

    async def main():
        async with AsyncConversationSession(backend=fake, timeout=0.4) as s:
            await s.chat("one")
            fake.enqueue([f"w{i} " for i in range(100)])
            with pytest.raises(SessionTimeoutError) as info:
                await s.chat("too long")
            assert info.value.partial_response.startswith("w0 ")
            fake.enqueue([f"x{i} " for i in range(100)])
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(s.chat("cut by the caller"), 0.2)
            assert s.turns == 1
            assert (await s.chat("two")).turn == 2
            return s.session_id

    sid = run(main())
    assert HistoryStore(sessions_dir).load(sid).turns == 2


def test_two_hundred_concurrent_sessions_interleave_and_each_file_is_exact(sessions_dir):
    fake = FakeBackend(piece_delay=0.001)  # one backend object shared by every session

    async def one(i: int) -> tuple[str, list[str]]:
        async with AsyncConversationSession(backend=fake, timeout=30) as s:
            sent = []
            for t in range(3):
                text = f"s{i} t{t}"
                sent.append(text)
                r = await s.chat(text)
                assert r.turn == t + 1 and r.response.endswith(text)
            return s.session_id, sent

    async def main():
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = run(main())
    store = HistoryStore(sessions_dir)
    assert len({sid for sid, _ in results}) == 200
    for sid, sent in results:
        messages = store.load(sid).messages
        assert [m["content"] for m in messages[::2]] == sent
        assert all(m["content"].endswith(u) for m, u in zip(messages[1::2], sent, strict=True))
    # Requests interleaved: the first 200 requests are the 200 sessions' first turns.
    firsts = {r.messages[-1]["content"] for r in fake.requests[:200]}
    assert firsts == {f"s{i} t0" for i in range(200)}


def test_the_event_loop_never_stalls_during_turns_and_saves(sessions_dir, monkeypatch):
    # A few voice sessions talking at once, paced like a model streaming; every turn is
    # journaled and snapshotted, and each session saves at the end.  A lag probe ticks every
    # 5 ms beside them.  What the loop thread itself spends in a tick (its CPU time) must stay
    # under 20 ms; wall-clock lag also includes the OS scheduling the process out on a busy
    # machine, which no code can prevent, so that bound is looser.  And the slow part of a save,
    # fsync, never runs on the loop's thread.
    import os as _os

    fake = FakeBackend(piece_delay=0.01)
    loop_thread = threading.get_ident()
    fsyncs_on_loop: list[int] = []
    real_fsync = _os.fsync

    def watched_fsync(fd: int) -> None:
        if threading.get_ident() == loop_thread:
            fsyncs_on_loop.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(_os, "fsync", watched_fsync)

    async def probe(stop: asyncio.Event, lags: list[tuple[float, float]]):
        while not stop.is_set():
            t0, c0 = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.005)
            lags.append((time.perf_counter() - t0 - 0.005, time.thread_time() - c0))

    async def talker(i: int):
        async with AsyncConversationSession(backend=fake) as s:
            for t in range(40):
                await s.chat(f"session {i} turn {t} " + "words " * 50)
            await s.save_history()

    async def main():
        stop, lags = asyncio.Event(), []
        p = asyncio.create_task(probe(stop, lags))
        await asyncio.gather(*(talker(i) for i in range(4)))
        stop.set()
        await p
        return lags

    lags = run(main())
    assert len(lags) > 40
    worst_cpu = max(cpu for _, cpu in lags)
    worst_wall = max(wall for wall, _ in lags)
    assert worst_cpu < 0.020, f"the loop thread worked {worst_cpu * 1000:.1f} ms in one tick"
    assert worst_wall < 1.0, f"the loop stalled for {worst_wall * 1000:.1f} ms"
    assert fsyncs_on_loop == [], "a save fsynced on the event loop's thread"


def test_a_shared_backend_survives_each_sessions_close(sessions_dir):
    fake = FakeBackend()
    with ConversationSession(backend=fake) as a:
        a.chat("a1")
    closed = []
    fake.close = lambda: closed.append(True)  # type: ignore[method-assign]
    with ConversationSession(backend=fake) as b:
        assert b.chat("b1").turn == 1
    assert closed == []  # a backend passed in stays the caller's


def test_a_dropped_session_releases_its_lock_after_garbage_collection(sessions_dir):
    s = ConversationSession(backend=FakeBackend())
    s.chat("hello")
    sid = s.session_id
    with pytest.raises(SessionLockedError):
        HistoryStore(sessions_dir).open(sid)
    del s
    gc.collect()
    writer, record = HistoryStore(sessions_dir).open(sid)
    try:
        assert record.turns == 1
    finally:
        writer.close()


def test_thread_count_stays_bounded_with_many_sessions(sessions_dir):
    fake = FakeBackend()
    before = threading.active_count()
    sessions = [ConversationSession(backend=fake) for _ in range(50)]
    try:
        for s in sessions:
            s.chat("hi")
        for s in sessions:
            s.chat("again")
        assert threading.active_count() - before <= 12
    finally:
        for s in sessions:
            s.close()


def test_calls_from_inside_on_token_get_a_clear_error(sessions_dir):
    fake = FakeBackend()
    errors: list[BaseException] = []
    with ConversationSession(backend=fake) as s:
        def nested(_piece: str) -> None:
            for call in (lambda: s.chat("nested"), s.clear_history, s.close):
                try:
                    call()
                except SessionError as exc:
                    errors.append(exc)

        fake.enqueue(["one piece"])
        result = s.chat("outer", on_token=nested)
        assert result.turn == 1 and s.turns == 1
        sid = s.session_id
    assert len(errors) == 3 and all("on_token" in str(e) for e in errors)
    assert HistoryStore(sessions_dir).load(sid).turns == 1


def test_every_method_after_close_raises(fake, sessions_dir):
    s = ConversationSession(backend=fake)
    s.chat("hi")
    s.close()
    for call in (lambda: s.load_history(), lambda: s.chat("x"), s.clear_history, s.save_history):
        with pytest.raises(SessionError, match="closed"):
            call()
    s.close()
    # load_history after close did not open (and lock) another session.
    assert not HistoryStore(sessions_dir).is_locked(s.session_id)


def test_turn_object_cancel_and_on_done(fake, sessions_dir):
    with ConversationSession(backend=fake) as s:
        done = []
        turn = s.stream("hello")
        turn.on_done(done.append)
        text = "".join(turn)
        result = turn.result()
        assert done == [result] and text == result.response
        fake.enqueue(["a ", "b ", "c "])
        with s.stream("to cancel") as turn2:
            for piece in turn2:
                turn2.cancel()
                assert piece == "a "
        with pytest.raises(SessionError, match="cancelled"):
            turn2.result()
        assert s.turns == 1
        assert s.chat("next").turn == 2
        sid = s.session_id
    data = json.loads((sessions_dir / f"{sid}.json").read_text())
    assert [m["content"] for m in data["conversation_history"]][::2] == ["hello", "next"]


def test_empty_message_sends_nothing_and_raises_nothing(fake):
    with ConversationSession(backend=fake) as s:
        result = s.chat("   ")
        assert result.response == "" and result.turn == 0 and result.finish_reason == "empty"
        assert fake.requests == [] and s.turns == 0

    async def main():
        async with AsyncConversationSession(backend=fake) as a:
            r = await a.chat("")
            assert r.turn == 0 and fake.requests == []

    run(main())


def test_the_readme_asyncio_example_runs(tmp_path, sessions_dir):
    """The README's asyncio example, extracted and run as a user would."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "docs" / "library.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Asyncio and many sessions per process"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    # As a user runs it: in a folder of their own, without the tests' sessions folder.
    env = {k: v for k, v in os.environ.items() if k not in ("CONVERSATION_SESSIONS_DIR", "CONVERSATION_SESSIONS_STORE")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "Reply 1: 我叫小明" in out.stdout
    # The test backend's sessions never land in the user's ./sessions (where `-c` would find them).
    assert not (tmp_path / "sessions").exists() and not sessions_dir.exists()

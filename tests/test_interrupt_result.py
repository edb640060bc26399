"""interrupt() completes the turn before it returns, and returns its result (issue 20).

Whoever streams the turn (this thread, suspended between pieces; another thread or task, right
now), inside or outside ``with``: the interrupted reply is committed and journaled when
``interrupt()`` returns, ``result()`` returns the same result, and the session can be closed at
once.  A real child process killed with SIGKILL right after proves the journal has it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from conversation_session import (
    AsyncConversationSession,
    ChatResult,
    ConversationSession,
    FakeBackend,
    SessionError,
    Turn,
)

STORY = [f"w{i} " for i in range(40)]
LONG = [f"w{i} " for i in range(300)]  # streamed with a delay: far longer than any test waits


def _reload(sessions_dir, sid):
    """The session as a new process would see it: a fresh session, load_history()."""
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir) as again:
        assert again.load_history(sid)
        return again.history


def _check_interrupted(result, pieces):
    assert isinstance(result, ChatResult)
    assert result.interrupted and result.finish_reason == "interrupted"
    assert result.response == "".join(pieces) and result.saved


# -- sync, the generator suspended in the caller's thread ------------------------------------

def test_sync_without_with_a_few_pieces_then_interrupt(sessions_dir):
    fake = FakeBackend()
    fake.enqueue(STORY)
    s = ConversationSession(backend=fake)
    turn = s.stream("Tell me a story.")
    it = iter(turn)
    pieces = [next(it) for _ in range(4)]
    result = turn.interrupt()
    _check_interrupted(result, pieces)
    assert turn.result() is result
    assert s.history[-1] == {"role": "assistant", "content": "".join(pieces), "interrupted": True}
    assert fake.requests[-1].cancel.cancelled  # the generation itself stopped
    assert list(it) == []  # the loop, if resumed, ends quietly
    sid = s.session_id
    s.close()  # at once: no turn is running any more
    assert _reload(sessions_dir, sid)[-1] == {"role": "assistant", "content": "".join(pieces), "interrupted": True}


def test_sync_with_block_interrupt_after_leaving_the_loop(sessions_dir):
    fake = FakeBackend()
    fake.enqueue(STORY)
    with ConversationSession(backend=fake) as s:
        pieces = []
        with s.stream("Tell me a story.") as turn:
            for piece in turn:
                pieces.append(piece)
                if len(pieces) == 3:
                    break  # a VAD fired: leave the loop, then barge in
            result = turn.interrupt()
            _check_interrupted(result, pieces)
        assert turn.result() is result
        assert s.turns == 1 and s.history[-1]["interrupted"] is True
        assert s.chat("what were you saying?").turn == 2
        sid = s.session_id
    history = _reload(sessions_dir, sid)
    assert [m["content"] for m in history] == ["Tell me a story.", "".join(pieces), "what were you saying?",
                                               "Reply 2: what were you saying?"]


def test_sync_interrupt_from_on_token_returns_the_committed_result(sessions_dir):
    fake = FakeBackend()
    fake.enqueue(STORY)
    got: list[ChatResult] = []
    with ConversationSession(backend=fake) as s:
        def on_token(piece: str) -> None:
            if piece == "w2 ":
                got.append(turn.interrupt())

        turn = s.stream("story", on_token=on_token)
        yielded = list(turn)
        assert len(got) == 1
        _check_interrupted(got[0], ["w0 ", "w1 ", "w2 "])
        assert turn.result() is got[0] and yielded == ["w0 ", "w1 "]  # nothing after the interrupt
        assert s.history[-1] == {"role": "assistant", "content": "w0 w1 w2 ", "interrupted": True}


# -- sync, another thread streams the turn -------------------------------------------------

def test_sync_interrupt_from_another_thread_while_it_is_inside_a_step(sessions_dir):
    fake = FakeBackend(piece_delay=0.05)  # the consumer waits inside next() most of the time
    fake.enqueue(LONG)
    with ConversationSession(backend=fake, timeout=None) as s:
        turn = s.stream("long")
        got: list[str] = []
        four = threading.Event()

        def consume() -> None:
            for piece in turn:
                got.append(piece)
                if len(got) == 4:
                    four.set()

        t = threading.Thread(target=consume)
        t.start()
        assert four.wait(10)
        result = turn.interrupt()
        t.join(10)
        assert not t.is_alive()
        _check_interrupted(result, got)  # the consumer got no piece beyond the committed reply
        assert turn.result() is result and len(got) < len(LONG)
        s.close()  # the session is free: no wait, no error


def test_sync_interrupt_from_another_thread_between_its_pieces(sessions_dir):
    fake = FakeBackend()
    fake.enqueue(STORY)
    with ConversationSession(backend=fake) as s:
        turn = s.stream("long")
        got: list[str] = []
        paused, go_on = threading.Event(), threading.Event()
        leftover: list[str] = []

        def consume() -> None:
            it = iter(turn)
            for _ in range(3):
                got.append(next(it))
            paused.set()
            go_on.wait(10)  # busy with the piece (the generator is suspended here)
            leftover.extend(it)

        t = threading.Thread(target=consume)
        t.start()
        assert paused.wait(10)
        result = turn.interrupt()  # closes the suspended generator from this thread
        _check_interrupted(result, got)
        go_on.set()
        t.join(10)
        assert leftover == [] and turn.result() is result


def test_sync_interrupt_waits_boundedly_for_a_step_that_does_not_end(sessions_dir, monkeypatch):
    # The module that defines Turn, wherever it lives: a short bound keeps the test quick.
    monkeypatch.setattr(sys.modules[Turn.__module__], "_INTERRUPT_WAIT_S", 0.3)
    fake = FakeBackend()
    fake.enqueue(STORY)
    stuck, release = threading.Event(), threading.Event()

    def on_token(piece: str) -> None:
        if piece == "w3 ":
            stuck.set()
            release.wait(10)  # an on_token that blocks: the step does not end

    with ConversationSession(backend=fake) as s:
        turn = s.stream("long", on_token=on_token)
        t = threading.Thread(target=lambda: list(turn))
        t.start()
        assert stuck.wait(10)
        result = turn.interrupt()  # committed from here once the bounded wait is over
        _check_interrupted(result, ["w0 ", "w1 ", "w2 ", "w3 "])
        release.set()
        t.join(10)
        assert not t.is_alive() and turn.result() is result
        assert s.history[-1]["content"] == "w0 w1 w2 w3 "


# -- the error about on_token is said only from on_token ----------------------------------

def test_close_right_after_leaving_a_turn_open_is_not_an_on_token_error(sessions_dir):
    fake = FakeBackend()
    fake.enqueue(STORY)
    s = ConversationSession(backend=fake)
    s.chat("first")
    fake.enqueue(STORY)
    turn = s.stream("left open")
    next(iter(turn))
    s.close()  # ends the open turn as its with block would (nothing of it kept)
    with pytest.raises(SessionError, match="cancelled"):
        turn.result()
    assert _reload(sessions_dir, s.session_id)[-1]["content"] == "".join(STORY)


def test_the_next_turn_from_the_thread_that_left_one_open_ends_it(sessions_dir):
    fake = FakeBackend()
    with ConversationSession(backend=fake) as s:
        fake.enqueue(STORY)
        turn = s.stream("left open")
        it = iter(turn)
        next(it)
        assert s.chat("next").response == "Reply 2: next"  # no error, no wait for ourselves
        with pytest.raises(SessionError, match="cancelled"):
            turn.result()
        assert list(it) == [] and [m["content"] for m in s.history] == ["next", "Reply 2: next"]


def test_a_real_on_token_still_gets_the_on_token_error(sessions_dir):
    fake = FakeBackend()
    errors: list[str] = []
    with ConversationSession(backend=fake) as s:
        def on_token(_piece: str) -> None:
            try:
                s.close()
            except SessionError as exc:
                errors.append(str(exc))

        fake.enqueue(["one ", "two"])
        assert s.chat("hi", on_token=on_token).response == "one two"
    assert len(errors) == 2 and all("from inside on_token" in e for e in errors)


# -- async ---------------------------------------------------------------------------------

def test_async_without_with_a_few_pieces_then_interrupt(sessions_dir):
    async def main():
        fake = FakeBackend()
        fake.enqueue(STORY)
        s = AsyncConversationSession(backend=fake)
        turn = s.stream("Tell me a story.")
        it = turn.__aiter__()
        pieces = [await it.__anext__() for _ in range(4)]
        result = await turn.interrupt()
        _check_interrupted(result, pieces)
        assert await turn.result() is result
        assert s.history[-1] == {"role": "assistant", "content": "".join(pieces), "interrupted": True}
        await s.aclose()  # at once
        return s.session_id, pieces

    sid, pieces = asyncio.run(main())
    assert _reload(sessions_dir, sid)[-1] == {"role": "assistant", "content": "".join(pieces), "interrupted": True}


def test_async_with_block_interrupt_after_leaving_the_loop(sessions_dir):
    async def main():
        fake = FakeBackend()
        fake.enqueue(STORY)
        async with AsyncConversationSession(backend=fake) as s:
            pieces: list[str] = []
            async with s.stream("Tell me a story.") as turn:
                async for piece in turn:
                    pieces.append(piece)
                    if len(pieces) == 3:
                        break
                result = await turn.interrupt()
                _check_interrupted(result, pieces)
            assert await turn.result() is result
            assert (await s.chat("and then?")).turn == 2
            return s.session_id, pieces

    sid, pieces = asyncio.run(main())
    assert [m["content"] for m in _reload(sessions_dir, sid)][:2] == ["Tell me a story.", "".join(pieces)]


def test_async_interrupt_from_another_task_while_one_streams(sessions_dir):
    async def main():
        fake = FakeBackend(piece_delay=0.02)
        fake.enqueue(LONG)
        async with AsyncConversationSession(backend=fake, timeout=None) as s:
            turn = s.stream("long")
            got: list[str] = []
            four = asyncio.Event()

            async def consume() -> None:
                async with turn:
                    async for piece in turn:
                        got.append(piece)
                        if len(got) == 4:
                            four.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(four.wait(), 10)
            result = await turn.interrupt()
            await asyncio.wait_for(task, 10)
            _check_interrupted(result, got)
            assert await turn.result() is result and len(got) < len(LONG)
        return s.session_id, got

    sid, got = asyncio.run(main())
    assert _reload(sessions_dir, sid)[-1] == {"role": "assistant", "content": "".join(got), "interrupted": True}


def test_sync_interrupt_from_another_thread_while_an_async_task_streams(sessions_dir):
    """A VAD callback in its own thread, the turn streamed by the event loop."""
    async def main():
        fake = FakeBackend(piece_delay=0.02)
        fake.enqueue(LONG)
        async with AsyncConversationSession(backend=fake, timeout=None) as s:
            loop = asyncio.get_running_loop()
            got: list[str] = []
            from_vad: list[ChatResult] = []

            def vad() -> None:
                from_vad.append(asyncio.run_coroutine_threadsafe(turn.interrupt(), loop).result(10))

            vad_thread = threading.Thread(target=vad)
            async with s.stream("long") as turn:
                async for piece in turn:
                    got.append(piece)
                    if len(got) == 4:
                        vad_thread.start()
                result = await turn.result()
            await asyncio.to_thread(vad_thread.join, 10)
            _check_interrupted(result, got)
            assert from_vad == [result]
            return s.session_id

    sid = asyncio.run(main())
    assert _reload(sessions_dir, sid)[-1]["interrupted"] is True


# -- kill -9 right after interrupt() returned ------------------------------------------------

CHILD = """
import asyncio, json, sys, threading, time
from conversation_session import AsyncConversationSession, ConversationSession, FakeBackend

mode = sys.argv[1]
fake = FakeBackend(piece_delay=0.02)
fake.enqueue([f"w{i} " for i in range(200)])

def report(sid, result):
    print("INTERRUPTED", sid, json.dumps(result.response), flush=True)
    time.sleep(120)  # the test kills us here: nothing after interrupt() may be needed

if mode == "sync":
    s = ConversationSession(backend=fake, timeout=None)
    turn = s.stream("Tell me a story.")
    it = iter(turn)
    for _ in range(4):
        next(it)
    report(s.session_id, turn.interrupt())
elif mode == "thread":
    s = ConversationSession(backend=fake, timeout=None)
    turn = s.stream("Tell me a story.")
    got = []
    consumer = threading.Thread(target=lambda: got.extend(turn), daemon=True)
    consumer.start()
    while len(got) < 4:
        time.sleep(0.005)
    report(s.session_id, turn.interrupt())
else:
    async def main():
        s = AsyncConversationSession(backend=fake, timeout=None)
        turn = s.stream("Tell me a story.")
        it = turn.__aiter__()
        for _ in range(4):
            await it.__anext__()
        report(s.session_id, await turn.interrupt())
    asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["sync", "thread", "async"])
def test_the_interrupted_turn_survives_kill_9_right_after_interrupt_returns(sessions_dir, mode):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("INTERRUPTED "), (line, proc.stderr.read() if proc.poll() is not None else "")
        _, sid, response = line.strip().split(" ", 2)
        response = json.loads(response)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert response.startswith("w0 w1 w2 w3 ")
    assert _reload(sessions_dir, sid) == [{"role": "user", "content": "Tell me a story."},
                                          {"role": "assistant", "content": response, "interrupted": True}]


def test_interrupt_after_a_timeout_raises_what_result_raises(sessions_dir):
    fake = FakeBackend(piece_delay=0.2)
    fake.enqueue(STORY)
    with ConversationSession(backend=fake, timeout=0.3) as s:
        turn = s.stream("slow")
        with pytest.raises(SessionError, match="timeout"):
            list(turn)
        with pytest.raises(SessionError, match="timeout"):
            turn.interrupt()  # the turn ended without a result: said as result() says it
        assert s.turns == 0


def test_async_interrupt_before_the_turn_started_keeps_nothing_and_frees_the_session(sessions_dir):
    async def main():
        async with AsyncConversationSession(backend=FakeBackend()) as s:
            turn = s.stream("never streamed")
            result = await turn.interrupt()
            assert result.interrupted and result.response == "" and not result.saved and s.turns == 0
            assert await turn.result() is result
            assert (await s.chat("next")).turn == 1

    asyncio.run(main())


def test_result_after_leaving_the_loop_finishes_the_reply(sessions_dir):
    fake = FakeBackend()
    fake.enqueue(STORY)
    with ConversationSession(backend=fake) as s:
        turn = s.stream("story")
        for _piece in turn:
            break
        assert turn.result().response == "".join(STORY) and not turn.result().interrupted


def test_async_result_after_leaving_the_loop_finishes_the_reply(sessions_dir):
    async def main():
        fake = FakeBackend()
        fake.enqueue(STORY)
        async with AsyncConversationSession(backend=fake) as s, s.stream("story") as turn:
            async for _piece in turn:
                break
            return await turn.result()

    assert asyncio.run(main()).response == "".join(STORY)

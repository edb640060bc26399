"""The session on the PostgreSQL store: store=URL for the sync and async API, resume across
"hosts" (two store objects), the single-writer lease, and memory summaries kept in the database."""

from __future__ import annotations

import asyncio

import pytest

import pg_server as _pg
from conversation_session import (
    AsyncConversationSession,
    ConversationSession,
    FakeBackend,
    SessionLockedError,
    StoreUnavailableError,
)
from conversation_session.stores._postgres import PostgresStore
from test_memory_summary import Summarizer

pg_server = _pg.pg_server
pg_url = _pg.pg_url


def test_store_url_round_trip_and_resume_elsewhere(pg_url, sessions_dir):
    with ConversationSession(backend=FakeBackend(), store=pg_url, system_prompt="你是助手") as s:
        assert s.chat("我叫小明").saved
        assert s.chat("我喜欢 Python").saved
        sid = s.session_id
        assert s.get_history_summary()["store"].startswith("postgresql://")
        # Another host opening the same session while it is open: refused, naming the holder.
        with ConversationSession(backend=FakeBackend(), store=pg_url) as other, pytest.raises(SessionLockedError):
            other.load_history(sid)
    assert not list(sessions_dir.glob("session_*"))  # nothing went to the folder
    fake = FakeBackend()
    with ConversationSession(backend=fake, store=pg_url) as again:
        assert again.load_history(sid) and again.turns == 2
        assert again.system_prompt == "你是助手"  # the persona came back with the session
        again.chat("我叫什么？")
        sent = [m["content"] for m in fake.requests[-1].messages]
        assert sent[0] == "你是助手" and sent[1] == "我叫小明" and sent[-1] == "我叫什么？"
    assert PostgresStore.from_url(pg_url).load(sid).turns == 3


def test_async_session_on_postgres(pg_url):
    async def main():
        async with AsyncConversationSession(backend=FakeBackend(piece_delay=0.001), store=pg_url) as s:
            for i in range(3):
                assert (await s.chat(f"turn {i}")).saved
            sid = s.session_id
        async with AsyncConversationSession(backend=FakeBackend(), store=pg_url) as again:
            assert await again.load_history() is True
            assert again.session_id == sid and again.turns == 3

    asyncio.run(main())


def test_summary_memory_is_kept_in_postgres(pg_url):
    fake, summarizer = FakeBackend(context_length=400), Summarizer()
    with ConversationSession(backend=fake, summarizer=summarizer, memory="summary", max_tokens=10,
                             store=pg_url) as s:
        for i in range(120):
            s.chat(f"fact {i} is {i * 7}")
            s._core.policy.wait_idle(5)
            if s._core.policy.compactions:
                break
        s.chat("one more")
        text, sid = s.get_history_summary()["summary"], s.session_id
    assert text and "fact 0 is 0" in text
    with ConversationSession(backend=FakeBackend(context_length=400), memory="summary", max_tokens=10,
                             summarizer=summarizer, store=pg_url) as again:
        calls = summarizer.calls
        assert again.load_history(sid)
        assert again.get_history_summary()["summary"] == text and summarizer.calls == calls


def test_a_database_that_is_down_is_a_clear_error():
    with pytest.raises(StoreUnavailableError) as info:
        ConversationSession(backend=FakeBackend(), store="postgresql://app:secret@127.0.0.1:9/nowhere")
    message = str(info.value)
    assert "127.0.0.1:9" in message and "secret" not in message

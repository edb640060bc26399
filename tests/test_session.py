"""Session logic on the deterministic fake backend: fast, exact, no model needed."""

from __future__ import annotations

import itertools
import json
import threading

import pytest

from conversation_session import (
    BackendError,
    ConversationSession,
    FakeBackend,
    HistoryStore,
    SessionError,
    SessionTimeoutError,
)


def test_each_completed_turn_is_on_disk_when_chat_returns(fake, sessions_dir):
    with ConversationSession(backend=fake) as s:
        r1 = s.chat("我叫小明")
        assert r1.saved and r1.turn == 1 and r1.response == "Reply 1: 我叫小明"
        assert HistoryStore(sessions_dir).load(s.session_id).turns == 1
        r2 = s.chat("我叫什么名字？")
        assert r2.turn == 2
        assert HistoryStore(sessions_dir).load(s.session_id).turns == 2
        # The model saw the whole kept history, and the first turn came from the cache.
        sent = fake.requests[-1].messages
        assert [m["content"] for m in sent] == ["我叫小明", "Reply 1: 我叫小明", "我叫什么名字？"]
        assert r2.cached_tokens and r2.cached_tokens > 0
        s._writer.flush()
        data = json.loads((sessions_dir / f"{s.session_id}.json").read_text(encoding="utf-8"))
        assert data["turns"] == 2


def test_seed_summary_fields(fake):
    with ConversationSession(backend=fake) as s:
        before = s.get_history_summary()
        assert before["turns"] == 0 and before["has_history_file"] is False
        s.chat("你好")
        s.chat("现在几点？")
        summary = s.get_history_summary()
    assert summary["session_id"] == s.session_id
    assert summary["turns"] == 2 and summary["total_messages"] == 4
    assert summary["has_history_file"] is True
    assert summary["llm_model"] == "fake-model"
    assert summary["path"].endswith(f"{s.session_id}.json")
    assert summary["created_at"]


def test_on_token_streams_each_piece(fake):
    fake.enqueue(["你", "好", "！"])
    pieces: list[str] = []
    with ConversationSession(backend=fake) as s:
        result = s.chat("hi", on_token=pieces.append)
    assert pieces == ["你", "好", "！"] and result.response == "你好！"
    assert result.ttft_s is not None and result.ttft_s <= result.total_s


def test_timeout_keeps_history_and_cache_and_stops_the_backend(sessions_dir):
    fake = FakeBackend(piece_delay=0.05)
    with ConversationSession(backend=fake, timeout=0.5) as s:
        s.chat("我叫小明")
        fake.enqueue([f"word{i} " for i in range(200)])
        with pytest.raises(SessionTimeoutError) as info:
            s.chat("给我写一个很长的故事")
        err = info.value
        assert isinstance(err, TimeoutError) and isinstance(err, SessionError)
        assert err.partial_response.startswith("word0 ") and err.timeout == 0.5
        assert fake.cancelled == 1  # the backend was told to stop, and did
        assert s.turns == 1
        assert HistoryStore(sessions_dir).load(s.session_id).turns == 1
        result = s.chat("我叫什么名字？")
        assert result.turn == 2
        sent = [m["content"] for m in fake.requests[-1].messages]
        assert sent == ["我叫小明", "Reply 1: 我叫小明", "我叫什么名字？"]
        # Only the new message was "computed": the completed history came from the cache.
        assert result.cached_tokens >= len(" ".join(sent[:2]).split())
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 2


def test_backend_errors_lose_nothing(fake, sessions_dir):
    with ConversationSession(backend=fake) as s:
        s.chat("one")
        fake.enqueue(BackendError("server is down"))
        with pytest.raises(BackendError, match="server is down"):
            s.chat("two")
        fake.enqueue(RuntimeError("boom"))
        with pytest.raises(BackendError, match="boom"):
            s.chat("two")
        assert s.turns == 1
        assert s.chat("three").turn == 2
    assert [m["content"] for m in HistoryStore(sessions_dir).load(s.session_id).messages][::2] == ["one", "three"]


def test_a_failing_on_token_callback_discards_the_turn(fake):
    def explode(_piece):
        raise KeyboardInterrupt

    with ConversationSession(backend=fake) as s:
        with pytest.raises(KeyboardInterrupt):
            s.chat("hi", on_token=explode)
        assert s.turns == 0
        assert s.chat("again").turn == 1


def test_stateless_mode_keeps_and_saves_nothing(fake, sessions_dir):
    with ConversationSession(backend=fake, enable_cache=False) as s:
        s.chat("我叫小明")
        s.chat("我叫什么名字？")
        assert [m["content"] for m in fake.requests[-1].messages] == ["我叫什么名字？"]
        assert s.get_history_summary()["has_history_file"] is False
        with pytest.raises(SessionError, match="enable_cache=False"):
            s.save_history()
        assert s.load_history() is False
    assert not sessions_dir.exists() or not list(sessions_dir.glob("session_*"))


def test_resume_continues_in_the_same_file(sessions_dir):
    with ConversationSession(backend=FakeBackend()) as first:
        first.chat("我喜欢 Python")
        first.chat("我讨厌 Java")
        sid = first.session_id
    fake = FakeBackend()
    with ConversationSession(backend=fake) as second:
        assert second.load_history() is True
        assert second.session_id == sid
        second.chat("我喜欢什么语言？")
        assert next(m["content"] for m in fake.requests[0].messages) == "我喜欢 Python"
    assert sorted(p.name for p in sessions_dir.glob("session_*")) == [f"{sid}.json"]
    assert HistoryStore(sessions_dir).load(sid).turns == 3


def test_save_history_returns_the_path(fake, sessions_dir):
    with ConversationSession(backend=fake) as s:
        s.chat("hi")
        path = s.save_history()
        assert path == sessions_dir / f"{s.session_id}.json"
        assert json.loads(path.read_text())["turns"] == 1


def test_clear_history_starts_a_new_session_and_keeps_the_old_file(sessions_dir):
    fake = FakeBackend()
    with ConversationSession(backend=fake) as s:
        s.chat("secret")
        old = s.session_id
        s.clear_history()
        assert s.session_id != old and s.turns == 0
        s.chat("fresh")
        assert [m["content"] for m in fake.requests[-1].messages] == ["fresh"]
    assert HistoryStore(sessions_dir).load(old).turns == 1
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 1


def test_context_overflow_trims_oldest_turns_from_the_prompt_only(sessions_dir):
    fake = FakeBackend(context_length=120)
    with ConversationSession(backend=fake, system_prompt="be brief", max_tokens=20) as s:
        for i in range(30):
            s.chat(f"message number {i} with some words")
        stats = s.get_cache_stats()
        sent = fake.requests[-1].messages
        assert sent[0] == {"role": "system", "content": "be brief"}
        assert sent[-1]["content"] == "message number 29 with some words"
        assert fake.count_tokens(sent) <= 120 - 20
        assert sent[1]["role"] == "user"  # whole turns are dropped, never half of one
        assert stats["trimmed_turns"] > 0
        assert s.turns == 30
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 30  # the file keeps everything


def test_trimming_frees_room_so_the_prefix_stays_stable(sessions_dir):
    fake = FakeBackend(context_length=200)
    with ConversationSession(backend=fake, max_tokens=20) as s:
        starts = []
        for i in range(40):
            s.chat(f"message {i} with several more words in it")
            starts.append(fake.requests[-1].messages[0]["content"])
    changes = sum(1 for a, b in itertools.pairwise(starts) if a != b)
    assert 0 < changes < 40 // 3  # trims happen in steps, not every turn


def test_a_message_longer_than_the_context_is_refused_clearly(fake):
    fake = FakeBackend(context_length=30)
    with ConversationSession(backend=fake, max_tokens=10) as s:
        with pytest.raises(SessionError, match="too long"):
            s.chat("word " * 50)
        assert s.turns == 0


def test_empty_message_and_closed_session(fake):
    s = ConversationSession(backend=fake)
    assert s.chat("   ").turn == 0 and fake.requests == []  # the seed's loop must not crash on Enter
    s.close()
    s.close()  # idempotent
    with pytest.raises(SessionError, match="closed"):
        s.chat("hi")


def test_cache_stats_accumulate(fake):
    with ConversationSession(backend=fake) as s:
        assert s.get_cache_stats()["cache_hit_ratio"] is None
        s.chat("one two three")
        s.chat("four five")
        stats = s.get_cache_stats()
    for key in ("n_ctx", "tokens_in_cache", "prompt_tokens", "cached_tokens", "cache_hit_ratio",
                "state_bytes", "trimmed_turns", "model_load_s", "ttft_s", "tokens_per_s"):
        assert key in stats
    assert 0 < stats["cache_hit_ratio"] < 1
    assert stats["total_cached_tokens"] == stats["cached_tokens"]


def test_concurrent_chats_on_one_session_are_serialised(fake):
    with ConversationSession(backend=fake) as s:
        threads = [threading.Thread(target=s.chat, args=(f"m{i}",)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.turns == 8
        roles = [m["role"] for m in s.history]
        assert roles == ["user", "assistant"] * 8

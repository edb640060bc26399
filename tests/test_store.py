"""The history store: crash safety, hostile files and ids, many writers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from conversation_session import (
    ConversationSession,
    FakeBackend,
    HistoryStore,
    SessionError,
    SessionFormatError,
    SessionLockedError,
)
from conversation_session.stores._file import encode_snapshot
from helpers import run_python


def _write_session(directory, session_id, messages, **extra):
    directory.mkdir(parents=True, exist_ok=True)
    data = {"session_id": session_id, "created_at": "2025-10-24T12:00:00", "llm_model": "m",
            "turns": sum(m["role"] == "assistant" for m in messages), "conversation_history": messages,
            **extra}
    path = directory / f"{session_id}.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _turn(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_journal_is_replayed_over_the_snapshot_and_a_torn_tail_is_ignored(sessions_dir):
    _write_session(sessions_dir, "session_5", _turn("q1", "a1"))
    lines = [
        {"start": 0, "messages": _turn("q1", "a1"), "updated_at": "t1"},   # already in the snapshot
        {"start": 2, "messages": _turn("q2", "a2"), "updated_at": "t2"},
    ]
    body = "".join(json.dumps(x) + "\n" for x in lines) + '{"start": 4, "messa'
    (sessions_dir / "session_5.journal").write_text(body)
    record = HistoryStore(sessions_dir).load("session_5")
    assert [m["content"] for m in record.messages] == ["q1", "a1", "q2", "a2"]
    assert record.updated_at == "t2"


def test_newest_valid_session_is_loaded_and_bad_ones_are_skipped(sessions_dir, fake, caplog):
    _write_session(sessions_dir, "session_100", _turn("我喜欢 Python", "好"))
    bad = {
        "session_200": b"{not json",
        "session_201": b'{"session_id": "x", "created_at": 1, "llm_model": "m", "conversation_history": []}',
        "session_202": json.dumps({"session_id": "s", "created_at": "x", "llm_model": "m",
                                   "conversation_history": [{"role": "user"}]}).encode(),
        "session_203": b"\xff\xfe not utf-8",
        "session_204": b"[" * 100_000 + b"]" * 100_000,
        "session_205": b"[]",
    }
    for sid, raw in bad.items():
        (sessions_dir / f"{sid}.json").write_bytes(raw)
    outside = sessions_dir.parent / "outside.json"
    outside.write_text(json.dumps({"session_id": "evil", "created_at": "x", "llm_model": "m",
                                   "conversation_history": _turn("secret", "leak")}))
    (sessions_dir / "session_206.json").symlink_to(outside)
    (sessions_dir / "session_207.json").mkdir()
    with open(sessions_dir / "session_208.json", "wb") as f:  # sparse: huge, costs no disk
        f.truncate(HistoryStore(sessions_dir).max_file_bytes + 1)
    for sid in [*list(bad), "session_206", "session_207", "session_208"]:
        os.utime(sessions_dir / f"{sid}.json", (2e9, 2e9), follow_symlinks=False)
    with ConversationSession(backend=fake) as s:
        assert s.load_history() is True
        assert s.session_id == "session_100"
        assert s.history[0]["content"] == "我喜欢 Python"
    skipped = [r.getMessage() for r in caplog.records if "skipping session" in r.getMessage()]
    for sid in [*list(bad), "session_206", "session_207", "session_208"]:
        assert any(sid in m for m in skipped), sid
    assert not any("secret" in m for m in skipped)


def test_load_history_returns_false_when_there_is_nothing(fake, sessions_dir):
    with ConversationSession(backend=fake) as s:
        assert s.load_history() is False
        assert s.load_history("session_404") is False


@pytest.mark.parametrize("hostile", ["../outside", "/etc/passwd", "a/b", "..", ".", "a\0b", "",
                                     "session_1.json", "x" * 200, 5, None])
def test_hostile_session_ids_are_refused(fake, hostile, sessions_dir):
    with ConversationSession(backend=fake) as s:
        if hostile is None:
            assert s.load_history(hostile) is False  # None means "the newest"
            return
        with pytest.raises(ValueError, match="invalid session id"):
            s.load_history(hostile)
    with pytest.raises(ValueError):
        HistoryStore(sessions_dir).load(hostile)


def test_named_corrupt_session_raises_a_clear_error(fake, sessions_dir):
    sessions_dir.mkdir()
    (sessions_dir / "session_9.json").write_text("{")
    with ConversationSession(backend=fake) as s, pytest.raises(SessionFormatError, match=r"session_9\.json"):
        s.load_history("session_9")


def test_twenty_sessions_in_the_same_second_never_share_a_file(sessions_dir):
    ids: list[str] = []
    lock = threading.Lock()

    def start():
        s = ConversationSession(backend=FakeBackend())
        s.chat("hi")
        with lock:
            ids.append(s.session_id)
        s.close()

    threads = [threading.Thread(target=start) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    code = """
        from conversation_session import ConversationSession, FakeBackend
        s = ConversationSession(backend=FakeBackend()); s.chat("hi"); print(s.session_id); s.close()
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              text=True) for _ in range(20)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        ids.append(out.strip())
    assert len(ids) == 40 and len(set(ids)) == 40
    files = sorted(p.stem for p in sessions_dir.glob("session_*.json"))
    assert files == sorted(ids)
    assert not list(sessions_dir.glob("*.journal"))


def test_a_session_is_locked_while_open_and_unlocked_when_its_process_dies(fake, sessions_dir):
    with ConversationSession(backend=fake) as s:
        s.chat("hi")
        sid = s.session_id
        with ConversationSession(backend=FakeBackend()) as other:
            with pytest.raises(SessionLockedError, match="this process"):
                other.load_history(sid)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from conversation_session import ConversationSession, FakeBackend
        s = ConversationSession(backend=FakeBackend())
        assert s.load_history({sid!r})
        print("ready", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with ConversationSession(backend=FakeBackend()) as other:
            with pytest.raises(SessionLockedError, match=f"process {holder.pid}"):
                other.load_history(sid)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with ConversationSession(backend=FakeBackend()) as other:
            assert other.load_history(sid) is True  # the lock died with the process
    finally:
        holder.kill()


def test_kill_9_never_loses_an_acknowledged_turn(sessions_dir):
    """Kill a chatting process at random moments; every turn chat() returned must be on disk."""
    code = """
        import sys
        from conversation_session import ConversationSession, FakeBackend
        s = ConversationSession(backend=FakeBackend())
        if len(sys.argv) > 1:
            s.load_history(sys.argv[1])
        print(s.session_id, flush=True)
        while True:
            r = s.chat("message " + "x" * 50)
            print(r.turn, flush=True)
    """
    import random
    rng = random.Random(1234)
    sid = None
    acked = 0
    for _round in range(12):
        args = [sys.executable, "-c", textwrap.dedent(code)] + ([sid] if sid else [])
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        sid = proc.stdout.readline().strip()
        target = rng.randint(1, 40)
        last = acked
        for _ in range(target):
            line = proc.stdout.readline()
            if not line:
                break
            last = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        acked = max(acked, last)
        snapshot = sessions_dir / f"{sid}.json"
        if snapshot.exists():
            json.loads(snapshot.read_bytes())  # always complete, never half-written
        record = HistoryStore(sessions_dir).load(sid)
        assert record.turns >= acked, (record.turns, acked)
        assert len(record.messages) == 2 * record.turns  # never half a turn
        acked = record.turns
    assert acked > 12


def test_snapshot_encoding_is_valid_json_for_tricky_text():
    from conversation_session import SessionRecord

    msgs = [{"role": "user", "content": 'quote " backslash \\ newline \n tab \t 你好 \u2028 🎉'},
            {"role": "assistant", "content": ""}]
    rec = SessionRecord(session_id="session_1", llm_model="m", messages=msgs)
    assert json.loads(encode_snapshot(rec, msgs))["conversation_history"] == msgs


def test_a_failed_save_keeps_the_turn_and_the_next_save_writes_everything(sessions_dir):
    """RLIMIT_FSIZE makes every write past the limit fail with EFBIG, like a full disk."""
    out = run_python("""
        import resource, json
        from conversation_session import ConversationSession, FakeBackend, HistoryStore
        s = ConversationSession(backend=FakeBackend())
        r1 = s.chat("first")
        s._writer.flush()
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))
        r2 = s.chat("second")
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        r3 = s.chat("third")
        summary = s.get_history_summary()
        s.close()
        rec = HistoryStore(s.store.directory).load(s.session_id)
        print(json.dumps([r1.saved, r2.saved, r3.saved, r2.response, rec.turns, summary["turns"]]))
    """)
    saved1, saved2, saved3, response2, turns_on_disk, turns_in_memory = json.loads(out.stdout.splitlines()[-1])
    assert (saved1, saved2, saved3) == (True, False, True)
    assert response2 == "Reply 2: second"
    assert turns_in_memory == 3 and turns_on_disk == 3
    assert "could not save turn" in out.stderr


def test_a_locked_session_can_be_opened_read_only(sessions_dir):
    with ConversationSession(backend=FakeBackend()) as owner:
        owner.chat("我喜欢 Python")
        sid = owner.session_id
        with ConversationSession(backend=FakeBackend()) as viewer:
            with pytest.raises(SessionLockedError):
                viewer.load_history(sid)
            assert viewer.load_history(sid, read_only=True) is True
            summary = viewer.get_history_summary()
            assert summary["read_only"] is True and summary["turns"] == 1 and summary["session_id"] == sid
            assert summary["has_history_file"] and summary["created_at"]
            assert viewer.history[0]["content"] == "我喜欢 Python"
            with pytest.raises(SessionError, match="read-only"):
                viewer.chat("hello")
            with pytest.raises(SessionError, match="read-only"):
                viewer.save_history()
            viewer.clear_history()  # back to a new, writable session
            assert viewer.session_id != sid and viewer.chat("hello").saved
        owner.chat("still mine")  # the owner was never disturbed
    assert HistoryStore(sessions_dir).load(sid).turns == 2


def test_resuming_after_a_torn_journal_line_loses_no_new_turn(sessions_dir):
    with ConversationSession(backend=FakeBackend()) as s:
        s.chat("one")
        sid = s.session_id
    # A crash mid-append: a journal that ends in half a line.
    journal = sessions_dir / f"{sid}.journal"
    journal.write_bytes(b'{"start": 2, "messages": [{"role": "user", "con')
    with ConversationSession(backend=FakeBackend()) as s:
        assert s.load_history(sid)
        assert s.chat("two").saved
        # Read back at once, as a crash right now would: the new turn must be visible.
        assert HistoryStore(sessions_dir).load(sid).turns == 2
    assert HistoryStore(sessions_dir).load(sid).turns == 2


def test_load_history_skips_a_newest_session_open_elsewhere(sessions_dir):
    with ConversationSession(backend=FakeBackend()) as older:
        older.chat("older")
        old_id = older.session_id
    with ConversationSession(backend=FakeBackend()) as busy:
        busy.chat("busy")
        busy.save_history()
        os.utime(sessions_dir / f"{busy.session_id}.json", (2e9, 2e9))
        with ConversationSession(backend=FakeBackend()) as third:
            assert third.load_history() is True
            assert third.session_id == old_id  # the newest is held by `busy`: the next one loads


def test_an_empty_saved_session_is_not_resumed(sessions_dir, fake):
    with ConversationSession(backend=fake) as empty:
        empty.save_history()
        empty_id = empty.session_id
    with ConversationSession(backend=FakeBackend()) as s:
        own = s.session_id
        assert s.load_history(empty_id) is False
        assert s.session_id == own


def test_an_unusable_sessions_folder_is_a_session_error(sessions_dir, fake):
    sessions_dir.parent.mkdir(parents=True, exist_ok=True)
    sessions_dir.write_text("a file where the folder should be")
    with pytest.raises(SessionError, match="cannot create the sessions folder"):
        ConversationSession(backend=fake)


def test_a_failed_clear_history_leaves_the_session_as_it_was(sessions_dir, fake):
    with ConversationSession(backend=fake) as s:
        s.chat("one")
        sid = s.session_id
        s._writer.flush()
        away = sessions_dir.with_name("away")
        sessions_dir.rename(away)
        sessions_dir.write_text("a file where the folder was")  # no new session can be made
        try:
            with pytest.raises(SessionError):
                s.clear_history()
        finally:
            sessions_dir.unlink()
            away.rename(sessions_dir)
        assert s.session_id == sid and s.turns == 1
        assert s.chat("two").saved
    assert HistoryStore(sessions_dir).load(sid).turns == 2

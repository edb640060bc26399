"""Issue 10, the store side: each test here failed on the store before the fix.

The writer API the session builds on (append at a position, its own list, ensure_room), journal
lines that name their session, a bounded journal, planted files that never block, read-only
folders, nothing unread ever destroyed, ``saved`` meaning durable, one consistent read, and the
writer's lifecycle (garbage collection, fork, the shared pool, an absolute folder).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conversation_session import ConversationSession, FakeBackend, HistoryStore, SessionFormatError, _runtime
from conversation_session._exceptions import SessionNotFoundError
from conversation_session.stores import _file as _store
from conversation_session.stores._api import SessionInfo, SessionWriterAPI, StoreAPI
from conversation_session.stores._housekeeping import doctor, export_all, prune
from conversation_session.stores._record import SCHEMA_VERSION
from helpers import run_python


def _turn(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _snapshot(directory: Path, sid: str, messages, **extra) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"schema_version": 1, "session_id": sid, "created_at": "2025-10-24T12:00:00",
            "updated_at": "2025-10-24T12:00:00", "llm_model": "m", "turns": 0,
            "conversation_history": messages, **extra}
    (directory / f"{sid}.json").write_text(json.dumps(data, ensure_ascii=False))


def _line(start: int, messages, sid: str | None = None) -> bytes:
    data = {"start": start, "messages": messages, "updated_at": f"2025-10-24T12:0{start % 10}:00"}
    if sid is not None:
        data["session_id"] = sid
    return json.dumps(data, ensure_ascii=False).encode() + b"\n"


def _in_thread(fn, timeout: float = 10.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    out: dict[str, object] = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn} blocked for {timeout} s"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


# -- the writer API ------------------------------------------------------------------------------
def test_the_file_store_implements_the_store_interface(sessions_dir):
    store = HistoryStore(sessions_dir)
    assert isinstance(store, StoreAPI) and store.description == str(sessions_dir)
    writer = store.create("m")
    try:
        assert isinstance(writer, SessionWriterAPI)
        assert writer.persisted is False and writer.has_file is False and writer.last_error is None
        assert writer.append(0, _turn("q", "a"), {"system_prompt": "be brief"}) is True
        assert writer.persisted and writer.has_file
        with pytest.raises(ValueError, match="holds 2 messages"):
            writer.append(1, _turn("q", "a"))
        assert store.is_locked(writer.session_id)
    finally:
        writer.close()
    assert not store.is_locked(writer.session_id)
    (info,) = store.list_sessions()
    assert isinstance(info, SessionInfo) and _store.SessionInfo is SessionInfo
    assert info.location == str(sessions_dir / f"{writer.session_id}.json") and info.turns == 1
    with pytest.raises(SessionNotFoundError) as exc:
        store.open("session_404")
    assert isinstance(exc.value, FileNotFoundError)
    with pytest.raises(SessionNotFoundError):
        store.load("session_404")
    record = store.load(writer.session_id)
    assert record.system_prompt == "be brief"
    new_id = store.import_record(record)
    assert new_id != writer.session_id and store.load(new_id).messages == record.messages
    assert store.delete(new_id) and not store.delete(new_id)


def test_the_writer_keeps_its_own_list(sessions_dir):
    store = HistoryStore(sessions_dir)
    writer = store.create("m")
    mine = _turn("q", "a")
    writer.append(0, mine)
    mine.append({"role": "user", "content": "never appended"})
    assert len(writer.record.messages) == 2
    writer.close()
    opened, record = store.open(writer.session_id)
    try:
        record.messages.append({"role": "user", "content": "the caller's copy"})
        assert len(opened.record.messages) == 2 and opened.record.messages is not record.messages
    finally:
        opened.close()


def test_journal_lines_name_their_session_and_position(sessions_dir, monkeypatch):
    monkeypatch.setattr(_store._Core, "_request_snapshot", lambda self: None)  # keep the lines in the journal
    writer = HistoryStore(sessions_dir).create("m")
    try:
        writer.append(0, _turn("q1", "a1"), {"system_prompt": "sys"})
        writer.append(2, _turn("q2", "a2"))
        lines = [json.loads(x) for x in (sessions_dir / f"{writer.session_id}.journal").read_bytes().splitlines()]
    finally:
        writer.close()
    assert [(x["session_id"], x["start"], len(x["messages"])) for x in lines] == [
        (writer.session_id, 0, 2), (writer.session_id, 2, 2)]
    assert lines[0]["meta"] == {"system_prompt": "sys", "summary": None, "title": None} and "meta" not in lines[1]


def test_interrupted_replies_and_the_system_prompt_round_trip(sessions_dir):
    store = HistoryStore(sessions_dir)
    writer = store.create("m")
    reply = {"role": "assistant", "content": "half", "interrupted": True}
    writer.append(0, [{"role": "user", "content": "q"}, reply], {"system_prompt": "你是助手"})
    mid = store.load(writer.session_id)  # from the journal (or a snapshot: either way)
    writer.close()
    for record in (mid, store.load(writer.session_id)):
        assert record.messages[1] == reply and record.system_prompt == "你是助手"
    data = json.loads((sessions_dir / f"{writer.session_id}.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION and data["system_prompt"] == "你是助手"


def test_counts_are_incremental_not_recounted_per_append(sessions_dir, monkeypatch):
    seen: list[int] = []
    real = _store.count_turns

    def spy(messages):
        messages = list(messages)
        seen.append(len(messages))
        return real(messages)

    monkeypatch.setattr(_store, "count_turns", spy)
    writer = HistoryStore(sessions_dir).create("m")
    try:
        for n in range(200):
            assert writer.append(2 * n, _turn(f"q{n}", "a"))
        writer.flush()
        assert writer.turns == 200
    finally:
        writer.close()
    assert max(seen) <= 2  # each append counts its own messages only


# -- 4: whatever the writer writes, the reader reads ----------------------------------------------
def test_ensure_room_and_append_never_write_what_the_loader_refuses(sessions_dir, caplog):
    store = HistoryStore(sessions_dir, max_file_bytes=200_000)
    writer = store.create("m")
    try:
        writer.ensure_room(1000)
        big = "x" * 60_000
        n = 0
        while True:
            try:
                writer.ensure_room(len(big))
            except ValueError as exc:
                assert "start a new session" in str(exc) and "200,000" in str(exc)
                break
            assert writer.append(2 * n, _turn(big, "a"))
            n += 1
        assert n >= 1
        # Appends past the limit (a caller that skipped ensure_room) are kept in memory only.
        while writer.append(2 * n, _turn(big, "a")):
            n += 1
            assert n < 10
        assert writer.append(2 * n + 2, _turn(big, "a")) is False
        assert "limit" in str(writer.last_error)
        assert sum("limit" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR) == 1
    finally:
        writer.close()
    assert store.load(writer.session_id).turns == n  # everything written still loads


# -- 1: a bounded journal ------------------------------------------------------------------------
def test_the_journal_is_folded_even_while_turns_keep_arriving(sessions_dir, monkeypatch):
    """Turns keep arriving while every snapshot is being written: the journal is still cut
    down to what the snapshot lacks (not left to grow until a quiet moment).  The test holds
    each snapshot open until more than FOLD_LINES turns have arrived during it, so the outcome
    does not depend on how fast this machine writes snapshots."""
    started = threading.Semaphore(0)  # one release per snapshot of this session that began
    go = threading.Semaphore(0)       # one release per snapshot the test lets finish
    real_write = _store.atomic_write_bytes

    def held_write(path, data, *args, **kwargs):
        # Only this session's snapshots (the shared pool may be finishing other tests' work).
        if Path(path).name == f"{writer.session_id}.json" and threading.current_thread() is not test_thread:
            started.release()
            assert go.acquire(timeout=30), "the test never let the snapshot finish"
        return real_write(path, data, *args, **kwargs)

    test_thread = threading.current_thread()
    monkeypatch.setattr(_store, "atomic_write_bytes", held_write)
    store = HistoryStore(sessions_dir)
    writer = store.create("m")
    journal = sessions_dir / f"{writer.session_id}.journal"
    rounds, during = 10, _store.FOLD_LINES + 16
    n = 0

    def turn() -> None:
        nonlocal n
        assert writer.append(2 * n, _turn(f"question {n}", f"answer {n} " + "y" * 200))
        n += 1

    try:
        worst = 0
        for _ in range(rounds):
            deadline = time.monotonic() + 30
            while not started.acquire(timeout=0.01):  # turns until a snapshot is being written
                turn()
                assert time.monotonic() < deadline, "no snapshot started"
            for _ in range(during):  # more than FOLD_LINES turns while it is being written
                turn()
            before = journal.read_bytes().count(b"\n")
            go.release()
            # The snapshot ends by cutting the journal to one line (what it lacks), since turns
            # arrived during it: wait for that, bounded.
            deadline = time.monotonic() + 30
            while journal.read_bytes().count(b"\n") >= before and time.monotonic() < deadline:
                time.sleep(0.01)
            worst = max(worst, journal.read_bytes().count(b"\n"))
        # A crash now would replay only this tail (the old store: every line since the start).
        assert n > rounds * during and worst <= 2, (n, worst)
        monkeypatch.setattr(_store, "atomic_write_bytes", real_write)
        for _ in range(3):
            go.release()
        assert store.load(writer.session_id).turns == n
    finally:
        monkeypatch.setattr(_store, "atomic_write_bytes", real_write)
        for _ in range(3):
            go.release()
        writer.close()


# -- 2: planted files ------------------------------------------------------------------------------
def _plant(path: Path, kind: str) -> contextlib.AbstractContextManager:
    if kind == "fifo":
        os.mkfifo(path)
        return contextlib.nullcontext()
    if kind == "dir":
        path.mkdir()
        return contextlib.nullcontext()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return contextlib.closing(sock)


@pytest.mark.parametrize("kind", ["fifo", "socket", "dir"])
def test_a_planted_journal_never_blocks_and_is_reported(sessions_dir, kind, caplog):
    _snapshot(sessions_dir, "session_1", _turn("q", "a"))
    _snapshot(sessions_dir, "session_2", _turn("other", "a"))
    store = HistoryStore(sessions_dir)
    with _plant(sessions_dir / "session_1.journal", kind):
        with pytest.raises(SessionFormatError, match="not a regular file"):
            _in_thread(lambda: store.load("session_1"))
        with pytest.raises(SessionFormatError, match="not a regular file"):
            _in_thread(lambda: store.open("session_1"))
        assert [i.session_id for i in _in_thread(store.list_sessions)] == ["session_2"]
        with ConversationSession(backend=FakeBackend()) as s:  # a new session is not held up
            _in_thread(lambda: s.chat("hello"))
            assert _in_thread(lambda: s.load_history("session_2")) is True
        kinds = {(p.path.name, p.kind) for p in _in_thread(lambda: doctor(store))}
        assert ("session_1.journal", "not-regular") in kinds
        assert _in_thread(lambda: store.delete("session_1")) is True or kind == "dir"
    assert any("skipping session session_1" in r.getMessage() for r in caplog.records)


def test_a_lock_file_that_is_not_a_file_blocks_nothing_and_doctor_reports_it(sessions_dir):
    sessions_dir.mkdir()
    (sessions_dir / ".lock").mkdir()
    with ConversationSession(backend=FakeBackend()) as s:
        assert s.chat("hi").saved
        sid = s.session_id
    assert HistoryStore(sessions_dir).load(sid).turns == 1
    (problem,) = doctor(HistoryStore(sessions_dir), fix=True)
    assert problem.path.name == ".lock" and problem.kind == "not-regular" and problem.moved_to is not None
    os.mkfifo(sessions_dir / ".lock")
    with ConversationSession(backend=FakeBackend()) as s:
        assert _in_thread(lambda: s.chat("hi")).saved


@contextlib.contextmanager
def _read_only(path: Path):
    """Make ``path`` read-only for real: a read-only bind mount as root, permissions otherwise."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.iterdir()]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    bind = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"root without mount: cannot make a read-only folder ({bind.stderr.decode().strip()})")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_sessions_folder_can_be_viewed_listed_and_exported(sessions_dir, tmp_path, caplog):
    with ConversationSession(backend=FakeBackend()) as s:
        s.chat("我喜欢 Python")
        sid = s.session_id
    before = sorted(p.name for p in sessions_dir.iterdir())
    with _read_only(sessions_dir):
        store = HistoryStore(sessions_dir)
        assert [i.session_id for i in store.list_sessions()] == [sid]
        assert store.load(sid).turns == 1
        assert [p.name for p in export_all(store, tmp_path / "out").written] == [f"{sid}.json"]
        with ConversationSession(backend=FakeBackend()) as viewer:  # creating it must not fail
            assert viewer.load_history(sid, read_only=True) is True
            assert viewer.history[0]["content"] == "我喜欢 Python"
        writer = store.create("m")
        try:
            assert writer.persisted is False
            assert writer.append(0, _turn("q", "a")) is False
            assert writer.last_error is not None
        finally:
            writer.close()
        assert sorted(p.name for p in sessions_dir.iterdir()) == before
    assert any("could not save session" in r.getMessage() for r in caplog.records)


def test_a_writer_created_in_a_read_only_folder_saves_once_it_can(sessions_dir):
    sessions_dir.mkdir()
    with _read_only(sessions_dir):
        writer = HistoryStore(sessions_dir).create("m")
        assert writer.append(0, _turn("q1", "a1")) is False
    try:
        assert writer.append(2, _turn("q2", "a2")) is True  # writable again: everything is written
    finally:
        writer.close()
    assert HistoryStore(sessions_dir).load(writer.session_id).turns == 2


# -- 3: never destroy what could not be read -------------------------------------------------------
def test_a_damaged_middle_line_is_kept_aside_before_the_journal_is_rewritten(sessions_dir, caplog):
    _snapshot(sessions_dir, "session_1", _turn("q1", "a1"))
    original = _line(2, _turn("q2", "a2"), "session_1") + b'{"start": 4, "mess\xff\n' + \
        _line(4, _turn("q3", "a3"), "session_1")
    journal = sessions_dir / "session_1.journal"
    journal.write_bytes(original)
    store = HistoryStore(sessions_dir)
    assert store.load("session_1").turns == 2  # up to the damage
    writer, record = store.open("session_1")
    assert record.turns == 2
    assert writer.append(4, _turn("q4", "a4"))
    writer.close()
    (aside,) = sessions_dir.glob("session_1.journal.corrupt-*")
    assert aside.read_bytes() == original  # every byte, the unread turn included
    assert any(str(aside) in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert [m["content"] for m in store.load("session_1").messages][-2:] == ["q4", "a4"]
    assert not journal.exists()


def test_a_foreign_journal_is_refused_and_kept_aside(sessions_dir, caplog):
    _snapshot(sessions_dir, "session_1", _turn("mine", "a"))
    foreign = _line(2, _turn("someone else's", "secret"), "session_9")
    (sessions_dir / "session_1.journal").write_bytes(foreign)
    store = HistoryStore(sessions_dir)
    assert [m["content"] for m in store.load("session_1").messages] == ["mine", "a"]
    assert [i.turns for i in store.list_sessions()] == [1]
    assert [p.kind for p in doctor(store)] == ["foreign-journal"]
    writer, record = store.open("session_1")
    assert record.turns == 1
    writer.append(2, _turn("q2", "a2"))
    writer.close()
    (aside,) = sessions_dir.glob("session_1.journal.corrupt-*")
    assert aside.read_bytes() == foreign
    assert [m["content"] for m in store.load("session_1").messages] == ["mine", "a", "q2", "a2"]
    assert any("session_9" in r.getMessage() for r in caplog.records)


def test_doctor_and_the_loader_replay_with_the_same_function(sessions_dir, monkeypatch):
    from conversation_session.stores import _housekeeping

    assert _housekeeping.replay_journal is _store.replay_journal
    calls = []
    real = _store.replay_journal
    monkeypatch.setattr(_housekeeping, "replay_journal", lambda *a: calls.append(a) or real(*a))
    _snapshot(sessions_dir, "session_1", _turn("q", "a"))
    (sessions_dir / "session_1.journal").write_bytes(_line(2, _turn("q2", "a2")) + b"garbage\n")
    assert [p.kind for p in doctor(HistoryStore(sessions_dir))] == ["damaged-journal"] and calls


# -- 4: saved means durable ------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["journal", "folder"])
def test_a_journal_removed_underneath_is_detected_and_the_next_save_writes_everything(sessions_dir, what, caplog):
    with ConversationSession(backend=FakeBackend()) as s:
        assert s.chat("one").saved
        s._writer.flush()
        sid = s.session_id
        if what == "folder":
            shutil.rmtree(sessions_dir)
        else:
            (sessions_dir / f"{sid}.journal").unlink()
        r = s.chat("two")
        assert r.saved is False
        assert any("NOT saved" in m.getMessage() for m in caplog.records if m.levelno >= logging.ERROR)
        assert s.chat("three").saved is True
        assert HistoryStore(sessions_dir).load(sid).turns == 3  # at once, not only after close()
    assert HistoryStore(sessions_dir).load(sid).turns == 3


# -- 5: one consistent read --------------------------------------------------------------------------
def test_readers_see_every_turn_acknowledged_before_they_started(sessions_dir):
    store = HistoryStore(sessions_dir)
    writer = store.create("m")
    acked = 0
    stop = threading.Event()

    def write():
        nonlocal acked
        n = 0
        while not stop.is_set():
            assert writer.append(2 * n, _turn(f"q{n}", "a" * (n % 50)))
            n += 1
            acked = n

    t = threading.Thread(target=write)
    t.start()
    misses = []
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            before = acked
            got = store.load(writer.session_id).turns
            if got < before:
                misses.append(("load", before, got))
            before = acked
            (info,) = [i for i in store.list_sessions() if i.session_id == writer.session_id] or [None]
            if before and (info is None or info.turns < before):
                misses.append(("list", before, info and info.turns))
    finally:
        stop.set()
        t.join()
        writer.close()
    assert acked > 100 and not misses, misses[:5]


# -- 6: lifecycle ----------------------------------------------------------------------------------
def test_the_folder_is_resolved_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = HistoryStore("sessions")
    assert store.directory == tmp_path / "sessions"
    writer = store.create("m")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    writer.append(0, _turn("q", "a"))
    writer.close()
    assert HistoryStore(tmp_path / "sessions").load(writer.session_id).turns == 1
    assert not list(other.iterdir())


def test_a_writer_garbage_collected_without_close_releases_its_lock_and_folds_its_journal(sessions_dir):
    store = HistoryStore(sessions_dir)
    writer = store.create("m")
    sid = writer.session_id
    writer.append(0, _turn("q", "a"))
    del writer
    gc.collect()
    assert not store.is_locked(sid)
    assert not (sessions_dir / f"{sid}.journal").exists()
    again, record = store.open(sid)  # nothing keeps the lock
    again.close()
    assert record.turns == 1


def test_writers_share_the_pool_instead_of_a_thread_each(sessions_dir):
    store = HistoryStore(sessions_dir)
    before = threading.active_count()
    writers = [store.create("m") for _ in range(30)]
    try:
        for w in writers:
            w.append(0, _turn("q", "a"))
        for w in writers:
            assert w.flush()
        assert threading.active_count() - before <= _runtime.MAX_WORKERS + 1
    finally:
        for w in writers:
            w.close()


def test_a_forked_child_that_exits_leaves_its_parents_writer_alone(sessions_dir):
    out = run_python(f"""
        import json, os, sys
        from conversation_session import HistoryStore
        store = HistoryStore({str(sessions_dir)!r})
        writer = store.create("m")
        writer.append(0, [{{"role": "user", "content": "q"}}, {{"role": "assistant", "content": "a"}}])
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a normal exit: atexit handlers and finalizers run in the child
        os.waitpid(pid, 0)
        journal = store.journal_path(writer.session_id)
        state = [journal.exists(), store.is_locked(writer.session_id)]
        state.append(writer.append(2, [{{"role": "user", "content": "q2"}}, {{"role": "assistant", "content": "a2"}}]))
        print(json.dumps(state + [writer.session_id]))
    """)
    exists, locked, saved, sid = json.loads(out.stdout.splitlines()[-1])
    assert (exists, locked, saved) == (True, True, True)
    assert HistoryStore(sessions_dir).load(sid).turns == 2


# -- 9: listing without loading every session --------------------------------------------------------
def test_listing_parses_only_snapshots_that_changed(sessions_dir, monkeypatch):
    for n in range(5):
        _snapshot(sessions_dir, f"session_{n}", _turn(f"first {n}\nmore", "a") * 3)
    store = HistoryStore(sessions_dir)
    parsed: list[str] = []
    real = HistoryStore._parse_snapshot
    monkeypatch.setattr(HistoryStore, "_parse_snapshot",
                        lambda self, sid, raw: parsed.append(sid) or real(self, sid, raw))
    first = store.list_sessions()
    assert len(parsed) == 5
    parsed.clear()
    assert store.list_sessions() == first and parsed == []
    writer, _ = store.open("session_3")
    writer.append(6, _turn("new", "b"))
    writer.close()
    parsed.clear()
    listed = {i.session_id: i for i in store.list_sessions()}
    assert parsed == ["session_3"] and listed["session_3"].turns == 4
    assert listed["session_1"].first_user_line == "first 1" and listed["session_1"].turns == 3
    # A damaged or lying cache is never trusted beyond what the files' identity confirms.
    (sessions_dir / ".list-cache.json").write_text('{"version": 1, "sessions": {"session_1": {"marks": [1], '
                                                   '"head": {"turns": 99}}}}')
    assert {i.session_id: i.turns for i in store.list_sessions()}["session_1"] == 3
    (sessions_dir / ".list-cache.json").write_bytes(b"\xff garbage")
    assert sorted(i.session_id for i in store.list_sessions()) == sorted(i.session_id for i in first)
    assert doctor(store) == []  # the cache is no problem file


def test_prune_lists_once_and_deletes_each_session_once(sessions_dir, monkeypatch):
    for n in range(1, 5):
        _snapshot(sessions_dir, f"session_{n}", _turn(f"q{n}", "a"), updated_at=f"2020-01-0{n}T00:00:00")
    store = HistoryStore(sessions_dir)
    calls: list[str] = []
    real_list, real_delete = store.list_sessions, store.delete
    monkeypatch.setattr(store, "list_sessions", lambda: calls.append("list") or real_list())
    monkeypatch.setattr(store, "delete", lambda sid: calls.append(sid) or real_delete(sid))
    assert sorted(prune(store, keep=1)) == ["session_1", "session_2", "session_3"]
    assert calls.count("list") == 1 and sorted(c for c in calls if c != "list") == ["session_1", "session_2",
                                                                                      "session_3"]

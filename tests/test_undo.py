"""Undo, retry and titles in the library (file store; PostgreSQL runs the same contract in
test_store_conformance.py): durable, recorded in the file (never a silent rewrite), all or
nothing when the store cannot take them, and restored by a new process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conversation_session import AsyncConversationSession, ConversationSession, HistoryStore, SessionError
from conversation_session.backends import FakeBackend
from conversation_session.stores._file import replay_journal
from conversation_session.stores._record import TITLE_MAX_CHARS

ROOT = Path(__file__).resolve().parents[1]


def _session(folder: Path, **kw) -> ConversationSession:
    kw.setdefault("backend", FakeBackend())
    return ConversationSession(sessions_dir=folder, persist_kv_cache=False, **kw)


def _contents(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages]


def test_undo_withdraws_the_last_turn_and_the_file_says_so(tmp_path):
    s = _session(tmp_path)
    for text in ("my name is Ana", "what is 2+2", "tell me a joke"):
        s.chat(text)
    assert s.undo() is True
    assert s.turns == 2 and _contents(s.history)[-2:] == ["what is 2+2", "Reply 2: what is 2+2"]
    sid = s.session_id
    # Before any snapshot: the journal's last line is the undo, with what it withdrew.
    last = json.loads((tmp_path / f"{sid}.journal").read_text().splitlines()[-1])
    assert last["rewind"] == 1 and last["start"] == 4 and _contents(last["undone"]) == [
        "tell me a joke", "Reply 3: tell me a joke"]
    s.close()
    data = json.loads((tmp_path / f"{sid}.json").read_text())
    assert data["turns"] == 2 and len(data["conversation_history"]) == 4
    assert data["undone"][0]["start"] == 4 and _contents(data["undone"][0]["messages"])[0] == "tell me a joke"
    # A new process (a new session object) continues without the undone turn.
    again = _session(tmp_path)
    assert again.load_history(sid) and again.turns == 2
    assert again.chat("and now?").turn == 3
    again.close()


def test_undo_with_nothing_to_undo_is_false_and_writes_nothing(tmp_path):
    s = _session(tmp_path)
    assert s.undo() is False
    s.chat("one")
    assert s.undo() is True and s.undo() is False and s.turns == 0
    sid = s.session_id
    s.close()
    # An emptied session keeps its file, which still says what was undone.
    data = json.loads((tmp_path / f"{sid}.json").read_text())
    assert data["conversation_history"] == [] and len(data["undone"]) == 1


def test_retry_replaces_the_last_reply_in_one_durable_write(tmp_path):
    s = _session(tmp_path)
    s.chat("hello")
    s.chat("tell me a joke")
    s._writer.flush()
    s._writer.write_snapshot()  # the snapshot job has emptied the journal: the retry's line is alone in it
    result = s.retry()
    assert result.saved and result.response == "Reply 3: tell me a joke" and result.turn == 2
    assert _contents(s.history) == ["hello", "Reply 1: hello", "tell me a joke", "Reply 3: tell me a joke"]
    lines = (tmp_path / f"{s.session_id}.journal").read_text().splitlines()
    assert len(lines) == 1  # one line: the withdrawal and the new turn together
    line = json.loads(lines[-1])
    assert _contents(line["undone"]) == ["tell me a joke", "Reply 2: tell me a joke"]
    assert _contents(line["messages"]) == ["tell me a joke", "Reply 3: tell me a joke"]
    sid = s.session_id
    s.close()
    loaded = HistoryStore(tmp_path).load(sid)
    assert _contents(loaded.messages)[-1] == "Reply 3: tell me a joke"
    assert _contents(loaded.undone[0]["messages"])[-1] == "Reply 2: tell me a joke"


def test_retry_streams_and_the_prompt_leaves_out_the_replaced_turn(tmp_path):
    backend = FakeBackend()
    s = _session(tmp_path, backend=backend)
    s.chat("first")
    s.chat("second")
    pieces = []
    with s.stream_retry(on_token=pieces.append) as turn:
        streamed = "".join(turn)
    assert streamed == "".join(pieces) == turn.result().response
    sent = backend.requests[-1].messages
    assert _contents(sent) == ["first", "Reply 1: first", "second"]
    s.close()


def test_retry_with_no_turn_is_an_error_and_the_session_stays_usable(tmp_path):
    s = _session(tmp_path)
    with pytest.raises(SessionError, match="no reply to retry"):
        s.retry()
    assert s.chat("still works").turn == 1
    s.close()


def test_when_the_store_cannot_record_it_nothing_changes(tmp_path):
    s = _session(tmp_path)
    s.chat("one")
    s.chat("two")
    history = s.history
    core = s._writer._core
    good = core.fd
    core.fd = os.open(tmp_path / f"{s.session_id}.journal", os.O_RDONLY)  # every write now fails (EBADF)
    try:
        with pytest.raises(SessionError, match="nothing was changed"):
            s.undo()
        assert s.history == history
        result = s.retry()
        assert result.saved is False and s.history == history  # the previous reply stays
    finally:
        os.close(core.fd)
        core.fd = good
    assert s.undo() is True and s.turns == 1  # writable again: it works, and is durable
    sid = s.session_id
    s.close()
    record = HistoryStore(tmp_path).load(sid)
    assert _contents(record.messages) == ["one", "Reply 1: one"] and len(record.undone) == 1


def test_an_undo_survives_kill_9_before_any_snapshot(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / "src")!r})
        from conversation_session import ConversationSession
        from conversation_session.backends import FakeBackend
        s = ConversationSession(backend=FakeBackend(), sessions_dir={str(tmp_path)!r}, persist_kv_cache=False)
        for t in ("a", "b", "c"):
            s.chat(t)
        s.undo()
        s.retry()
        print(s.session_id, flush=True)
        os._exit(0)  # no close(), no snapshot job finished on purpose
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    sid = out.stdout.strip()
    record = HistoryStore(tmp_path).load(sid)
    assert _contents(record.messages) == ["a", "Reply 1: a", "b", "Reply 4: b"]
    assert [u["start"] for u in record.undone] == [4, 2]


def test_replay_over_a_snapshot_that_already_holds_the_undo_does_not_bring_it_back(tmp_path):
    # A crash between the snapshot's rename and the journal's truncation leaves both: the
    # journal's lines up to the undo are already in the snapshot and must not be replayed.
    s = _session(tmp_path)
    for t in ("a", "b", "c"):
        s.chat(t)
    s._writer.flush()
    s._writer.write_snapshot()  # the snapshot holds the three turns; the journal is empty
    s.undo()
    sid = s.session_id
    journal = (tmp_path / f"{sid}.journal").read_bytes()
    assert journal.count(b"\n") == 1
    s.close()  # writes the snapshot (with the undo) and removes the journal
    (tmp_path / f"{sid}.journal").write_bytes(journal)
    record = HistoryStore(tmp_path).load(sid)
    assert _contents(record.messages) == ["a", "Reply 1: a", "b", "Reply 2: b"]
    assert len(record.undone) == 1
    info = HistoryStore(tmp_path).list_sessions()[0]
    assert (info.turns, info.total_messages) == (2, 4)
    # Replaying the same journal over the snapshot it came from (no undo folded) applies it.
    replay = replay_journal(journal, sid, 6, 0)
    assert replay.count == 4 and len(replay.undone) == 1


def test_listing_counts_turns_after_an_undo_that_cut_into_the_snapshot(tmp_path):
    s = _session(tmp_path)
    for t in ("a", "b", "c"):
        s.chat(t)
    s._writer.flush()  # the snapshot holds all three turns
    s.undo()
    s.undo()
    info = HistoryStore(tmp_path).list_sessions()[0]
    assert (info.turns, info.total_messages, info.first_user_line) == (1, 2, "a")
    s.close()


def test_an_undo_that_withdraws_summarised_turns_drops_the_summary(tmp_path):
    s = _session(tmp_path)
    s.chat("a")
    writer = s._writer
    assert writer.append(2, [], {"summary": {"text": "A said a.", "covers": 2, "model": "m"}})
    s.undo()
    sid = s.session_id
    s.close()
    assert HistoryStore(tmp_path).load(sid).summary is None


def test_titles_are_one_clean_line_saved_and_listed(tmp_path):
    s = _session(tmp_path)
    s.chat("hello there")
    assert s.set_title("  Trip\n to   Lisbon ") is True and s.title == "Trip to Lisbon"
    sid = s.session_id
    assert s.get_history_summary()["title"] == "Trip to Lisbon"
    s.close()
    store = HistoryStore(tmp_path)
    assert store.list_sessions()[0].title == "Trip to Lisbon"
    store.set_title(sid, "x" * (TITLE_MAX_CHARS + 50))
    title = store.load(sid).title
    assert title is not None and len(title) == TITLE_MAX_CHARS and title.endswith("…")
    store.set_title(sid, "   ")  # blank removes it
    assert store.load(sid).title is None and store.list_sessions()[0].title is None
    with pytest.raises(TypeError):
        store.set_title(sid, 42)  # type: ignore[arg-type]


def test_renaming_a_session_open_elsewhere_is_refused(tmp_path):
    from conversation_session import SessionLockedError

    s = _session(tmp_path)
    s.chat("hi")
    with pytest.raises(SessionLockedError):
        HistoryStore(tmp_path).set_title(s.session_id, "nope")
    s.close()


def test_search_finds_titles_and_messages_with_snippets(tmp_path):
    store = HistoryStore(tmp_path)
    texts = {
        "s1": ["My name is Ana and I live in Lisbon", "Nice to meet you, Ana."],
        "s2": ['He said "quote" and a back\\slash', "ok"],
        "s3": ["我住在北京，喜欢喝茶", "好的"],
        "s4": ["nothing here " * 30 + "the NEEDLE in a long message " + "tail " * 30, "fine"],
    }
    for sid, (q, a) in texts.items():
        w = store.create("m")
        w.append(0, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        texts[sid] = [w.session_id]  # type: ignore[list-item]
        if sid == "s1":
            w.append(2, [], {"title": "Ana's trip"})
        w.close()
    hits = store.search("ana")
    assert {(h.role, h.index) for h in hits} >= {("title", -1), ("user", 0), ("assistant", 1)}
    assert all("ana" in h.snippet.casefold() for h in hits)
    assert [h.snippet for h in store.search('"quote"')] == ['He said "quote" and a back\\slash']
    assert store.search("back\\slash")[0].index == 0
    assert store.search("北京")[0].snippet == "我住在北京，喜欢喝茶"
    long = store.search("needle")
    assert len(long) == 1 and long[0].snippet.startswith("…") and long[0].snippet.endswith("…")
    assert "the NEEDLE in a long message" in long[0].snippet and len(long[0].snippet) <= 82
    assert store.search("my   NAME\nis")[0].index == 0  # whitespace runs match any whitespace
    assert store.search("absent words") == []
    assert len(store.search("a", limit=2)) == 2
    with pytest.raises(ValueError):
        store.search("  ")


def test_async_undo_retry_and_title(tmp_path):
    async def main() -> None:
        async with AsyncConversationSession(backend=FakeBackend(), sessions_dir=tmp_path,
                                            persist_kv_cache=False) as s:
            await s.chat("a")
            await s.chat("b")
            assert (await s.retry()).response == "Reply 3: b"
            assert await s.undo() is True and s.turns == 1
            assert await s.set_title("async one") is True and s.title == "async one"
            sid = s.session_id
        record = HistoryStore(tmp_path).load(sid)
        assert record.turns == 1 and record.title == "async one" and len(record.undone) == 2

    asyncio.run(main())


def test_cut_last_reply_keeps_what_was_heard_after_the_turn_was_saved(tmp_path):
    s = _session(tmp_path)
    s.chat("tell me a story")
    s.chat("another one")
    full = s.history[-1]["content"]
    with pytest.raises(ValueError):
        s.cut_last_reply("not the start")
    assert s.cut_last_reply(full) is False  # all of it was heard: nothing to cut
    assert s.cut_last_reply("Reply 2") is True
    assert s.history[-1] == {"role": "assistant", "content": "Reply 2", "interrupted": True} and s.turns == 2
    assert s.get_cache_stats()["interruptions"] == 1
    sid = s.session_id
    s.close()
    record = HistoryStore(tmp_path).load(sid)
    assert record.messages[-1] == {"role": "assistant", "content": "Reply 2", "interrupted": True}
    assert record.undone[-1]["messages"][-1]["content"] == full  # the whole reply, on record


def test_cut_last_reply_with_nothing_heard_withdraws_the_turn_async(tmp_path):
    async def main() -> None:
        async with AsyncConversationSession(backend=FakeBackend(), sessions_dir=tmp_path,
                                            persist_kv_cache=False) as s:
            await s.chat("a")
            await s.chat("b")
            assert await s.cut_last_reply(0) is True and s.turns == 1
            assert await s.cut_last_reply(3) is True and s.history[-1]["content"] == "Rep"

    asyncio.run(main())


def test_a_title_set_while_a_snapshot_is_being_written_is_not_lost(tmp_path, monkeypatch):
    # The snapshot took the record before the title's journal line was written: emptying the
    # journal afterwards would drop the title (it is in neither file).
    import threading

    import conversation_session.stores._file as store_mod

    store = HistoryStore(tmp_path)
    w = store.create("m")
    assert w.append(0, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    w.flush()
    entered, release = threading.Event(), threading.Event()
    real = store_mod.atomic_write_bytes

    def slow(path, data, *a, **kw):
        if path.name.endswith(".json"):
            entered.set()
            release.wait(10)
        return real(path, data, *a, **kw)

    monkeypatch.setattr(store_mod, "atomic_write_bytes", slow)
    snap = threading.Thread(target=w._core.write_snapshot)
    snap.start()
    assert entered.wait(10)
    assert w.append(2, [], {"title": "late title"})  # its line is written while the snapshot waits
    release.set()
    snap.join(10)
    monkeypatch.setattr(store_mod, "atomic_write_bytes", real)
    assert store.load(w.session_id).title == "late title"  # before close: journal + snapshot
    w.close()
    assert store.load(w.session_id).title == "late title"

"""Schema 4 on the PostgreSQL store, against the real server: undo/retry (``rewind``) durable,
fenced and all-or-nothing; titles; search."""

from __future__ import annotations

import time

import psycopg
import pytest

import pg_server as _pg
from conversation_session import SessionLockedError, SessionRecord
from conversation_session._exceptions import SessionNotFoundError, StoreUnavailableError
from conversation_session.stores import _postgres as _pgstore
from conversation_session.stores._api import make_snippet
from conversation_session.stores._file import encode_json
from conversation_session.stores._postgres import PostgresStore, plan_rewind
from pg_server import PgServer

pg_server = _pg.pg_server
pg_url = _pg.pg_url


def _turn(i: int, tag: str = "") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}{tag}"}, {"role": "assistant", "content": f"answer {i}{tag}"}]


def _turns(n: int) -> list[dict[str, str]]:
    return [m for i in range(n) for m in _turn(i)]


@pytest.fixture
def store(pg_url: str):
    s = PostgresStore(pg_url, lease_ttl_s=15, connect_timeout_s=1)
    yield s
    s.close()


def _rows(url: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def _snapshot(record: SessionRecord) -> str:
    return encode_json(record.to_dict())


# -- rewind ----------------------------------------------------------------------------------------
def test_undo_and_retry_are_durable_across_a_reopen_and_say_what_they_withdrew(store, pg_url):
    w = store.create("m")
    assert w.append(0, _turns(3))
    assert w.rewind(4)  # undo: the last turn leaves the history
    assert w.record.messages == _turns(2)
    [entry] = w.record.undone
    assert entry["start"] == 4 and entry["messages"] == _turn(2) and entry["at"]
    # retry: the second turn is replaced by a new reply to the same question, in one write
    retried = [_turn(1)[0], {"role": "assistant", "content": "a better answer 1", "interrupted": True}]
    assert w.rewind(2, retried)
    assert w.record.messages == _turns(1) + retried
    assert [u["start"] for u in w.record.undone] == [4, 2]
    assert w.record.undone[1]["messages"] == _turn(1)
    assert w.append(4, _turn(7))  # appends go on after a rewind
    expected = w.record.to_dict()
    w.close()

    again, record = store.open(w.session_id)
    assert record.to_dict() == expected
    assert store.load(w.session_id).to_dict() == expected
    [info] = store.list_sessions()
    assert (info.turns, info.total_messages) == (3, 6)
    assert info.size_bytes == len(encode_json(record.messages).encode())  # the counts follow the rewind
    # the withdrawn rows are gone from messages, kept (numbered per session) in undone
    assert _rows(pg_url, "SELECT count(*) FROM conversation_session.messages WHERE session_id = %s",
                 (w.session_id,)) == [(6,)]
    assert _rows(pg_url, "SELECT seq, start FROM conversation_session.undone WHERE session_id = %s ORDER BY seq",
                 (w.session_id,)) == [(1, 4), (2, 2)]
    assert again.rewind(0)  # everything withdrawn: the session still exists, with its undone list
    again.close()
    emptied = store.load(w.session_id)
    assert emptied.messages == [] and len(emptied.undone) == 3


def test_rewind_keeps_nul_and_interrupted_and_drops_a_summary_that_covered_withdrawn_messages(store):
    odd = [{"role": "user", "content": "NUL \x00 here"}, {"role": "assistant", "content": "cut", "interrupted": True}]
    w = store.create("m")
    assert w.append(0, _turns(2) + odd, meta={"summary": {"text": "s", "covers": 4, "model": "m"}})
    assert w.rewind(4)  # the summary covers messages 0-3: none withdrawn, it stays
    assert w.record.summary is not None and w.record.undone[0]["messages"] == odd
    assert w.rewind(2)  # now it covered withdrawn messages: dropped, in memory and in the store
    assert w.record.summary is None
    loaded = store.load(w.session_id)
    assert loaded.summary is None and loaded.undone == w.record.undone
    assert loaded.undone[0]["messages"] == odd
    w.close()


def test_rewind_arguments_are_checked_before_anything_changes(store):
    w = store.create("m")
    assert w.append(0, _turns(1))
    before = _snapshot(w.record)
    with pytest.raises(ValueError):
        w.rewind(3)
    with pytest.raises(ValueError):
        w.rewind(-1)
    with pytest.raises(ValueError):
        w.rewind(0, [{"role": "robot", "content": "x"}])
    assert _snapshot(w.record) == before
    w.close()


def test_a_writer_that_lost_its_lease_cannot_rewind(pg_url):
    a_store = PostgresStore(pg_url, lease_ttl_s=1)
    b_store = PostgresStore(pg_url, lease_ttl_s=15)
    try:
        a = a_store.create("m")
        assert a.append(0, _turns(2))
        a_store._beat, beat = None, a_store._beat  # pause A's heartbeat: a paused process
        if beat is not None:
            beat.cancel()
        a_store._writers.discard(a)
        time.sleep(1.3)
        b, _record = b_store.open(a.session_id)  # the lease expired: B takes over
        before = _snapshot(a.record)
        assert a.rewind(2) is False
        assert isinstance(a.last_error, SessionLockedError)
        assert _snapshot(a.record) == before  # nothing changed in memory
        stored = b_store.load(a.session_id)
        assert stored.messages == _turns(2) and stored.undone == []  # nor in the store
        assert b.rewind(2)  # the holder can
        assert b_store.load(a.session_id).messages == _turns(1)
        b.close()
        a.close()
    finally:
        a_store.close()
        b_store.close()


def test_rewind_while_the_server_is_down_changes_nothing_and_works_once_it_is_back(pg_server: PgServer, store):
    w = store.create("m")
    assert w.append(0, _turns(3), meta={"summary": {"text": "s", "covers": 6, "model": "m"}})
    before = _snapshot(w.record)
    pg_server.stop("immediate")
    try:
        assert w.rewind(4) is False
        assert isinstance(w.last_error, StoreUnavailableError)
        assert _snapshot(w.record) == before  # messages, undone, summary all as they were
        assert w.append(6, _turn(3)) is False  # a turn kept in memory only
        with_pending = _snapshot(w.record)
        assert w.rewind(6) is False
        assert _snapshot(w.record) == with_pending
    finally:
        pg_server.start()
    # back: the rewind writes the pending turn first, then withdraws it, in one transaction
    assert w.rewind(6)
    assert w.last_error is None
    assert w.record.messages == _turns(3) and w.record.undone[0]["messages"] == _turn(3)
    assert w.record.summary is not None  # covers 6: nothing it covered was withdrawn
    loaded = store.load(w.session_id)
    assert loaded.to_dict() == w.record.to_dict()
    w.close()


def test_a_rewind_whose_commit_reply_was_lost_is_not_applied_twice(store):
    w = store.create("m")
    assert w.append(0, _turns(3))
    plan, after, _sizes = plan_rewind(w, 2, _turn(9), None)
    store.rewind_batch(w, plan)
    store.rewind_batch(w, plan)  # the same transaction again, as after a lost reply: nothing to do
    loaded = store.load(w.session_id)
    assert loaded.messages == after.messages == _turns(1) + _turn(9)
    assert len(loaded.undone) == 1
    w.close()


def test_a_schema_from_before_undo_is_migrated_and_its_sessions_rewind(pg_url):
    with PostgresStore(pg_url) as s:
        w = s.create("m")
        assert w.append(0, _turns(2))
        w.close()
    # The database as the previous release left it: no undone table, 0003 not applied.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE conversation_session.undone")
        conn.execute("DELETE FROM conversation_session.migrations WHERE name = '0003_title_undone'")
    with PostgresStore(pg_url) as s:
        w2, record = s.open(w.session_id)
        assert record.messages == _turns(2) and record.undone == [] and record.title is None
        assert w2.rewind(2)
        w2.close()
        assert len(s.load(w.session_id).undone) == 1
    names = [r[0] for r in _rows(pg_url, "SELECT name FROM conversation_session.migrations ORDER BY name")]
    assert names == [name for name, _ in _pgstore.MIGRATIONS]


# -- titles ------------------------------------------------------------------------------------------
def test_title_set_kept_cleared_and_renamed(store):
    w = store.create("m")
    assert w.append(0, _turn(0), meta={"title": "  Trip   to\nLisbon "})
    assert w.record.title == "Trip to Lisbon"  # cleaned as the store keeps it
    assert store.load(w.session_id).title == "Trip to Lisbon"
    assert w.append(2, _turn(1), meta={"system_prompt": "brief"})  # no "title" key: kept
    assert store.load(w.session_id).title == "Trip to Lisbon"
    assert store.list_sessions()[0].title == "Trip to Lisbon"
    with pytest.raises(SessionLockedError):
        store.set_title(w.session_id, "elsewhere")  # the writer names it instead
    assert w.append(4, _turn(2), meta={"title": None})  # an explicit None clears it
    assert store.load(w.session_id).title is None and w.record.title is None
    w.close()

    other = _session(store, _turn(9))
    assert store.newest_first()[0] == other
    store.set_title(w.session_id, "  Renamed\tlater ")
    assert store.load(w.session_id).title == "Renamed later"
    assert store.newest_first()[0] == w.session_id  # a rename is a change: newest now
    store.set_title(other, None)  # no change at all: the order stays
    assert store.newest_first()[0] == w.session_id
    assert store.list_sessions()[0].title == "Renamed later"
    w2, record = store.open(w.session_id)
    assert record.title == "Renamed later"
    assert w2.append(6, _turn(3))  # an append without a title keeps the rename
    w2.close()
    assert store.load(w.session_id).title == "Renamed later"
    store.set_title(w.session_id, "   ")  # blank removes it
    assert store.load(w.session_id).title is None
    with pytest.raises(SessionNotFoundError):
        store.set_title("no_such_session", "x")
    with pytest.raises(ValueError):
        store.set_title("../bad", "x")


def test_a_rename_made_while_a_writers_lease_had_lapsed_is_not_undone_by_its_next_append(pg_url):
    s = PostgresStore(pg_url, lease_ttl_s=1)
    try:
        w = s.create("m")
        assert w.append(0, _turn(0), meta={"title": "old"})
        s._beat, beat = None, s._beat
        if beat is not None:
            beat.cancel()
        s._writers.discard(w)
        time.sleep(1.3)  # expired, nobody took it over: a rename is allowed
        s.set_title(w.session_id, "new")
        assert w.append(2, _turn(1))  # renews the lease, keeps the stored title
        assert s.load(w.session_id).title == "new"
        w.close()
    finally:
        s.close()


def test_import_and_load_carry_title_and_undone(store):
    record = SessionRecord(session_id="moved_here", llm_model="m", messages=_turns(2), title="Moved",
                           undone=[{"at": "2026-01-01T10:00:00", "start": 2,
                                    "messages": [{"role": "user", "content": "NUL \x00"},
                                                 {"role": "assistant", "content": "x", "interrupted": True}]}])
    sid = store.import_record(record)
    assert sid == "moved_here"
    loaded = store.load(sid)
    assert loaded.to_dict() == {**record.to_dict(), "updated_at": loaded.updated_at}
    w, opened = store.open(sid)
    assert opened.undone == record.undone and opened.title == "Moved"
    assert w.rewind(2)  # numbered after the imported entry
    w.close()
    assert [u["start"] for u in store.load(sid).undone] == [2, 2]


# -- search ------------------------------------------------------------------------------------------
def _session(store: PostgresStore, messages: list[dict[str, str]], title: str | None = None) -> str:
    w = store.create("m")
    assert w.append(0, messages, meta={"title": title} if title else None)
    w.close()
    time.sleep(0.01)  # distinct updated_ts: the order is newest first
    return w.session_id


def test_search_escapes_like_wildcards_and_orders_newest_session_first(store):
    plain = _session(store, [{"role": "user", "content": "I am 1000 sure about snakeXcase"},
                             {"role": "assistant", "content": "back/slash? no: backXslash"}])
    special = _session(store, [{"role": "user", "content": "I am 100% sure"},
                               {"role": "assistant", "content": "use snake_case and a back\\slash"}],
                       title="Percent 100% talk")
    hits = store.search("100%")
    assert [(h.session_id, h.index, h.role) for h in hits] == [(special, -1, "title"), (special, 0, "user")]
    assert hits[0].snippet == "Percent 100% talk" and hits[0].title == "Percent 100% talk"
    assert hits[1].snippet == make_snippet("I am 100% sure", "100%")
    assert [(h.session_id, h.index) for h in store.search("e_c")] == [(special, 1)]  # not snakeXcase
    assert [(h.session_id, h.index) for h in store.search("K\\S")] == [(special, 1)]  # case-insensitive
    assert [h.session_id for h in store.search("sure")] == [special, plain]  # newest session first
    assert [(h.session_id, h.index) for h in store.search("%")] == [(special, -1), (special, 0)]  # a literal %
    assert store.search("zzz") == []
    for blank in ("", "  \n "):
        with pytest.raises(ValueError):
            store.search(blank)


def test_search_whitespace_runs_message_order_limit_and_not_undone(store):
    w = store.create("m")
    assert w.append(0, [{"role": "user", "content": "hello\n\n  world, first"},
                        {"role": "assistant", "content": "Hello world again"},
                        {"role": "user", "content": "helloworld is not it"},
                        {"role": "assistant", "content": "HELLO   WORLD at last"}])
    assert [h.index for h in store.search("hello world")] == [0, 1, 3]
    assert [h.index for h in store.search("  Hello \t World ", limit=2)] == [0, 1]
    assert store.search("hello world", limit=0) == store.search("hello world", limit=-1) == []
    assert w.rewind(2)  # withdrawn messages are not searched
    assert [h.index for h in store.search("hello world")] == [0, 1]
    w.close()
    assert store.search("at last") == []


def test_search_folds_case_beyond_ascii_and_skips_sessions_without_messages(store):
    sid = _session(store, [{"role": "user", "content": "Où est l'ÉCOLE ? ΣΟΦΙΑ"},
                           {"role": "assistant", "content": "ici"}], title="École")
    assert [(h.index, h.snippet) for h in store.search("école")] == [(-1, "École"), (0, "Où est l'ÉCOLE ? ΣΟΦΙΑ")]
    assert [h.index for h in store.search("σοφια")] == [0]
    w, _record = store.open(sid)
    assert w.rewind(0)  # every message withdrawn: the session is kept, but has nothing to find
    w.close()
    assert store.search("école") == []


# -- async -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True])
def test_search_only_within_the_given_sessions(pg_url, tmp_path, keyed):
    """``only=``: the service searches a caller's own sessions, however many hits others hold
    (plain sessions by the server, encrypted ones by the client)."""
    from conversation_session.cli import main as cli_main

    key = None
    if keyed:
        key = tmp_path / "key"
        assert cli_main(["keygen", str(key)]) == 0
    with PostgresStore(pg_url, encryption_key=key) as s:
        ids = []
        for n in range(3):
            w = s.create("m")
            w.append(0, _turn(n, " okapi"), {"title": f"okapi {n}"})
            w.close()
            ids.append(w.session_id)
        assert {h.session_id for h in s.search("okapi")} == set(ids)
        assert [(h.session_id, h.index) for h in s.search("okapi", only=[ids[1]])] == [
            (ids[1], -1), (ids[1], 0), (ids[1], 1)]
        assert s.search("okapi", only=[]) == []

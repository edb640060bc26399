"""The PostgreSQL store against a real server: schema, round trips, the lease and fencing,
moving sessions between the file store and PostgreSQL."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import pg_server as _pg
from conversation_session import HistoryStore, SessionLockedError, SessionRecord
from conversation_session._exceptions import SessionFormatError, SessionNotFoundError, StoreUnavailableError
from conversation_session.stores._api import SessionWriterAPI, StoreAPI
from conversation_session.stores._file import encode_json
from conversation_session.stores._postgres import MIGRATIONS, PostgresStore, redact_url
from pg_server import PgServer

# The shared server's fixtures (only conftest.py could share them otherwise).
pg_server = _pg.pg_server
pg_url = _pg.pg_url

TRICKY = [
    {"role": "system", "content": "你是一个有帮助的助手。"},
    {"role": "user", "content": 'quote " backslash \\ newline \n tab \t 你好 \u2028 🎉'},
    {"role": "assistant", "content": "", "interrupted": True},
    {"role": "user", "content": "NUL \x00 inside, and \x01 too"},
    {"role": "assistant", "content": "ok"},
]


def _turn(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


@pytest.fixture
def store(pg_url: str):
    s = PostgresStore(pg_url, lease_ttl_s=15)
    yield s
    s.close()


def _db(url: str) -> str:
    return url.rsplit("/", 1)[1]


def test_it_is_a_store(store):
    assert isinstance(store, StoreAPI)
    w = store.create("m")
    assert isinstance(w, SessionWriterAPI)
    w.close()


def test_round_trip_keeps_every_message_field_and_the_system_prompt(store):
    w = store.create("qwen2.5:3b")
    assert not w.persisted  # nothing written yet: a session without messages is not kept
    assert w.append(0, TRICKY[:3], meta={"system_prompt": "be brief"})
    assert w.persisted
    assert w.append(3, TRICKY[3:])
    assert w.record.messages == TRICKY
    loaded = store.load(w.session_id)
    assert loaded.messages == TRICKY
    assert loaded.system_prompt == "be brief"
    assert loaded.llm_model == "qwen2.5:3b"
    assert loaded.turns == 2
    [info] = store.list_sessions()
    assert (info.session_id, info.turns, info.total_messages) == (w.session_id, 2, 5)
    assert info.size_bytes == len(encode_json(TRICKY).encode())
    assert info.first_user_line == 'quote " backslash \\ newline '  # the first line, as the file store shows
    assert "sekret" not in info.location and info.location.startswith("postgresql://")
    w.close()
    w2, record = store.open(w.session_id)
    assert record.messages == TRICKY and record.system_prompt == "be brief"
    assert w2.append(5, _turn(9))
    w2.close()
    assert store.load(w.session_id).messages == TRICKY + _turn(9)


def test_append_at_the_wrong_start_or_with_bad_messages_is_a_value_error(store):
    w = store.create("m")
    assert w.append(0, _turn(0))
    with pytest.raises(ValueError, match="append at 1"):
        w.append(1, _turn(1))
    with pytest.raises(ValueError, match="role"):
        w.append(2, [{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="surrogate"):
        w.append(2, [{"role": "user", "content": "\ud800"}])
    with pytest.raises(ValueError, match="NUL"):
        w.append(2, _turn(1), meta={"system_prompt": "a\x00b"})
    assert w.append(2, _turn(1))
    assert store.load(w.session_id).messages == _turn(0) + _turn(1)
    w.close()


def test_a_turn_inserts_its_rows_and_never_rewrites_history(store, pg_server: PgServer, pg_url):
    w = store.create("m")
    assert w.append(0, _turn(0))
    q = "SELECT xmin::text, ctid::text FROM conversation_session.messages ORDER BY idx"
    import psycopg

    with psycopg.connect(pg_url) as conn:
        before = conn.execute(q).fetchall()
        for i in range(1, 30):
            assert w.append(2 * i, _turn(i))
        after = conn.execute(q).fetchall()
    assert after[:2] == before  # the first turn's row versions are untouched
    assert len(after) == 60
    w.close()


def test_close_without_messages_leaves_nothing_behind(store):
    w = store.create("m")
    assert store.is_locked(w.session_id)
    w.close()
    w.close()  # idempotent
    assert store.newest_first() == []
    assert store.list_sessions() == []


def test_a_second_open_is_refused_naming_the_holder_until_close(store, pg_url):
    w = store.create("m")
    assert w.append(0, _turn(0))
    other = PostgresStore(pg_url)
    try:
        with pytest.raises(SessionLockedError, match=w.holder) as info:
            other.open(w.session_id)
        assert info.value.holder == w.holder
        assert other.is_locked(w.session_id)
        with pytest.raises(SessionLockedError):
            other.delete(w.session_id)
        assert other.load(w.session_id).messages == _turn(0)  # reading needs no lease
        w.close()
        assert not other.is_locked(w.session_id)
        w2, rec = other.open(w.session_id)
        assert rec.messages == _turn(0)
        w2.close()
        assert other.delete(w.session_id) is True
        assert other.delete(w.session_id) is False
        with pytest.raises(SessionNotFoundError):
            other.open(w.session_id)
        with pytest.raises(FileNotFoundError):  # what callers of the file store catch
            other.load(w.session_id)
    finally:
        other.close()


def test_the_heartbeat_keeps_an_idle_writers_lease(pg_url):
    a, b = PostgresStore(pg_url, lease_ttl_s=1.0), PostgresStore(pg_url, lease_ttl_s=1.0)
    try:
        w = a.create("m")
        assert w.append(0, _turn(0))
        time.sleep(3.0)  # three TTLs without an append: only the heartbeat renews it
        with pytest.raises(SessionLockedError):
            b.open(w.session_id)
        assert w.append(2, _turn(1))
        w.close()
        w2, rec = b.open(w.session_id)
        assert len(rec.messages) == 4
        w2.close()
    finally:
        a.close()
        b.close()


def _expire(url: str, session_id: str) -> None:
    """What a paused process or a partition looks like from the database: no renewal for a TTL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE conversation_session.sessions SET lease_expires = now() - interval '1 second' "
                     "WHERE id = %s", (session_id,))


def test_a_writer_whose_lease_was_taken_over_can_never_append_again(pg_url):
    a, b = PostgresStore(pg_url), PostgresStore(pg_url)
    try:
        wa = a.create("m")
        assert wa.append(0, _turn(0))
        a.close()  # no heartbeat from a (a paused process renews nothing)
        _expire(pg_url, wa.session_id)
        wb, rec = b.open(wa.session_id)
        assert rec.messages == _turn(0)
        assert wb.gen == wa.gen + 1
        a = PostgresStore(pg_url)
        wa.store = a  # the paused process wakes up with working connections
        assert wa.append(2, _turn(1)) is False
        assert isinstance(wa.last_error, SessionLockedError)
        assert wb.holder in str(wa.last_error) or "taken over" in str(wa.last_error)
        assert wa.append(4, _turn(2)) is False  # and every later append
        assert wb.append(2, _turn(7))
        assert b.load(wa.session_id).messages == _turn(0) + _turn(7)
        wa.close()  # must not release b's lease
        assert b.is_locked(wa.session_id)
        wb.close()
    finally:
        a.close()
        b.close()


def test_an_expired_lease_nobody_took_is_renewed_by_the_next_append(store, pg_url):
    w = store.create("m")
    assert w.append(0, _turn(0))
    _expire(pg_url, w.session_id)
    assert not store.is_locked(w.session_id)
    assert w.append(2, _turn(1))
    assert store.is_locked(w.session_id)
    assert store.load(w.session_id).messages == _turn(0) + _turn(1)
    w.close()


def test_an_append_whose_reply_was_lost_is_not_written_twice(store):
    """The commit happened but the client never heard (the connection died after COMMIT): the
    writer still counts those messages as pending; the next append must skip, not repeat them."""
    w = store.create("m")
    assert w.append(0, _turn(0))
    assert w.append(2, _turn(1))
    w.durable = 2  # as if the second append's acknowledgement had been lost
    assert w.append(4, _turn(2))
    assert store.load(w.session_id).messages == _turn(0) + _turn(1) + _turn(2)
    assert store.list_sessions()[0].turns == 3
    w.close()


def test_a_writer_dropped_without_close_gives_its_lease_back(store):
    w = store.create("m")
    assert w.append(0, _turn(0))
    sid = w.session_id
    del w
    gc.collect()
    assert not store.is_locked(sid)


def test_a_forked_child_never_releases_its_parents_lease(store):
    w = store.create("m")
    assert w.append(0, _turn(0))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            w.close()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert store.is_locked(w.session_id)
    assert w.append(2, _turn(1))
    w.close()


def test_hostile_ids_are_refused_before_the_database_is_touched():
    store = PostgresStore("postgresql://nobody@127.0.0.1:1/nothing")  # nothing listens there
    for bad in ["../etc/passwd", "a b", "", "x" * 129, "a;DROP TABLE sessions", "é", None, "a\x00"]:
        for call in (store.load, store.open, store.delete, store.is_locked):
            with pytest.raises(ValueError):
                call(bad)  # type: ignore[arg-type]


def test_listing_is_newest_first_and_load_newest_skips_empty_and_excluded(store):
    ids = []
    for i in range(3):
        w = store.create("m")
        assert w.append(0, _turn(i))
        ids.append(w.session_id)
        w.close()
    empty = store.create("m")  # open, no messages yet: listed nowhere that needs a turn
    assert [i.session_id for i in store.list_sessions()] == ids[::-1]
    assert store.newest_first()[1:] == ids[::-1] or store.newest_first()[:3] == ids[::-1]
    newest = store.load_newest()
    assert newest is not None and newest.session_id == ids[2]
    newest = store.load_newest(exclude=[ids[2]])
    assert newest is not None and newest.session_id == ids[1]
    assert store.load_newest(exclude=ids) is None
    empty.close()


def test_import_keeps_the_id_when_free_and_validates_like_a_load(store):
    rec = SessionRecord(session_id="imported_1", llm_model="m", created_at="2025-10-24T12:00:00",
                        updated_at="2025-10-24T12:03:10", messages=TRICKY, system_prompt="sp")
    assert store.import_record(rec) == "imported_1"
    again = store.import_record(rec)
    assert again != "imported_1" and again.startswith("session_")
    for sid in ("imported_1", again):
        loaded = store.load(sid)
        assert (loaded.messages, loaded.system_prompt, loaded.created_at, loaded.updated_at) == \
            (TRICKY, "sp", "2025-10-24T12:00:00", "2025-10-24T12:03:10")
    with pytest.raises(SessionFormatError):
        store.import_record(SessionRecord(session_id="bad", llm_model="m",
                                          messages=[{"role": "robot", "content": "x"}]))
    with pytest.raises(SessionFormatError):
        store.import_record(SessionRecord(session_id="empty", llm_model="m", messages=[]))
    with pytest.raises(SessionFormatError, match="NUL"):
        store.import_record(SessionRecord(session_id="nul", llm_model="m\x00", messages=_turn(0)))
    # An imported session is an ordinary one: it can be opened and continued.
    w, record = store.open("imported_1")
    assert w.append(len(record.messages), _turn(5))
    w.close()


def test_sessions_move_file_to_postgres_and_back_with_nothing_lost(tmp_path, store):
    if not hasattr(HistoryStore, "import_record"):
        pytest.xfail("HistoryStore.import_record is not there yet (being added to the file store)")
    src = HistoryStore(tmp_path / "a")
    records = []
    for i in range(3):
        rec = SessionRecord(session_id=f"session_17300000{i:02d}", llm_model=f"model{i}",
                            created_at=f"2025-10-2{i}T12:00:00", updated_at=f"2025-10-2{i}T13:00:00",
                            messages=[*TRICKY, *_turn(i)], system_prompt="sp" if i else None)
        assert src.import_record(rec) == rec.session_id
        records.append(src.load(rec.session_id))
    for rec in records:
        assert store.import_record(rec) == rec.session_id
    back = HistoryStore(tmp_path / "b")
    for sid in store.newest_first():
        assert back.import_record(store.load(sid)) == sid
    for rec in records:
        for where in (store, back):
            got = where.load(rec.session_id)
            assert (got.messages, got.system_prompt, got.llm_model, got.created_at, got.updated_at) == \
                (rec.messages, rec.system_prompt, rec.llm_model, rec.created_at, rec.updated_at)
    # Listing order follows updated_at after an import, in both stores.
    assert [i.session_id for i in store.list_sessions()] == [r.session_id for r in records[::-1]]


def test_the_schema_is_created_once_even_when_two_processes_start_together(pg_url):
    code = textwrap.dedent(f"""
        import sys
        from conversation_session.stores._postgres import PostgresStore
        s = PostgresStore({pg_url!r})
        print(len(s.newest_first()), flush=True)
        s.close()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert out.strip() == "0"
    import psycopg

    with psycopg.connect(pg_url) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM conversation_session.migrations ORDER BY name")]
    assert names == [name for name, _ in MIGRATIONS]


def test_a_schema_from_a_newer_release_is_refused(pg_url):
    import psycopg

    PostgresStore(pg_url).close()  # the schema exists (first use migrates; close before first use is fine too)
    s = PostgresStore(pg_url)
    assert s.newest_first() == []
    s.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO conversation_session.migrations (name) VALUES ('9999_from_the_future')")
    with pytest.raises(StoreUnavailableError, match="newer"):
        PostgresStore(pg_url).newest_first()


def test_a_store_in_its_own_schema_sees_only_its_sessions(pg_url):
    a, b = PostgresStore(pg_url), PostgresStore(pg_url, schema="tenant_b")
    try:
        w = a.create("m")
        assert w.append(0, _turn(0))
        w.close()
        assert b.newest_first() == []
        assert a.newest_first() == [w.session_id]
    finally:
        a.close()
        b.close()
    with pytest.raises(ValueError, match="schema"):
        PostgresStore(pg_url, schema='x"; DROP')


def test_urls_are_shown_without_their_password():
    assert redact_url("postgresql://alice:s3cret@db.example:5433/chat?sslmode=require&password=x") == \
        "postgresql://alice@db.example:5433/chat?sslmode=require"
    assert redact_url("postgres://bob@h/db") == "postgres://bob@h/db"
    assert "s3cret" not in redact_url("host=h dbname=d user=u password=s3cret")
    assert PostgresStore("postgresql://u:pw@h/d").description == "postgresql://u@h/d"
    assert json.dumps(PostgresStore.from_url("postgresql://u:pw@h/d").description) == '"postgresql://u@h/d"'




def test_delete_takes_this_hosts_kv_file_with_the_session(pg_url, tmp_path, monkeypatch):
    """Deleting through the store itself (a library caller, not only the commands and the
    service) removes the session's KV file from this host's cache, as a folder's delete does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with PostgresStore(pg_url) as s:
        ids = []
        for i in range(2):
            w = s.create("m")
            w.append(0, _turn(i))
            w.close()
            ids.append(w.session_id)
            s.kv_path(w.session_id).parent.mkdir(parents=True, exist_ok=True)
            s.kv_path(w.session_id).write_bytes(b"kv state")
        assert s.delete(ids[0])
        assert not s.kv_path(ids[0]).exists() and s.kv_path(ids[1]).exists()

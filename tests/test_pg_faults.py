"""The PostgreSQL store when things go wrong, each against the real server: a restart
mid-conversation, a terminated connection, kill -9 of a writer, a paused writer, two processes
racing for one session, the database down at start, a statement timeout."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import psycopg
import pytest

import pg_server as _pg
from conversation_session import SessionLockedError
from conversation_session._exceptions import StoreUnavailableError
from conversation_session.stores._postgres import PostgresStore
from pg_server import PgServer, read, send, start_writer

pg_server = _pg.pg_server
pg_url = _pg.pg_url


def _turn(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]


def _turns(n: int) -> list[dict[str, str]]:
    return [m for i in range(n) for m in _turn(i)]


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_restart_mid_conversation_loses_nothing_and_writes_nothing_twice(pg_server: PgServer, pg_url, mode):
    """``immediate`` is a crash of the server (recovery from the WAL on start)."""
    store = PostgresStore(pg_url, connect_timeout_s=1)
    try:
        w = store.create("m")
        assert w.append(0, _turn(0))
        assert w.append(2, _turn(1))
        pg_server.stop(mode)
        t0 = time.monotonic()
        assert w.append(4, _turn(2)) is False
        assert time.monotonic() - t0 < 10
        assert isinstance(w.last_error, StoreUnavailableError)
        assert pg_url.split("@")[1] in str(w.last_error)
        assert w.record.messages == _turns(3)  # memory keeps the turn
        assert w.append(6, _turn(3)) is False  # still down: kept too
        pg_server.start()
        assert w.append(8, _turn(4))  # the first append after the restart writes everything
        assert w.last_error is None
        assert store.load(w.session_id).messages == _turns(5)
        assert store.list_sessions()[0].turns == 5
        w.close()
    finally:
        pg_server.start()
        store.close()


def test_a_terminated_connection_is_replaced_and_the_turn_saved(pg_server: PgServer, pg_url):
    store = PostgresStore(pg_url)
    try:
        w = store.create("m")
        assert w.append(0, _turn(0))
        assert pg_server.terminate_backends(pg_url.rsplit("/", 1)[1]) >= 1
        assert w.append(2, _turn(1))  # the dead connection is noticed, the append retried once
        assert pg_server.terminate_backends(pg_url.rsplit("/", 1)[1]) >= 1
        assert store.load(w.session_id).messages == _turns(2)
        assert w.append(4, _turn(2))
        assert store.load(w.session_id).messages == _turns(3)
        w.close()
    finally:
        store.close()


def test_kill_9_of_a_writer_loses_no_acknowledged_turn_and_its_lease_ends_within_the_ttl(pg_url):
    ttl = 1.5
    sid = "-"
    acked = 0
    store = PostgresStore(pg_url)
    try:
        for target in (7, 1, 23, 4):
            proc = start_writer(pg_url, sid, ttl)
            try:
                tag, sid, have = read(proc)
                assert tag == "open" and int(have) >= acked
                send(proc, "stream")
                for _ in range(target):
                    tag, count = read(proc)
                    assert tag == "ok"
                    acked = int(count)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            finally:
                _stop(proc)
            record = store.load(sid)
            assert len(record.messages) >= acked  # never fewer than acknowledged
            assert len(record.messages) % 2 == 0  # never half a turn
            assert record.messages == [m for i in range(len(record.messages) // 2) for m in (
                {"role": "user", "content": f"question {i} " + "x" * 50},
                {"role": "assistant", "content": f"answer {i} " + "y" * 200})]
            acked = len(record.messages)
            # The dead writer's lease is still live, then ends within the TTL.
            died = time.monotonic()
            with pytest.raises(SessionLockedError):
                store.open(sid)
            while True:
                try:
                    w, _ = store.open(sid)
                    break
                except SessionLockedError:
                    assert time.monotonic() - died < ttl + 1.0
                    time.sleep(0.05)
            w.close()
    finally:
        store.close()


def test_a_paused_writer_that_lost_its_lease_can_never_append_again(pg_url):
    """SIGSTOP past the TTL (a GC pause, a suspended VM), another host takes the session,
    SIGCONT: the old writer's appends are refused by the fencing check, forever."""
    store = PostgresStore(pg_url)
    proc = start_writer(pg_url, "-", 1.0)
    try:
        _tag, sid, _ = read(proc)
        send(proc, "turn")
        assert read(proc) == ["ok", "2"]
        proc.send_signal(signal.SIGSTOP)
        time.sleep(2.0)
        w, record = store.open(sid)  # the lease expired: this host takes over
        assert len(record.messages) == 2
        assert w.append(2, _turn(100))
        proc.send_signal(signal.SIGCONT)
        for _ in range(2):
            send(proc, "turn")
            reply = read(proc)
            assert reply[0] == "failed", reply
            assert "lease" in " ".join(reply) or "taken over" in " ".join(reply)
        assert w.append(4, _turn(101))
        loaded = store.load(sid)
        assert [m["content"] for m in loaded.messages[2:]] == ["question 100", "answer 100",
                                                               "question 101", "answer 101"]
        w.close()
    finally:
        _stop(proc)
        store.close()


def test_two_processes_racing_for_one_session_exactly_one_wins(pg_url):
    store = PostgresStore(pg_url)
    try:
        w = store.create("m")
        assert w.append(0, _turn(0))
        sid = w.session_id
        w.close()
        for _round in range(5):
            procs = [start_writer(pg_url, sid, 15.0, go=False) for _ in range(3)]
            try:
                time.sleep(1.0)  # all imported and connected-ready: now release them together
                for p in procs:
                    send(p, "go")
                replies = [read(p) for p in procs]
                winners = [r for r in replies if r[0] == "open"]
                losers = [r for r in replies if r[0] == "locked"]
                assert len(winners) == 1 and len(losers) == 2, replies
                assert all(r[1] != "None" for r in losers)  # the holder is named
                winner = procs[[r[0] for r in replies].index("open")]
                send(winner, "close")
                assert read(winner) == ["closed"]
            finally:
                for p in procs:
                    _stop(p)
    finally:
        store.close()


def test_database_down_at_start_is_a_fast_clear_error_without_the_password(pg_server: PgServer):
    port = _pg._free_port()  # nothing listens there
    url = f"postgresql://alice:s3cret-pw@127.0.0.1:{port}/chat"
    t0 = time.monotonic()
    store = PostgresStore(url)
    with pytest.raises(StoreUnavailableError) as info:
        store.create("m")
    assert time.monotonic() - t0 < 3
    msg = str(info.value)
    assert f"postgresql://alice@127.0.0.1:{port}/chat" in msg
    assert "s3cret" not in msg and "s3cret" not in repr(info.value.__cause__ or "")[:0]
    assert "running" in msg  # what to do
    # The same when the real server is stopped.
    db = pg_server.create_database()
    pg_server.stop()
    try:
        with pytest.raises(StoreUnavailableError, match="running"):
            PostgresStore(pg_server.url(db, password="pw2")).list_sessions()
    finally:
        pg_server.start()
        pg_server.drop_database(db)


def test_a_statement_timeout_fails_the_append_and_the_next_one_writes_everything(pg_url):
    store = PostgresStore(pg_url, statement_timeout_s=0.5)
    blocker = psycopg.connect(pg_url)
    try:
        w = store.create("m")
        assert w.append(0, _turn(0))
        # Another connection holds the session row: the append waits, then is cancelled.
        blocker.execute("SELECT 1 FROM conversation_session.sessions WHERE id = %s FOR UPDATE", (w.session_id,))
        t0 = time.monotonic()
        assert w.append(2, _turn(1)) is False
        assert 0.4 < time.monotonic() - t0 < 5
        assert isinstance(w.last_error, StoreUnavailableError)
        assert "statement_timeout_s=0.5" in str(w.last_error)
        blocker.rollback()
        assert w.append(4, _turn(2))
        assert store.load(w.session_id).messages == _turns(3)
        w.close()
    finally:
        blocker.close()
        store.close()


def test_concurrent_writers_on_one_store_share_a_small_pool(pg_url):
    store = PostgresStore(pg_url, pool_size=4)
    errors: list[BaseException] = []

    def chat(k: int) -> None:
        try:
            w = store.create("m")
            for i in range(20):
                assert w.append(2 * i, _turn(i))
            assert store.load(w.session_id).messages == _turns(20)
            w.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors[:3]
        infos = store.list_sessions()
        assert len(infos) == 20 and {i.turns for i in infos} == {20}
    finally:
        store.close()

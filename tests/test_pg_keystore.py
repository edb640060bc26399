"""The PostgreSQL store's keystore (docs/encryption.md, "PostgreSQL"), against a real server: a
backup of the session database taken before a deletion cannot read the deleted session; the
keys of deleted and rekeyed sessions leave the keystore, also after a crash; listings fetch
the keys in one query; the CLI's --keystore URL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import pg_server as _pg
from conversation_session import EncryptionKeyError, HistoryStore, SessionError
from conversation_session.cli import main as cli_main
from conversation_session.stores._crypto import load_key
from conversation_session.stores._postgres import PostgresStore
from pg_server import PgServer

pg_server = _pg.pg_server
pg_url = _pg.pg_url


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CONVERSATION_SESSION_KEY_FILE", raising=False)
    monkeypatch.delenv("CONVERSATION_SESSION_KEYSTORE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this host's KV folder


@pytest.fixture
def canary() -> str:
    return f"CANARY-{uuid.uuid4().hex[:12]}-purple-giraffe"


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "key"
    assert cli_main(["keygen", str(path)]) == 0
    return path


def _database(server: PgServer) -> Iterator[str]:
    name = server.create_database()
    yield server.url(name)
    server.start()
    with contextlib.suppress(Exception):
        server.drop_database(name)


@pytest.fixture
def ks_url(pg_server) -> Iterator[str]:
    """Another database on the same server: the keystore."""
    yield from _database(pg_server)


def _rows(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def _entries(ks: str) -> list[tuple[str, str]]:
    return sorted((r[0], r[1]) for r in _rows(ks, "SELECT session_id, entry_id FROM "
                                                  "conversation_session_keys.data_keys"))


def _data_key(url: str, sid: str) -> bytes:
    [(key,)] = _rows(url, "SELECT data_key FROM conversation_session.sessions WHERE id = %s", (sid,))
    return bytes(key)


def _session(store: PostgresStore, text: str) -> str:
    w = store.create("m")
    assert w.append(0, [{"role": "user", "content": text}, {"role": "assistant", "content": f"re {text}"}],
                    {"title": f"title {text}"})
    w.close()
    return w.session_id


def _backup(server: PgServer, url: str) -> str:
    """A copy of the session database as it is now (what a backup holds): CREATE DATABASE
    ... TEMPLATE, which needs the source without connections."""
    name = url.rsplit("/", 1)[1]
    backup = f"{name}_backup"
    server.terminate_backends(name)
    server.admin(f'CREATE DATABASE "{backup}" TEMPLATE "{name}"')
    return server.url(backup)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conversation_session", *argv], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("where", ["another database", "the same database", "none (inline)"])
def test_a_backup_taken_before_a_delete_cannot_read_the_deleted_session(pg_server, pg_url, ks_url, key_file,
                                                                        canary, where):
    keystore = {"another database": ks_url, "the same database": pg_url, "none (inline)": None}[where]
    with PostgresStore(pg_url, encryption_key=key_file, keystore=keystore) as store:
        doomed = _session(store, f"doomed {canary}")
        kept = _session(store, f"kept {canary}")
    if keystore is not None:
        assert _data_key(pg_url, doomed).startswith(b"keystore:")  # the row names its key, holds none
        assert [sid for sid, _ in _entries(keystore)] == sorted([doomed, kept])
    else:
        assert not _data_key(pg_url, doomed).startswith(b"keystore:")
    backup = _backup(pg_server, pg_url)
    try:
        # deleted by a real `sessions delete` process
        flags = ["--store", pg_url, "--key-file", str(key_file)] + (["--keystore", keystore] if keystore else [])
        done = _cli(*flags, "sessions", "delete", doomed, "--yes")
        assert done.returncode == 0, done.stderr
        if keystore is not None:
            assert [sid for sid, _ in _entries(keystore)] == [kept]  # its key left the keystore
            assert _rows(pg_url, "SELECT * FROM conversation_session.dropped_keys") == []
        with PostgresStore(backup, encryption_key=key_file, keystore=keystore) as old:
            assert [m["content"] for m in old.load(kept).messages] == [f"kept {canary}", f"re kept {canary}"]
            infos = {i.session_id: i for i in old.list_sessions()}
            assert infos[kept].title == f"title kept {canary}"
            if keystore is None:  # the wrapped key sits in the backup's row: readable for ever
                assert old.load(doomed).messages[0]["content"] == f"doomed {canary}"
            else:
                with pytest.raises(EncryptionKeyError, match=r"not in the keystore.*deleted"):
                    old.load(doomed)
                assert infos[doomed].first_user_line == "(encrypted)" and infos[doomed].title is None
                assert old.load_newest().session_id == kept  # type: ignore[union-attr]
    finally:
        pg_server.drop_database(backup.rsplit("/", 1)[1])


def test_a_missing_entry_touches_nothing(pg_url, ks_url, key_file, canary, tmp_path):
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:
        sid = _session(store, canary)
    _rows(ks_url, "DELETE FROM conversation_session_keys.data_keys")
    # everything but lease_gen (a failed open takes the lease and gives it back at once)
    row = ("SELECT id, updated_at, updated_ts, system_prompt, title, turns, message_count, bytes, first_user_line, "
           "summary::text, holder, lease_expires, data_key FROM conversation_session.sessions")
    before = _rows(pg_url, row)
    messages = _rows(pg_url, "SELECT * FROM conversation_session.messages ORDER BY idx")
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:
        for attempt in (store.load, store.open):
            with pytest.raises(EncryptionKeyError, match="its data key is not in the keystore"):
                attempt(sid)
        assert store.list_sessions()[0].first_user_line == "(encrypted)"
        assert store.search(canary) == []
    other = tmp_path / "other"
    assert cli_main(["keygen", str(other)]) == 0
    with PostgresStore(pg_url, encryption_key=other, keystore=ks_url) as new:
        new.keyring.also_read_with(load_key(key_file))  # type: ignore[union-attr]
        with pytest.raises(EncryptionKeyError, match="its data key is not in the keystore"):
            new.rekey(sid)
    assert len(_entries(ks_url)) == 0  # the rekey's new entry did not stay either
    assert _rows(pg_url, row) == before  # the lease given back too
    assert _rows(pg_url, "SELECT * FROM conversation_session.messages ORDER BY idx") == messages
    # without the keystore, the reference says where the key is
    with PostgresStore(pg_url, encryption_key=key_file) as store, pytest.raises(EncryptionKeyError,
                                                                                  match="give the keystore"):
        store.load(sid)


def test_a_listing_fetches_every_key_in_one_keystore_query(pg_url, ks_url, key_file):
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:
        made = {_session(store, f"text {i}") for i in range(25)}
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:
        assert store.keystore is not None
        queries: list[str] = []
        run = store.keystore._run
        store.keystore._run = lambda action, fn: (queries.append(action), run(action, fn))[1]  # type: ignore[method-assign]
        infos = store.list_sessions()
        assert {i.session_id for i in infos} == made and all(i.title.startswith("title text") for i in infos)
        assert queries == ["read data keys"]
        queries.clear()
        store.list_sessions()
        assert [store.load(sid).title for sid in made]  # the keys are known now
        assert queries == []


def test_a_deletion_without_the_keystore_is_finished_by_the_next_one_or_doctor_fix(pg_url, ks_url, key_file):
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:
        first, second, third = (_session(store, f"s{i}") for i in range(3))
    # A deletion that cannot reach the keystore (not given: a crash after the commit is the same
    # state): the row goes, the dropped reference is recorded in the session database.
    with PostgresStore(pg_url) as bare:
        assert bare.delete(first)
    [(sid, ref)] = _rows(pg_url, "SELECT session_id, ref FROM conversation_session.dropped_keys")
    assert sid == first and bytes(ref).startswith(b"keystore:")
    assert len(_entries(ks_url)) == 3
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:
        assert store.delete(second)  # finishes the earlier one too
    assert [s for s, _ in _entries(ks_url)] == [third]
    assert _rows(pg_url, "SELECT * FROM conversation_session.dropped_keys") == []
    with PostgresStore(pg_url) as bare:
        assert bare.delete(third)
    assert cli_main(["--store", pg_url, "--keystore", ks_url, "doctor", "--fix"]) == 0
    assert _entries(ks_url) == [] and _rows(pg_url, "SELECT * FROM conversation_session.dropped_keys") == []


def test_an_entry_no_row_names_is_an_orphan_key_for_doctor(pg_url, ks_url, key_file, capsys):
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:
        sid = _session(store, "kept")
        assert store.keyring is not None
        # a crash between the entry's commit and the row's insert (create, import, rekey)
        stray = store.keyring.new_cipher("session_crashed")
        assert store._put_key(stray)
    _rows(ks_url, "UPDATE conversation_session_keys.data_keys SET created_at = now() - interval '2 hours'")
    assert cli_main(["--store", pg_url, "--key-file", str(key_file), "--keystore", ks_url, "doctor"]) == 1
    out = capsys.readouterr()
    assert "orphan-key" in out.out and "session_crashed." in out.out and "doctor --fix" in out.err
    assert len(_entries(ks_url)) == 2  # reported only
    assert cli_main(["--store", pg_url, "--key-file", str(key_file), "--keystore", ks_url, "doctor", "--fix"]) == 0
    assert "removed" in capsys.readouterr().out
    assert [s for s, _ in _entries(ks_url)] == [sid]  # the live session's key stays
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:
        assert store.load(sid).title == "title kept"


def test_rekey_moves_inline_keys_to_the_keystore_and_kill_9_loses_nothing(pg_url, ks_url, key_file, tmp_path):
    made = {}
    with PostgresStore(pg_url, encryption_key=key_file) as store:  # before a keystore was configured
        for i in range(10):
            made[_session(store, f"s{i}")] = [f"s{i}", f"re s{i}"]
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as store:  # inline rows still load
        assert [m["content"] for m in store.load(next(iter(made))).messages] == made[next(iter(made))]
        sid = _session(store, "new one")  # new ones go to the keystore
        made[sid] = ["new one", "re new one"]
        assert _data_key(pg_url, sid).startswith(b"keystore:")
    new = tmp_path / "new"
    assert cli_main(["keygen", str(new)]) == 0
    code = textwrap.dedent(f"""
        from conversation_session.cli import main
        print("go", flush=True)
        while True:
            main(["--store", {pg_url!r}, "--keystore", {ks_url!r}, "--key-file", {str(key_file)!r},
                  "sessions", "rekey", "--new-key-file", {str(new)!r}])
            main(["--store", {pg_url!r}, "--keystore", {ks_url!r}, "--key-file", {str(new)!r},
                  "sessions", "rekey", "--new-key-file", {str(key_file)!r}])
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_entries(ks_url)) < 14:  # some under the other key
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    both = PostgresStore(pg_url, encryption_key=new, keystore=ks_url)
    both.keyring.also_read_with(load_key(key_file))  # type: ignore[union-attr]
    for sid, texts in made.items():
        assert [m["content"] for m in both.load(sid).messages] == texts
    both.close()
    # finished: every row names an entry under the new key; no inline key left
    assert cli_main(["--store", pg_url, "--keystore", ks_url, "--key-file", str(key_file), "sessions", "rekey",
                     "--new-key-file", str(new)]) == 0
    assert cli_main(["--store", pg_url, "--keystore", ks_url, "--key-file", str(new), "sessions", "rekey",
                     "--new-key-file", str(new)]) == 0
    with PostgresStore(pg_url, encryption_key=new, keystore=ks_url) as store:
        for sid, texts in made.items():
            assert _data_key(pg_url, sid).startswith(b"keystore:")
            assert [m["content"] for m in store.load(sid).messages] == texts
        # what the kill left (a new entry its transaction never committed) goes with doctor --fix
        store.orphan_keys(fix=True, min_age_s=0)
    assert sorted(s for s, _ in _entries(ks_url)) == sorted(made)  # one key per session, no more
    with PostgresStore(pg_url, encryption_key=key_file, keystore=ks_url) as old, pytest.raises(EncryptionKeyError):
        old.load(next(iter(made)))


def test_the_keystore_url_is_checked_and_taken_from_the_environment(pg_url, ks_url, key_file, tmp_path,
                                                                    monkeypatch, capsys):
    with pytest.raises(SessionError, match="PostgreSQL database"):
        PostgresStore(pg_url, encryption_key=key_file, keystore=str(tmp_path / "folder"))
    with pytest.raises(SessionError, match="is for the PostgreSQL store"):
        HistoryStore(tmp_path / "sessions", encryption_key=key_file, keystore=ks_url)
    assert cli_main(["--store", pg_url, "--keystore", str(tmp_path / "dir"), "sessions", "list"]) == 1
    assert "postgresql://" in capsys.readouterr().err
    monkeypatch.setenv("CONVERSATION_SESSION_KEYSTORE", ks_url)
    with PostgresStore(pg_url, encryption_key=key_file) as store:
        sid = _session(store, "from the environment")
    assert [s for s, _ in _entries(ks_url)] == [sid]
    # a folder store leaves a PostgreSQL keystore in the environment alone: its keys go beside the key file
    folder = HistoryStore(tmp_path / "sessions", encryption_key=key_file)
    assert folder.keystore is not None and folder.keystore.directory == Path(f"{key_file}.keystore")
    monkeypatch.setenv("CONVERSATION_SESSION_KEYSTORE", str(tmp_path / "dir"))
    with PostgresStore(pg_url, encryption_key=key_file) as store:  # a folder there is a folder's keystore
        assert store.keystore is None


def test_serve_with_a_postgresql_keystore_keeps_keys_there_and_a_delete_removes_them(pg_url, ks_url, key_file,
                                                                                     sessions_dir, canary):
    """`serve --store URL --key-file K --keystore URL2` as a real process: the session's data
    key is in the keystore database, its row names it, and `DELETE /v1/sessions/{id}` (the
    web page's delete) removes both."""
    import httpx

    from test_service import service

    with service(sessions_dir, "--store", pg_url, "--key-file", str(key_file), "--keystore", ks_url) as srv:
        sid = httpx.post(f"{srv.url}/v1/sessions", timeout=10).json()["session_id"]
        reply = httpx.post(f"{srv.url}/v1/sessions/{sid}/messages", json={"text": f"kept {canary}"}, timeout=30)
        assert reply.status_code == 200 and reply.json()["figures"]["saved"], reply.text
        [(store_id,)] = _rows(pg_url, "SELECT id FROM conversation_session.sessions")
        assert _data_key(pg_url, store_id).startswith(b"keystore:")
        assert [s for s, _ in _entries(ks_url)] == [store_id]
        assert httpx.get(f"{srv.url}/v1/sessions/{sid}", timeout=10).json()["history"][0]["content"] == \
            f"kept {canary}"
        assert httpx.delete(f"{srv.url}/v1/sessions/{sid}", timeout=10).status_code in (200, 204)
    assert _entries(ks_url) == []
    assert _rows(pg_url, "SELECT id FROM conversation_session.sessions") == []

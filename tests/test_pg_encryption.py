"""Encryption at rest in the PostgreSQL store (docs/encryption.md), against a real server: what
reaches the server's disk (its data files and its write-ahead log, read raw), what the key
opens, what is refused, rekey."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import pg_server as _pg
from conversation_session import (
    ConversationSession,
    EncryptionKeyError,
    FakeBackend,
    HistoryStore,
    SessionFormatError,
    SessionRecord,
)
from conversation_session.cli import main as cli_main
from conversation_session.stores._crypto import load_key
from conversation_session.stores._postgres import PostgresStore
from pg_server import PgServer

pg_server = _pg.pg_server
pg_url = _pg.pg_url


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CONVERSATION_SESSION_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # this host's KV folder


@pytest.fixture
def canary() -> str:
    return f"CANARY-{uuid.uuid4().hex[:12]}-purple-giraffe"  # unique: the WAL is shared by every test


def _keygen(path: Path) -> Path:
    assert cli_main(["keygen", str(path)]) == 0
    return path


@pytest.fixture
def key_file(tmp_path) -> Path:
    return _keygen(tmp_path / "key")


def _raw_database(server: PgServer, url: str) -> dict[str, bytes]:
    """Every file of the database and the whole write-ahead log, after a checkpoint: what a
    stolen disk of the server shows."""
    dbname = url.rsplit("/", 1)[1]
    server.admin("CHECKPOINT")
    [(oid,)] = server.admin("SELECT oid FROM pg_database WHERE datname = %s", (dbname,))
    files: dict[str, bytes] = {}
    for sub in (server.datadir / "base" / str(oid), server.datadir / "pg_wal"):
        for p in sub.rglob("*"):
            if p.is_file():
                files[str(p.relative_to(server.datadir))] = p.read_bytes()
    assert any(name.startswith("pg_wal") for name in files) and len(files) > 10
    return files


def _assert_absent(files: dict[str, bytes], canary: str) -> None:
    for name, data in files.items():
        for form in (canary.encode(), json.dumps(canary).encode(), canary.encode("utf-16-le")):
            assert form not in data, f"{name} holds the canary in plaintext"


def _tool_turn(canary: str) -> list[dict]:
    return [
        {"role": "user", "content": f"what is the weather in {canary}?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "weather", "arguments": json.dumps({"city": canary})}}]},
        {"role": "tool", "content": f"sunny in {canary}", "tool_call_id": "c1", "name": "weather"},
        {"role": "assistant", "content": f"It is sunny in {canary}.", "interrupted": True},
    ]


def test_the_canary_never_reaches_the_servers_disk_and_comes_back_with_the_key(pg_server, pg_url, key_file,
                                                                              canary):
    store = PostgresStore(pg_url, encryption_key=key_file)
    w = store.create("qwen2.5:3b")
    sid = w.session_id
    system = {"role": "system", "content": f"system {canary}"}
    assert w.append(0, [system, *_tool_turn(canary)],
                    {"title": f"title {canary}", "system_prompt": f"system {canary}",
                     "summary": {"text": f"summary {canary}", "covers": 2, "model": "m"}})
    assert w.append(5, [{"role": "user", "content": f"undone {canary}"},
                        {"role": "assistant", "content": f"undone reply {canary}"}])
    assert w.rewind(5, [{"role": "user", "content": f"retried {canary}"},
                        {"role": "assistant", "content": "ok"}])
    w.close()
    store.set_title(sid, f"renamed {canary}")
    _assert_absent(_raw_database(pg_server, pg_url), canary)

    record = PostgresStore(pg_url, encryption_key=key_file).load(sid)
    assert record.messages[1:5] == _tool_turn(canary)
    assert record.messages[5]["content"] == f"retried {canary}"
    assert record.system_prompt == f"system {canary}" and record.title == f"renamed {canary}"
    assert record.summary is not None and record.summary["text"] == f"summary {canary}"
    assert [m["content"] for m in record.undone[0]["messages"]] == [f"undone {canary}", f"undone reply {canary}"]
    [info] = store.list_sessions()
    assert info.encrypted and info.title == f"renamed {canary}" and info.first_user_line.endswith(f"{canary}?")
    assert info.turns == 2
    hits = store.search(canary)
    assert [(h.session_id, h.index) for h in hits] == [(sid, -1), (sid, 0), (sid, 1), (sid, 3), (sid, 4), (sid, 5)]
    store.close()


def test_without_the_key_an_encrypted_session_is_listed_as_such_and_not_opened(pg_url, key_file, tmp_path, canary):
    with PostgresStore(pg_url, encryption_key=key_file) as store:
        w = store.create("m")
        w.append(0, [{"role": "user", "content": f"secret {canary}"}, {"role": "assistant", "content": "ok"}],
                 {"title": f"t {canary}"})
        w.close()
        sid = w.session_id
    before = _pg.shared_server().admin("SELECT 1")  # the server is up
    assert before
    for key in (None, _keygen(tmp_path / "other")):
        with PostgresStore(pg_url, encryption_key=key) as other:
            with pytest.raises(EncryptionKeyError, match="encrypted"):
                other.load(sid)
            with pytest.raises(EncryptionKeyError):
                other.open(sid)
            assert not other.is_locked(sid)  # the failed open gave its lease back
            [info] = other.list_sessions()
            assert info.encrypted and info.first_user_line == "(encrypted)" and info.title is None
            assert other.search(canary) == []
            assert other.load_newest() is None  # skipped, as the file store skips what it cannot read
    with PostgresStore(pg_url, encryption_key=key_file) as store:
        assert store.load(sid).messages[0]["content"] == f"secret {canary}"  # nothing was touched


def test_plain_sessions_stay_plain_with_a_key_and_new_ones_are_encrypted(pg_url, key_file):
    with PostgresStore(pg_url) as plain:
        w = plain.create("m")
        w.append(0, [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "ok"}])
        w.close()
    with PostgresStore(pg_url, encryption_key=key_file) as keyed:
        w, _record = keyed.open(w.session_id)
        w.append(2, [{"role": "user", "content": "still plain"}, {"role": "assistant", "content": "ok"}])
        w.close()
        assert [i.encrypted for i in keyed.list_sessions()] == [False]
        assert [h.index for h in keyed.search("still plain")] == [2]  # the server searched it
    with PostgresStore(pg_url) as plain:
        assert len(plain.load(w.session_id).messages) == 4


def _session_rows(url: str, sid: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT idx, content FROM conversation_session.messages WHERE session_id = %s "
                            "ORDER BY idx", (sid,)).fetchall()


def _sql(url: str, statement: str, params: tuple = ()) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


@pytest.mark.parametrize("how", ["flip", "swap", "copy_from_another_session"])
def test_an_altered_row_is_refused_never_loaded_altered(pg_url, key_file, how):
    store = PostgresStore(pg_url, encryption_key=key_file)
    ids = []
    for n in range(2):
        w = store.create("m")
        w.append(0, [{"role": "user", "content": f"question {n}"}, {"role": "user", "content": f"again {n}"}])
        w.close()
        ids.append(w.session_id)
    sid, other = ids
    rows = _session_rows(pg_url, sid)
    if how == "flip":
        text = rows[0][1]
        flipped = text[:20] + ("A" if text[20] != "A" else "B") + text[21:]
        _sql(pg_url, "UPDATE conversation_session.messages SET content = %s WHERE session_id = %s AND idx = 0",
             (flipped, sid))
    elif how == "swap":
        _sql(pg_url, "UPDATE conversation_session.messages SET content = CASE idx WHEN 0 THEN %s ELSE %s END "
                     "WHERE session_id = %s", (rows[1][1], rows[0][1], sid))
    else:
        theirs = _session_rows(pg_url, other)
        _sql(pg_url, "UPDATE conversation_session.messages SET content = %s WHERE session_id = %s AND idx = 0",
             (theirs[0][1], sid))
    with pytest.raises(SessionFormatError, match="fails authentication"):
        store.load(sid)
    assert store.load(other).messages[0]["content"] == "question 1"
    store.close()


def test_the_session_classes_chat_undo_and_resume_encrypted(pg_server, pg_url, key_file, canary):
    with ConversationSession(backend=FakeBackend(), store=pg_url, encryption_key=key_file,
                             system_prompt=f"be brief {canary}") as s:
        assert s.chat(f"first {canary}").saved
        s.chat(f"second {canary}")
        s.undo()
        sid = s.session_id
    _assert_absent(_raw_database(pg_server, pg_url), canary)
    with ConversationSession(backend=FakeBackend(), store=pg_url, encryption_key=key_file) as s:
        s.load_history(sid)
        assert [m["content"] for m in s.history if m["role"] == "user"] == [f"first {canary}"]
        s.chat(f"third {canary}")
    with pytest.raises(EncryptionKeyError):
        ConversationSession(backend=FakeBackend(), store=pg_url).load_history(sid)


def test_import_with_a_key_stores_the_session_encrypted(pg_server, pg_url, key_file, canary, tmp_path):
    record = SessionRecord(session_id="session_1700000000", llm_model="m", system_prompt=f"s {canary}",
                           messages=[{"role": "user", "content": f"imported {canary}"},
                                     {"role": "assistant", "content": "ok"}],
                           title=f"t {canary}",
                           undone=[{"at": "2026-01-01T00:00:00", "start": 2,
                                    "messages": [{"role": "user", "content": f"gone {canary}"}]}])
    with PostgresStore(pg_url, encryption_key=key_file) as store:
        sid = store.import_record(record)
        _assert_absent(_raw_database(pg_server, pg_url), canary)
        back = store.load(sid)
    assert back.messages == record.messages and back.title == record.title
    assert back.undone[0]["messages"] == record.undone[0]["messages"]


# -- rekey ---------------------------------------------------------------------------------------------
def _fill(url: str, key: Path | None, n: int) -> dict[str, list[str]]:
    out = {}
    with PostgresStore(url, encryption_key=key) as store:
        for i in range(n):
            w = store.create("m")
            texts = [f"s{i} m{j}" for j in range(4)]
            w.append(0, [{"role": "user", "content": t} for t in texts], {"title": f"title {i}"})
            if i % 2:
                w.rewind(2, [{"role": "user", "content": f"s{i} retried"}])
                texts = [*texts[:2], f"s{i} retried"]
            w.close()
            out[w.session_id] = texts
    return out


def test_sessions_rekey_on_postgresql_puts_every_session_under_the_new_key(pg_url, key_file, tmp_path, capsys):
    made = _fill(pg_url, key_file, 3)
    made.update(_fill(pg_url, None, 1))  # a plain one is encrypted too
    new = _keygen(tmp_path / "new")
    assert cli_main(["--store", pg_url, "--key-file", str(key_file), "sessions", "rekey",
                     "--new-key-file", str(new)]) == 0
    assert "rekeyed 4 session(s)" in capsys.readouterr().out
    with PostgresStore(pg_url, encryption_key=new) as store:
        for sid, texts in made.items():
            assert [m["content"] for m in store.load(sid).messages] == texts
        assert all(i.encrypted for i in store.list_sessions())
    with PostgresStore(pg_url, encryption_key=key_file) as old:
        with pytest.raises(EncryptionKeyError):
            old.load(next(iter(made)))
    assert cli_main(["--store", pg_url, "--key-file", str(new), "sessions", "rekey",
                     "--new-key-file", str(new)]) == 0
    assert "0 session(s); 4 already" in capsys.readouterr().out


def test_rekey_skips_a_session_open_elsewhere(pg_url, key_file, tmp_path):
    [sid] = _fill(pg_url, key_file, 1)
    holder = PostgresStore(pg_url, encryption_key=key_file)
    w, _ = holder.open(sid)
    new = PostgresStore(pg_url, encryption_key=_keygen(tmp_path / "new"))
    new.keyring.also_read_with(load_key(key_file))
    with pytest.raises(Exception, match="open for writing"):
        new.rekey(sid)
    w.close()
    assert new.rekey(sid) is True
    holder.close()
    new.close()


def test_rekey_interrupted_by_kill_9_loses_nothing(pg_url, key_file, tmp_path):
    made = _fill(pg_url, key_file, 12)
    new = _keygen(tmp_path / "new")
    code = textwrap.dedent(f"""
        import sys
        from conversation_session.cli import main
        print("go", flush=True)
        while True:
            main(["--store", {pg_url!r}, "--key-file", {str(key_file)!r}, "sessions", "rekey",
                  "--new-key-file", {str(new)!r}])
            main(["--store", {pg_url!r}, "--key-file", {str(new)!r}, "sessions", "rekey",
                  "--new-key-file", {str(key_file)!r}])
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
        time.sleep(2.0)  # some sessions rekeyed one way, some the other, one maybe mid-transaction
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    both = PostgresStore(pg_url, encryption_key=new)
    both.keyring.also_read_with(load_key(key_file))
    for sid, texts in made.items():
        assert [m["content"] for m in both.load(sid).messages] == texts
    both.close()


def test_a_file_session_moves_to_postgresql_encrypted(pg_server, pg_url, key_file, sessions_dir, tmp_path, canary):
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, encryption_key=key_file,
                             persist_kv_cache=False) as s:
        s.chat(f"moving {canary}")
        sid = s.session_id
    record = HistoryStore(sessions_dir, encryption_key=key_file).load(sid)
    with PostgresStore(pg_url, encryption_key=key_file) as store:
        new_id = store.import_record(record)
        assert store.load(new_id).messages == record.messages
    _assert_absent(_raw_database(pg_server, pg_url), canary)


# -- the service ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["postgresql", "folder"])
def test_serve_with_a_key_stores_nothing_readable_real_process(pg_server, pg_url, key_file, sessions_dir, canary,
                                                               where):
    """Native sessions with a persona, and the Ollama API's chat: neither the store nor the
    service's ownership table (which keeps a persona until the first turn) holds plaintext."""
    import httpx

    from test_service import service

    store = ("--store", pg_url) if where == "postgresql" else ()
    with service(sessions_dir, *store, "--key-file", str(key_file)) as srv:
        made = httpx.post(f"{srv.url}/v1/sessions", json={"system_prompt": f"persona {canary}"}, timeout=10)
        assert made.status_code in (200, 201), made.text
        sid = made.json()["session_id"]
        idle = httpx.post(f"{srv.url}/v1/sessions", json={"system_prompt": f"idle persona {canary}"}, timeout=10)
        assert idle.status_code in (200, 201), idle.text  # no turn yet: the persona is only in the table
        reply = httpx.post(f"{srv.url}/v1/sessions/{sid}/messages", json={"text": f"served {canary}"}, timeout=30)
        assert reply.status_code == 200 and reply.json()["figures"]["saved"], reply.text
        ollama = httpx.post(f"{srv.url}/api/chat", timeout=30, json={
            "model": "fake", "stream": False, "messages": [{"role": "user", "content": f"ollama {canary}"}]})
        assert ollama.status_code == 200, ollama.text
        listed = httpx.get(f"{srv.url}/v1/sessions", timeout=10).json()["sessions"]
        assert f"served {canary}" in [x["first_user_line"] for x in listed]
        got = httpx.get(f"{srv.url}/v1/sessions/{sid}", timeout=10).json()
        assert canary in json.dumps(got)  # read back through the key
        if where == "postgresql":
            _assert_absent(_raw_database(pg_server, pg_url), canary)
        for p in sessions_dir.rglob("*"):
            if p.is_file():
                _assert_absent({p.name: p.read_bytes()}, canary)


# -- this host's KV file of a PostgreSQL session ----------------------------------------------------------
@pytest.mark.model
def test_the_kv_file_of_a_postgresql_session_is_encrypted_and_restored_with_the_key(pg_url, key_file, tmp_path,
                                                                                   canary):
    from helpers import run_python

    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    sid = run_python(f"""
        from conversation_session import ConversationSession
        with ConversationSession(max_tokens=8, temperature=0, store={pg_url!r},
                                 encryption_key={str(key_file)!r}) as s:
            s.chat("Remember the word {canary}. " * 3)
            print(s.session_id)
    """, env=env).stdout.split()[-1]
    [kv] = list((tmp_path / "cache").rglob(f"{sid}.kv"))
    raw = kv.read_bytes()
    assert raw[:4] == b"CSKE" and canary.encode() not in raw
    resume = f"""
        import json
        from conversation_session import ConversationSession
        with ConversationSession(max_tokens=4, temperature=0, store={pg_url!r}, encryption_key={{key}}) as s:
            s.backend.reset_cache()
            try:
                s.load_history({sid!r})
            except Exception as exc:
                print(json.dumps({{"error": type(exc).__name__}}))
            else:
                s.chat("Which word?")
                st = s.get_cache_stats()
                print(json.dumps({{"restored": st.get("kv_restored")}}))
    """
    with_key = json.loads(run_python(resume.replace("{key}", repr(str(key_file))), env=env).stdout.splitlines()[-1])
    assert with_key["restored"] is True
    without = json.loads(run_python(resume.replace("{key}", "None"), env=env).stdout.splitlines()[-1])
    assert without == {"error": "EncryptionKeyError"}


def test_the_cli_lists_searches_and_checks_encrypted_postgresql_sessions(pg_url, key_file, capsys, canary):
    chat = subprocess.run([sys.executable, "-m", "conversation_session", "--store", pg_url, "--key-file",
                           str(key_file), "--backend", "fake", f"hello {canary}"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and canary in chat.stdout, chat.stderr
    assert cli_main(["--store", pg_url, "--key-file", str(key_file), "sessions", "list"]) == 0
    assert f"hello {canary}" in capsys.readouterr().out
    assert cli_main(["--store", pg_url, "sessions", "list"]) == 0
    out = capsys.readouterr().out
    assert "(encrypted)" in out and canary not in out
    assert cli_main(["--store", pg_url, "--key-file", str(key_file), "sessions", "search", canary]) == 0
    assert "#0 user" in capsys.readouterr().out
    assert cli_main(["--store", pg_url, "sessions", "search", canary]) == 1  # nothing readable holds it
    # doctor without the key: reported as encrypted, not as damage (exit 0, as in a folder)
    assert cli_main(["--store", pg_url, "doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("encrypted ") and "1 encrypted (not checked without their key)" in out
    assert cli_main(["--store", pg_url, "--key-file", str(key_file), "doctor"]) == 0
    assert "0 unreadable" in capsys.readouterr().out

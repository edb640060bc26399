"""``doctor`` on a PostgreSQL store (through the store API): every session loaded, the
unreadable ones and those whose lease a writer holds reported; ``sessions rename``, ``search``
and titles in ``sessions list`` there too.  Against a real PostgreSQL server (tests/pg_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

import pg_server as _pg
from conversation_session import ConversationSession, FakeBackend
from conversation_session.stores._postgres import PostgresStore

pg_server = _pg.pg_server
pg_url = _pg.pg_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CONVERSATION_SESSIONS_STORE", raising=False)


def doctor(url: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "--store", url, "doctor", *flags],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ))


def chat_once(url: str, text: str) -> str:
    with ConversationSession(backend=FakeBackend(), store=url) as s:
        s.chat(text)
        return s.session_id


def test_doctor_on_postgresql_reports_unreadable_sessions_and_held_leases(pg_url):
    empty = doctor(pg_url)
    assert empty.returncode == 0 and "no sessions in postgresql://" in empty.stdout
    fine = chat_once(pg_url, "all is well")  # never reported: sound, and closed
    broken = chat_once(pg_url, "this one gets damaged")
    healthy = doctor(pg_url)
    assert healthy.returncode == 0, healthy.stderr
    assert "checked 2 session(s) in postgresql://" in healthy.stdout and "0 unreadable, 0 in use" in healthy.stdout
    # Damage one session's row as a bad migration or a hand edit would: its content claims to
    # be JSON and is not.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE conversation_session.messages SET content_is_json = true, content = '{not json' "
                     "WHERE session_id = %s AND idx = 0", (broken,))
    open_one = ConversationSession(backend=FakeBackend(), store=pg_url)  # holds its lease while open
    try:
        open_one.chat("still talking")
        proc = doctor(pg_url)
        assert proc.returncode == 1
        lines = proc.stdout.splitlines()
        assert len(lines) == 2  # one line per problem; a sound, closed session is not reported
        assert any(line.startswith(f"unreadable       {broken}: stored session is not readable") for line in lines)
        assert any(line.startswith(f"in use           {open_one.session_id}: 1 turn(s)") for line in lines)
        assert proc.stdout.count(broken) == 1  # named once per line
        assert f"{fine}:" not in proc.stdout
        assert "3 session(s)" in proc.stderr and "1 unreadable, 1 in use" in proc.stderr
        assert "sessions delete ID" in proc.stderr and "Traceback" not in proc.stderr
        fixing = doctor(pg_url, "--fix")  # nothing to move in a database: says so, changes nothing
        assert fixing.returncode == 1 and "has no files, so nothing is moved" in fixing.stderr
    finally:
        open_one.close()
    store = PostgresStore.from_url(pg_url)
    try:
        assert store.delete(broken)
    finally:
        store.close()
    after = doctor(pg_url)
    assert after.returncode == 0, after.stderr
    assert "checked 2 session(s)" in after.stdout and "0 unreadable, 0 in use" in after.stdout


def test_titles_rename_and_search_on_postgresql(pg_url):
    def app(*args: str, input: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "main.py"), "--store", pg_url, *args], input=input,
                              capture_output=True, text=True, timeout=120, cwd=ROOT, env=dict(os.environ))

    plain = chat_once(pg_url, "the lighthouse keeper's log")
    titled = app("--backend", "fake", input="about the tides\n/title Tides and moons\n")
    assert titled.returncode == 0, titled.stderr
    listing = app("sessions", "list").stdout
    assert "Tides and moons" in listing and "about the tides" not in listing
    assert "the lighthouse keeper's log" in listing
    assert app("sessions", "rename", plain, "Lighthouse").returncode == 0
    assert "Lighthouse" in app("sessions", "list").stdout
    found = app("sessions", "search", "LIGHTHOUSE")
    assert found.returncode == 0, found.stderr
    rows = [line.split() for line in found.stdout.splitlines()]
    # Its title, then its messages (the fake backend's reply echoes the message).
    assert [(r[0], r[2]) for r in rows] == [(plain, "title"), (plain, "#0"), (plain, "#1")]
    assert app("sessions", "search", "nowhere").returncode == 1


def test_model_switch_on_postgresql_keeps_the_session_and_its_lease(pg_url):
    """`/model` closes the session (releasing its lease) and the new model's session takes it."""
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--store", pg_url, "--backend", "fake"],
                          input="first\n/model another-model\nsecond\nhistory\n", capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert "now on" in proc.stderr and "with its 1 turn(s)" in proc.stderr
    assert "2 turn(s), 4 message(s)" in proc.stdout
    store = PostgresStore.from_url(pg_url)
    try:
        (info,) = store.list_sessions()
        assert [m["content"] for m in store.load(info.session_id).messages][::2] == ["first", "second"]
        assert not store.is_locked(info.session_id)  # released at exit, after the switch took it over
    finally:
        store.close()

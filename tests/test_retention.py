"""Retention: sessions idle longer than an age are deleted, never one in use, even by another
process, and never one used between the listing and its deletion (``serve --retention``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import pg_server as _pg
from conversation_session import HistoryStore, SessionLockedError, SessionRecord
from conversation_session._flags import RETENTION_ENV
from conversation_session.service._config import build_parser, config_from_args, parse_age
from conversation_session.stores._housekeeping import prune
from test_service import service, wait_for

ROOT = Path(__file__).resolve().parent.parent
OLD = (datetime.now() - timedelta(days=40)).isoformat(timespec="seconds")


def _old_session(store: HistoryStore, name: str) -> str:
    record = SessionRecord(session_id=name, llm_model="fake", created_at=OLD, updated_at=OLD,
                           messages=[{"role": "user", "content": f"{name} question"},
                                     {"role": "assistant", "content": f"{name} answer"}])
    return store.import_record(record)


def _fresh_session(store: HistoryStore) -> str:
    writer = store.create("fake")
    assert writer.append(0, [{"role": "user", "content": "fresh"}, {"role": "assistant", "content": "yes"}])
    writer.close()
    return writer.session_id


def _hold_open(sessions_dir: Path, sid: str) -> subprocess.Popen[str]:
    """Another process with ``sid`` open for writing (no turn: its age stays 40 days)."""
    code = textwrap.dedent(f"""
        import sys
        from conversation_session import ConversationSession, FakeBackend
        s = ConversationSession(backend=FakeBackend(), sessions_dir={str(sessions_dir)!r})
        assert s.load_history({sid!r})
        print("open", flush=True)
        sys.stdin.read()
        s.close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
    return proc


def test_delete_if_idle_checks_the_age_where_no_writer_can_add_a_turn(sessions_dir: Path) -> None:
    store = HistoryStore(sessions_dir)
    sid = _old_session(store, "session_old")
    cutoff = time.time() - 30 * 86400
    # Listed as idle for 40 days ... then used before the deletion: it must stay.
    writer, record = store.open(sid)
    assert writer.append(len(record.messages), [{"role": "user", "content": "still here"},
                                                {"role": "assistant", "content": "good"}])
    with pytest.raises(SessionLockedError):
        store.delete(sid, idle_before=cutoff)  # open: refused, as any delete
    writer.close()
    assert store.delete(sid, idle_before=cutoff) is False
    assert store.load(sid).messages[-1]["content"] == "good"
    # Idle for real: gone.
    other = _old_session(store, "session_idle")
    assert store.delete(other, idle_before=cutoff) is True
    assert other not in [i.session_id for i in store.list_sessions()]


def test_prune_by_age_skips_a_session_another_process_holds(sessions_dir: Path) -> None:
    store = HistoryStore(sessions_dir)
    held = _old_session(store, "session_held")
    idle = _old_session(store, "session_idle")
    fresh = _fresh_session(store)
    proc = _hold_open(sessions_dir, held)
    try:
        assert prune(store, older_than=timedelta(days=30)) == [idle]
    finally:
        proc.communicate("", timeout=30)
    assert sorted(i.session_id for i in store.list_sessions()) == sorted([held, fresh])


def test_serve_retention_prunes_at_start_but_never_a_session_in_use(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    store = HistoryStore(sessions_dir)
    held = _old_session(store, "session_held")
    idle = _old_session(store, "session_idle")
    (sessions_dir / f"{idle}.kv").write_bytes(b"kv state")
    fresh = _fresh_session(store)
    proc = _hold_open(sessions_dir, held)
    try:
        with service(sessions_dir, "--retention", "30d") as svc:
            wait_for(lambda: not (sessions_dir / f"{idle}.json").exists(), 30, "the idle session to be pruned")
            # The prune's log line comes once the whole prune is done (after the file went).
            wait_for(lambda: "retention: deleted 1 session" in svc.log(), 30, "the prune's log line")
    finally:
        proc.communicate("", timeout=30)
    assert not (sessions_dir / f"{idle}.kv").exists()
    assert sorted(i.session_id for i in store.list_sessions()) == sorted([held, fresh])


def test_retention_ages_are_checked() -> None:
    assert parse_age("30d") == 30 * 86400 and parse_age("12h") == 43200 and parse_age("2") == 2 * 86400
    assert build_parser().parse_args(["--retention", "2w"]).retention == 14 * 86400
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--retention", "soon"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--retention", "0d"])


pg_server = _pg.pg_server
pg_url = _pg.pg_url


def test_postgresql_prunes_by_age_in_the_statement_that_checks_the_lease(pg_url: str) -> None:
    import psycopg

    from conversation_session.stores._postgres import PostgresStore

    store = PostgresStore(pg_url)
    try:
        ids = {}
        for name in ("idle", "held", "fresh"):
            writer = store.create("fake")
            assert writer.append(0, [{"role": "user", "content": name}, {"role": "assistant", "content": "ok"}])
            ids[name] = writer
        ids["idle"].close()
        ids["fresh"].close()  # "held" stays open: its lease is live
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE conversation_session.sessions SET updated_ts = now() - interval '40 days', "
                         "updated_at = %s WHERE id = ANY(%s)", (OLD, [ids["idle"].session_id, ids["held"].session_id]))
        assert prune(store, older_than=timedelta(days=30)) == [ids["idle"].session_id]  # "held" is open here
        cutoff = time.time() - 30 * 86400
        assert store.delete(ids["fresh"].session_id, idle_before=cutoff) is False
        ids["held"].close()
        listed = sorted(i.session_id for i in store.list_sessions())
        assert listed == sorted([ids["held"].session_id, ids["fresh"].session_id])
    finally:
        store.close()


def test_serve_takes_its_retention_from_the_chat_apps_variable(tmp_path: Path) -> None:
    sessions_dir = tmp_path / "sessions"
    store = HistoryStore(sessions_dir)
    idle = _old_session(store, "session_idle")
    fresh = _fresh_session(store)
    with service(sessions_dir, env={RETENTION_ENV: "30"}) as svc:
        wait_for(lambda: "retention: deleted 1 session" in svc.log(), 30, "the prune's log line")
    assert idle not in [i.session_id for i in store.list_sessions()]
    assert [i.session_id for i in store.list_sessions()] == [fresh]


def test_serve_retention_flag_wins_over_the_variable_and_0_keeps_everything() -> None:
    def retention(argv: list[str], env: dict[str, str]) -> float | None:
        return config_from_args(build_parser().parse_args(argv), env).retention_s

    assert retention([], {RETENTION_ENV: "30"}) == 30 * 86400
    assert retention([], {RETENTION_ENV: "0.5"}) == 43200
    assert retention(["--retention", "12h"], {RETENTION_ENV: "30"}) == 43200
    assert retention(["--retention", "12h"], {RETENTION_ENV: "soon"}) == 43200  # not read at all
    assert retention([], {RETENTION_ENV: "0"}) is None
    assert retention([], {RETENTION_ENV: " "}) is None
    assert retention([], {}) is None


@pytest.mark.parametrize("value", ["soon", "-3", "inf"])
def test_serve_refuses_a_bad_retention_variable_in_one_line(tmp_path: Path, value: str) -> None:
    done = subprocess.run([sys.executable, "-m", "conversation_session.service", "--backend", "fake",
                           "--sessions-dir", str(tmp_path / "s")], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin",
                                           RETENTION_ENV: value})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"conversation-session serve: error: ${RETENTION_ENV}={value!r}: ")
    assert not (tmp_path / "s").exists()


# -- PostgreSQL: the KV files live on this host, not in the database ---------------------------------
def _pg_session(store: object, text: str, *, aged: bool = False, pg_url: str = "") -> tuple[str, Path]:
    """A PostgreSQL session (aged 40 days if asked) and a KV file for it in this host's cache."""
    import psycopg

    from conversation_session.memory._kvcache import kv_file_path

    writer = store.create("fake")  # type: ignore[attr-defined]
    assert writer.append(0, [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}])
    writer.close()
    sid = writer.session_id
    if aged:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("UPDATE conversation_session.sessions SET updated_ts = now() - interval '40 days', "
                         "updated_at = %s WHERE id = %s", (OLD, sid))
    kv = kv_file_path(store, sid)
    kv.parent.mkdir(parents=True, exist_ok=True)
    kv.write_bytes(b"kv state of " + sid.encode())
    return sid, kv


def _cli(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conversation_session", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, input="", env=env)


def test_postgresql_sessions_deleted_or_pruned_by_the_commands_lose_their_local_kv_files(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conversation_session.stores._postgres import PostgresStore

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    store = PostgresStore(pg_url)
    try:
        kept, kept_kv = _pg_session(store, "kept")
        deleted, deleted_kv = _pg_session(store, "deleted")
        done = _cli("--store", pg_url, "sessions", "delete", deleted, "--yes", env=env)
        assert done.returncode == 0, done.stderr
        assert not deleted_kv.exists() and kept_kv.exists()

        _, pruned_kv = _pg_session(store, "pruned", aged=True, pg_url=pg_url)
        done = _cli("--store", pg_url, "sessions", "prune", "--older-than", "30d", "--yes", env=env)
        assert done.returncode == 0 and "deleted 1 session(s)" in done.stdout, done.stdout + done.stderr
        assert not pruned_kv.exists() and kept_kv.exists()

        _, retained_kv = _pg_session(store, "retained", aged=True, pg_url=pg_url)
        done = _cli("--store", pg_url, "--retention-days", "30", "--backend", "fake", "hello", env=env)
        assert done.returncode == 0 and "retention: deleted 1 session(s)" in done.stderr, done.stderr
        assert not retained_kv.exists() and kept_kv.exists()

        # (ids are reused once free: the chat's new session may carry a deleted one's id)
        assert sorted(i.first_user_line for i in store.list_sessions()) == ["hello", "kept"]
        assert kept in {i.session_id for i in store.list_sessions()}
    finally:
        store.close()


def test_postgresql_sessions_deleted_or_retired_by_the_service_lose_their_local_kv_files(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import httpx

    from conversation_session.memory._kvcache import kv_file_path
    from conversation_session.stores._postgres import PostgresStore

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    store = PostgresStore(pg_url)
    try:
        _, kept_kv = _pg_session(store, "kept")
        _, idle_kv = _pg_session(store, "idle", aged=True, pg_url=pg_url)
        with service(tmp_path / "unused", "--store", pg_url, "--retention", "30d",
                     env={"XDG_CACHE_HOME": str(tmp_path / "cache")}) as svc:
            wait_for(lambda: "retention: deleted 1 session" in svc.log(), 30, "the prune's log line")
            assert not idle_kv.exists() and kept_kv.exists()
            with httpx.Client(base_url=svc.url, timeout=30) as client:
                sid = client.post("/v1/sessions").json()["session_id"]
                assert client.post(f"/v1/sessions/{sid}/messages", json={"text": "hello"}).json()["turn"] == 1
                kv = kv_file_path(store, sid)  # the service names the row after its own id
                kv.write_bytes(b"kv state")
                assert client.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
            assert not kv.exists() and kept_kv.exists()
        assert sid not in {i.session_id for i in store.list_sessions()}
    finally:
        store.close()

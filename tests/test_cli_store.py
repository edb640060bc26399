"""The terminal app on any store: ``--store URL`` (and ``$CONVERSATION_SESSIONS_STORE``, and the
config file's ``store``) for the chat and every ``sessions ...`` command, against a real
PostgreSQL server (tests/pg_server.py); moving sessions file store -> PostgreSQL -> file store
with nothing lost; passwords never printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import pg_server as _pg
from conversation_session import ConversationSession, FakeBackend, HistoryStore
from conversation_session.cli._args import parse_args, store_from
from conversation_session.stores._postgres import PostgresStore
from test_memory_summary import Summarizer

pg_server = _pg.pg_server
pg_url = _pg.pg_url

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"
PASSWORD = "s3cret-Pa55"


@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("CONVERSATION_SESSIONS_STORE", raising=False)


def run(*args: str, input: str = "", env: dict[str, str] | None = None, drop: tuple[str, ...] = (),
        ) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop}
    return subprocess.run([sys.executable, str(MAIN), *args], input=input, capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=environ)


def with_password(url: str) -> str:
    """The test database's URL with a password in it (the server trusts loopback, so it is
    accepted and ignored): whatever the app prints must not show it."""
    parts = urlsplit(url)
    return url.replace(f"{parts.username}@", f"{parts.username}:{PASSWORD}@", 1)


def record_view(record) -> dict:
    return {"id": record.session_id, "model": record.llm_model, "created": record.created_at,
            "system": record.system_prompt, "messages": record.messages, "summary": record.summary}


def make_sessions(folder: Path) -> list[str]:
    """Three sessions in a folder: one with a persona and Chinese text, one with a reply
    interrupted by the user (marked), one with a running summary."""
    ids = []
    with ConversationSession(backend=FakeBackend(), sessions_dir=folder, system_prompt="你是助手") as s:
        s.chat("我叫小明")
        s.chat("line one\nline two \x1b[31m red")
        ids.append(s.session_id)
    with ConversationSession(backend=FakeBackend(), sessions_dir=folder) as s:
        s.chat("first question")
        turn = s.stream("tell me a long story please")
        pieces = iter(turn)
        next(pieces)
        turn.interrupt(heard=7)
        for _ in pieces:
            pass
        assert turn.result().interrupted
        ids.append(s.session_id)
    summarizer = Summarizer()
    with ConversationSession(backend=FakeBackend(context_length=300), summarizer=summarizer, memory="summary",
                             sessions_dir=folder, max_tokens=10) as s:
        for i in range(60):
            s.chat(f"fact {i} is {i * 7}")
            s._core.policy.wait_idle(5)
            if s._core.policy.compactions:
                break
        s.chat("one more")
        assert s.get_history_summary()["summary"]
        ids.append(s.session_id)
    return ids


def test_where_sessions_live_flag_then_environment_then_config_file(tmp_path, sessions_dir, monkeypatch):
    env_store, config_store, flag_store = tmp_path / "env", tmp_path / "config", tmp_path / "flag"
    args = parse_args(["--store", str(flag_store)])
    assert store_from(args, {"CONVERSATION_SESSIONS_STORE": str(env_store)}) == str(flag_store)
    args = parse_args(["--sessions-dir", str(flag_store)])  # a folder flag beats the environment's URL
    assert store_from(args, {"CONVERSATION_SESSIONS_STORE": "postgresql://x@h/db"}) == str(flag_store)
    args = parse_args(["sessions", "list", "--store", str(flag_store)])
    assert args.command == "sessions" and store_from(args, {}) == str(flag_store)
    assert store_from(parse_args(["--store", "postgresql://u@h/d", "sessions", "list"]), {}) == "postgresql://u@h/d"
    config = tmp_path / "xdg" / "conversation-session" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'store = "{config_store}"\n')
    args = parse_args([])
    assert store_from(args, {"CONVERSATION_SESSIONS_STORE": str(env_store)}) == str(env_store)
    assert store_from(args, {"CONVERSATION_SESSIONS_DIR": str(env_store)}) == str(env_store)
    assert store_from(args, {}) == str(config_store)
    # Through the real app: each chooses where the one-shot turn is saved.
    assert run("--backend", "fake", "--store", str(flag_store), "hi flag").returncode == 0
    assert run("--backend", "fake", "hi env", env={"CONVERSATION_SESSIONS_STORE": str(env_store)},
               drop=("CONVERSATION_SESSIONS_DIR",)).returncode == 0
    assert run("--backend", "fake", "hi config", drop=("CONVERSATION_SESSIONS_DIR",)).returncode == 0
    for folder, text in ((flag_store, "hi flag"), (env_store, "hi env"), (config_store, "hi config")):
        (info,) = HistoryStore(folder).list_sessions()
        assert info.first_user_line == text
    assert not sessions_dir.exists()
    assert run("--store", "mysql://x@h/db", "sessions", "list").stderr.startswith("error: unknown store URL")


def test_sessions_move_file_store_to_postgresql_and_back_with_nothing_lost(pg_url, tmp_path):
    source, dest = tmp_path / "source", tmp_path / "dest"
    ids = make_sessions(source)
    url = with_password(pg_url)
    outputs: list[str] = []

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        proc = run(*args)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, proc.stderr
        return proc

    cli("--sessions-dir", str(source), "sessions", "export", "--all", str(tmp_path / "out1"))
    files = sorted(str(p) for p in (tmp_path / "out1").glob("*.json"))
    assert len(files) == 3
    imported = cli("--store", url, "sessions", "import", *files)
    assert sorted(imported.stdout.split()) == sorted(ids)  # ids kept
    listing = json.loads(cli("sessions", "list", "--json", "--store", url).stdout)
    assert sorted(row["session_id"] for row in listing) == sorted(ids)
    assert all(row["path"].startswith("postgresql://") for row in listing)
    table = cli("--store", url, "sessions", "list").stdout
    assert "我叫小明" in table and "\x1b" not in table
    cli("--store", url, "sessions", "export", "--all", str(tmp_path / "out2"))
    cli("--sessions-dir", str(dest), "sessions", "import", *sorted(str(p) for p in (tmp_path / "out2").glob("*.json")))
    before, pg, after = HistoryStore(source), PostgresStore.from_url(pg_url), HistoryStore(dest)
    try:
        for sid in ids:
            assert record_view(after.load(sid)) == record_view(before.load(sid)) == record_view(pg.load(sid))
    finally:
        pg.close()
    interrupted = after.load(ids[1]).messages[3]
    assert interrupted == {"role": "assistant", "content": "Reply 2", "interrupted": True}
    assert after.load(ids[2]).summary is not None
    # One session exported to stdout, from PostgreSQL, exactly as from the folder.
    one = cli("--store", url, "sessions", "export", ids[0]).stdout
    assert json.loads(one)["conversation_history"] == before.load(ids[0]).messages
    assert PASSWORD not in "".join(outputs)


def test_the_chat_and_housekeeping_on_postgresql(pg_url, sessions_dir, tmp_path):
    url = with_password(pg_url)
    outputs: list[str] = []

    def app(*args: str, input: str = "", status: int = 0, env: dict[str, str] | None = None):
        proc = run(*args, input=input, env=env)
        outputs.append(proc.stdout + proc.stderr)
        assert proc.returncode == status, proc.stderr
        return proc

    first = app("--backend", "fake", "--store", url, input="remember the blue door\nhistory\n")
    assert "Reply 1: remember the blue door" in first.stdout
    assert "postgresql://" in first.stdout + first.stderr  # where it is saved: the store, named safely
    # The environment variable names the store too; -c continues the latest session there.
    again = app("--backend", "fake", "-c", "what door?", env={"CONVERSATION_SESSIONS_STORE": url},
                )
    assert again.stdout == "Reply 1: what door?\n"  # the fake backend counts this run's replies
    # The earlier-session hint, once per session, with the marker kept outside the database.
    hints = [app("--backend", "fake", "--store", url).stderr.count("An earlier session exists") for _ in range(2)]
    assert hints == [1, 0]
    pg = PostgresStore.from_url(pg_url)
    try:
        (info,) = pg.list_sessions()
        assert info.turns == 2 and [m["content"] for m in pg.load(info.session_id).messages][::2] == [
            "remember the blue door", "what door?"]
        assert not sessions_dir.exists()  # nothing went to the folder
        # In the chat: the listing, export to a file, and delete of another session.
        app("--backend", "fake", "--store", url, "another session")
        other = next(i.session_id for i in pg.list_sessions() if i.session_id != info.session_id)
        target = tmp_path / "copy.md"
        chat = app("--backend", "fake", "--store", url,
                   input=f"sessions\n/export {info.session_id} {target}\n/delete {other} --yes\n")
        assert info.session_id in chat.stdout and "blue door" in chat.stdout
        assert target.read_text().startswith(f"# {info.session_id}")
        assert other not in [i.session_id for i in pg.list_sessions()]
        # Housekeeping commands on the same store.
        assert "no saved session session_404" in app("--store", url, "sessions", "delete", "session_404", "--yes",
                                                     status=1).stderr
        dry = app("--store", url, "sessions", "prune", "--keep", "0", "--dry-run").stdout
        assert "would delete" in dry and info.session_id in dry
        app("--store", url, "sessions", "delete", info.session_id, "--yes")
        assert pg.newest_first() != [info.session_id]
        doctor = app("--store", url, "doctor")  # through the store API (tests/test_cli_doctor.py)
        assert "no sessions in postgresql://" in doctor.stdout and PASSWORD not in doctor.stdout
        app("--store", url, "sessions", "prune", "--keep", "0", "--yes")
        assert "no saved sessions in postgresql://" in app("--store", url, "sessions", "list").stdout
    finally:
        pg.close()
    assert PASSWORD not in "".join(outputs)


def test_a_database_that_is_down_is_one_line_without_the_password(sessions_dir):
    url = f"postgresql://me:{PASSWORD}@127.0.0.1:9/chats"
    for args in (("--backend", "fake", "--store", url, "hello"), ("--store", url, "sessions", "list")):
        proc = run(*args)
        assert proc.returncode == 1 and proc.stdout == ""
        assert "127.0.0.1:9" in proc.stderr and PASSWORD not in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr

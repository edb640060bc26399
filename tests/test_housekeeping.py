"""Housekeeping: export/import/prune/doctor, the `sessions` and `doctor` commands as real
processes, hostile files in the sessions folder, and schema upgrade steps."""

from __future__ import annotations

import json
import os
import re
import resource
import stat
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from conversation_session import (
    ConversationSession,
    FakeBackend,
    HistoryStore,
    SessionError,
    SessionFormatError,
    SessionRecord,
)
from conversation_session.stores import _record as _format
from conversation_session.stores._housekeeping import (
    doctor,
    export_all,
    import_session,
    is_locked,
    prune,
)

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "main.py"


def _turn(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _write_session(directory: Path, session_id: str, messages, *, updated_at: str = "2025-10-24T12:00:00",
                   **extra) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"schema_version": 1, "session_id": session_id, "created_at": "2025-10-24T12:00:00",
            "updated_at": updated_at, "llm_model": "m",
            "turns": sum(m["role"] == "assistant" for m in messages), "conversation_history": messages, **extra}
    path = directory / f"{session_id}.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def _chat_session(directory: Path, *questions: str) -> str:
    with ConversationSession(backend=FakeBackend(), sessions_dir=directory) as s:
        for q in questions:
            s.chat(q)
        return s.session_id


def cli(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        preexec_fn=None) -> subprocess.CompletedProcess[str]:
    """``python main.py ARGS`` as a real process; stdin is not a terminal."""
    return subprocess.run(
        [sys.executable, str(MAIN), *args], input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn,
    )


_HOLDER = """
    import sys, time
    from conversation_session import HistoryStore
    writer, _record = HistoryStore(sys.argv[1]).open(sys.argv[2])
    print("locked", flush=True)
    time.sleep(60)
"""


class _Holder:
    """A second process that keeps a session open for writing (holds its lock)."""

    def __init__(self, directory: Path, session_id: str):
        self.proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLDER), str(directory), session_id],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def __enter__(self) -> _Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


# -- sessions list ---------------------------------------------------------------------------------
def test_sessions_list_json_and_table_as_a_real_process(sessions_dir):
    first = _chat_session(sessions_dir, "我喜欢 Python\nsecond line", "再见")
    time.sleep(0.01)
    second = _chat_session(sessions_dir, "hello")
    r = cli("--sessions-dir", str(sessions_dir), "sessions", "list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    by_id = {row["session_id"]: row for row in rows}
    assert set(by_id) == {first, second}
    row = by_id[first]
    assert row["turns"] == 2 and row["first_user_line"] == "我喜欢 Python"
    assert row["size_bytes"] == (sessions_dir / f"{first}.json").stat().st_size
    assert row["created_at"] and row["updated_at"] >= row["created_at"]

    # the table; global flags also after the command, and the folder from the environment
    for args in (["sessions", "list", "--sessions-dir", str(sessions_dir)], ["sessions", "list"]):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert "TURNS" in r.stdout and first in r.stdout and "我喜欢 Python" in r.stdout

    r = cli("--sessions-dir", str(sessions_dir / "empty"), "sessions", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == []


@pytest.mark.parametrize("args", [
    ["sessions"], ["sessions", "frobnicate"], ["sessions", "export"], ["sessions", "export", "../etc/passwd"],
    ["sessions", "export", "session_1", "--all", "x"], ["sessions", "prune"],
    ["sessions", "prune", "--older-than", "soon"], ["sessions", "prune", "--keep", "-1"],
    ["--retention-days", "-3", "sessions", "list"], ["doctor", "--frobnicate"],
])
def test_usage_errors_exit_2(args, capsys):
    from conversation_session.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_usage_error_as_a_real_process():
    r = cli("sessions", "export")
    assert r.returncode == 2 and "export needs a session ID, or --all DIR" in r.stderr


# -- export / import -------------------------------------------------------------------------------
def test_export_one_session_as_json_markdown_and_to_stdout(sessions_dir, tmp_path):
    sid = _chat_session(sessions_dir, "你好", "what now")
    record = HistoryStore(sessions_dir).load(sid)
    r = cli("sessions", "export", sid, "--format", "json", "-o", str(tmp_path / "x.json"))
    assert r.returncode == 0, r.stderr
    assert SessionRecord.from_dict(json.loads((tmp_path / "x.json").read_text())).messages == record.messages
    r = cli("sessions", "export", sid, "-o", str(tmp_path / "x.md"))
    assert r.returncode == 0 and (tmp_path / "x.md").read_text().startswith(f"# {sid}")
    r = cli("sessions", "export", sid, "--format", "md")
    assert r.returncode == 0 and "## user\n\n你好" in r.stdout
    r = cli("sessions", "export", sid)
    assert r.returncode == 0 and json.loads(r.stdout)["conversation_history"] == record.messages
    r = cli("sessions", "export", "session_404", "-o", str(tmp_path / "y.json"))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no saved session session_404" in r.stderr
    assert not (tmp_path / "y.json").exists()


def test_export_all_is_complete_while_a_session_is_being_written(sessions_dir, tmp_path):
    done = _chat_session(sessions_dir, "closed one")
    live = ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir)
    try:
        for n in range(5):
            live.chat(f"live {n}")
        r = cli("--sessions-dir", str(sessions_dir), "sessions", "export", "--all", str(tmp_path / "backup"))
        assert r.returncode == 0, r.stderr
        assert "exported 2 session(s)" in r.stdout
        out = HistoryStore(tmp_path / "backup")
        assert out.load(live.session_id).messages == live.history
        assert out.load(done).turns == 1
        assert stat.S_IMODE((tmp_path / "backup" / f"{done}.json").stat().st_mode) == 0o600
        assert not [p for p in (tmp_path / "backup").iterdir() if p.name.endswith(".tmp")]
    finally:
        live.close()


def test_export_all_reads_the_journal_not_only_the_snapshot(sessions_dir, tmp_path):
    _write_session(sessions_dir, "session_7", _turn("q1", "a1"))
    line = {"start": 2, "messages": _turn("q2", "a2"), "updated_at": "2025-10-24T12:05:00"}
    (sessions_dir / "session_7.journal").write_text(json.dumps(line) + "\n")
    result = export_all(HistoryStore(sessions_dir), tmp_path / "out")
    assert [p.name for p in result.written] == ["session_7.json"] and not result.skipped
    assert [m["content"] for m in HistoryStore(tmp_path / "out").load("session_7").messages] == ["q1", "a1", "q2", "a2"]
    with pytest.raises(SessionError, match="sessions folder itself"):
        export_all(HistoryStore(sessions_dir), sessions_dir)


def test_export_all_on_a_full_disk_fails_with_one_clear_line(sessions_dir, tmp_path):
    sid = _chat_session(sessions_dir, "x" * 5000)
    # RLIMIT_FSIZE makes every write past 4 KB fail with EFBIG, as a full disk fails with ENOSPC
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # noqa: E731
    r = cli("--sessions-dir", str(sessions_dir), "sessions", "export", "--all", str(tmp_path / "out"),
            preexec_fn=limit)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1, r.stderr
    assert re.match(r"error: cannot write the export .*File too large; free some disk space", r.stderr)
    assert list((tmp_path / "out").iterdir()) == []  # no half-written file, no temp file
    assert HistoryStore(sessions_dir).load(sid).turns == 1  # the session itself is untouched

    code = f"""
        import resource
        from conversation_session import HistoryStore, SessionError
        from conversation_session.stores._housekeeping import export_all
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            export_all(HistoryStore({str(sessions_dir)!r}), {str(tmp_path / 'api')!r})
        except SessionError as exc:
            print("SessionError:", exc)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert "SessionError: cannot write the export" in out.stdout, out.stdout + out.stderr


def test_import_keeps_the_id_when_free_and_gets_a_new_one_on_a_clash(sessions_dir, tmp_path):
    sid = _chat_session(tmp_path / "elsewhere", "imported question")
    src = tmp_path / "elsewhere" / f"{sid}.json"
    r = cli("--sessions-dir", str(sessions_dir), "sessions", "import", str(src))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == sid
    r = cli("--sessions-dir", str(sessions_dir), "sessions", "import", str(src))
    assert r.returncode == 0, r.stderr
    again = r.stdout.strip()
    assert again != sid and re.fullmatch(r"session_\d+(_\d+)?", again)
    store = HistoryStore(sessions_dir)
    assert store.load(again).messages == store.load(sid).messages
    assert json.loads((sessions_dir / f"{again}.json").read_text())["session_id"] == again
    third = import_session(store, src)
    assert third not in (sid, again)


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"session_id": "s", "created_at": 5, "llm_model": "m", "conversation_history": []}', "created_at"),
    (b'{"session_id": "s", "created_at": "x", "llm_model": "m", "conversation_history": []}', "no messages"),
    (b'{"session_id": "s", "created_at": "x", "llm_model": "m", "conversation_history": '
     b'[{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
])
def test_import_refuses_invalid_files_clearly(sessions_dir, tmp_path, content, reason):
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    with pytest.raises(SessionFormatError, match=reason):
        import_session(HistoryStore(sessions_dir), bad)
    assert not sessions_dir.exists() or not list(sessions_dir.glob("*.json"))
    if reason != "not valid JSON":
        return  # the app's side once is enough
    r = cli("sessions", "import", str(bad))
    assert r.returncode == 1 and r.stderr.startswith("error: cannot import") and r.stderr.count("\n") == 1
    assert cli("sessions", "import", str(tmp_path / "missing.json")).returncode == 1


# -- delete / prune --------------------------------------------------------------------------------
def test_delete_asks_refuses_without_a_terminal_and_respects_locks(sessions_dir):
    sid = _chat_session(sessions_dir, "to delete")
    r = cli("sessions", "delete", sid)
    assert r.returncode == 1 and "add --yes" in r.stderr
    assert (sessions_dir / f"{sid}.json").exists()
    with _Holder(sessions_dir, sid):
        r = cli("sessions", "delete", sid, "--yes")
        assert r.returncode == 1 and "open for writing by process" in r.stderr
    r = cli("sessions", "delete", sid, "--yes")
    assert r.returncode == 0 and f"deleted {sid}" in r.stdout
    assert not (sessions_dir / f"{sid}.json").exists()
    r = cli("sessions", "delete", sid, "--yes")
    assert r.returncode == 1 and "no saved session" in r.stderr


def test_prune_by_age_and_count_never_touches_a_locked_session(sessions_dir):
    for n in range(1, 5):
        _write_session(sessions_dir, f"session_{n}", _turn(f"q{n}", "a"), updated_at=f"2020-01-0{n}T00:00:00")
    recent = _chat_session(sessions_dir, "recent")
    store = HistoryStore(sessions_dir)
    assert sorted(prune(store, older_than=timedelta(days=30), dry_run=True)) == [f"session_{n}" for n in range(1, 5)]
    assert prune(store, keep=2, dry_run=True) == ["session_3", "session_2", "session_1"]
    assert prune(store, older_than=timedelta(days=30), keep=4, dry_run=True) == ["session_1"]
    assert len(store.list_sessions()) == 5  # dry runs delete nothing

    with _Holder(sessions_dir, "session_1"):
        assert is_locked(store, "session_1") and not is_locked(store, "session_2")
        deleted = prune(store, older_than=timedelta(days=30))
        assert sorted(deleted) == ["session_2", "session_3", "session_4"]
        assert store.load("session_1").messages == _turn("q1", "a")
        r = cli("sessions", "prune", "--older-than", "30d", "--yes")
        assert r.returncode == 0 and "nothing to prune" in r.stdout
    assert sorted(i.session_id for i in store.list_sessions()) == sorted([recent, "session_1"])
    with pytest.raises(ValueError):
        prune(store)


def test_prune_as_a_real_process_confirms_or_refuses(sessions_dir):
    for n in range(1, 4):
        _write_session(sessions_dir, f"session_{n}", _turn(f"q{n}", "a"), updated_at=f"2020-01-0{n}T00:00:00")
    r = cli("sessions", "prune", "--keep", "1")
    assert r.returncode == 1 and "standard input is not a terminal" in r.stderr and "--yes" in r.stderr
    r = cli("sessions", "prune", "--keep", "1", "--dry-run")
    assert r.returncode == 0 and "would delete 2 session(s)" in r.stdout
    assert len(HistoryStore(sessions_dir).list_sessions()) == 3
    r = cli("sessions", "prune", "--keep", "1", "--yes")
    assert r.returncode == 0 and "deleted 2 session(s)" in r.stdout
    assert [i.session_id for i in HistoryStore(sessions_dir).list_sessions()] == ["session_3"]


def test_retention_prunes_on_start_of_the_chat(sessions_dir, monkeypatch):
    import conversation_session.cli as cli_mod

    started = []

    class FakeApp:
        def __init__(self, args):
            started.append([i.session_id for i in HistoryStore(sessions_dir).list_sessions()])

        def run(self) -> int:
            return 0

    monkeypatch.setattr(cli_mod, "ChatApp", FakeApp)
    _write_session(sessions_dir, "session_1", _turn("old", "a"), updated_at="2020-01-01T00:00:00")
    _write_session(sessions_dir, "session_2", _turn("new", "a"), updated_at="2999-01-01T00:00:00")
    assert cli_mod.main([]) == 0 and started[-1] == ["session_2", "session_1"]  # off by default
    monkeypatch.setenv("CONVERSATION_SESSIONS_RETENTION_DAYS", "0")
    assert cli_mod.main([]) == 0 and started[-1] == ["session_2", "session_1"]  # 0 keeps everything
    monkeypatch.setenv("CONVERSATION_SESSIONS_RETENTION_DAYS", "30")
    assert cli_mod.main([]) == 0 and started[-1] == ["session_2"]
    _write_session(sessions_dir, "session_1", _turn("old", "a"), updated_at="2020-01-01T00:00:00")
    monkeypatch.delenv("CONVERSATION_SESSIONS_RETENTION_DAYS")
    assert cli_mod.main(["--retention-days", "365"]) == 0 and started[-1] == ["session_2"]
    monkeypatch.setenv("CONVERSATION_SESSIONS_RETENTION_DAYS", "a week")
    with pytest.raises(SystemExit) as exc:
        cli_mod.main([])
    assert exc.value.code == 2


# -- doctor ----------------------------------------------------------------------------------------
def _damaged_folder(d: Path, outside: Path) -> dict[str, str]:
    """One file of each problem kind; returns name -> expected kind."""
    _write_session(d, "session_ok", _turn("fine", "yes"))
    (d / "session_2.json").write_bytes(b"{not json")
    (d / "session_3.json").write_text('{"session_id": "session_3", "conversation_history": 5}')
    outside.write_text(json.dumps({"session_id": "x", "created_at": "x", "llm_model": "m",
                                   "conversation_history": _turn("secret", "leak")}))
    (d / "session_4.json").symlink_to(outside)
    with open(d / "session_5.json", "wb") as f:
        f.truncate(HistoryStore(d).max_file_bytes + 1)  # sparse: huge, costs no disk
    (d / "session_6.json").mkdir()
    os.mkfifo(d / "session_7.json")
    (d / ".session_ok.json.123.abcd.tmp").write_text("half")
    os.utime(d / ".session_ok.json.123.abcd.tmp", (time.time() - 3600,) * 2)
    (d / ".session_ok.json.456.beef.tmp").write_text("a write in progress")  # young: left alone
    (d / "session_8.journal").write_bytes(b"")  # crashed before its first turn
    _write_session(d, "session_9", _turn("q1", "a1"))
    line = json.dumps({"start": 2, "messages": _turn("q2", "a2"), "updated_at": "2025-10-24T12:05:00"})
    (d / "session_9.journal").write_text(line + '\n{"start": 4, "mess')
    _write_session(d, "session_10", _turn("dup", "a"))
    data = json.loads((d / "session_10.json").read_text())
    data["session_id"] = "session_ok"  # claims another session's id
    (d / "session_10.json").write_text(json.dumps(data))
    return {"session_2.json": "unparseable", "session_3.json": "malformed", "session_4.json": "symlink",
            "session_5.json": "oversized", "session_6.json": "not-regular", "session_7.json": "not-regular",
            ".session_ok.json.123.abcd.tmp": "stray-temp", "session_8.journal": "orphan-journal",
            "session_9.journal": "torn-journal", "session_10.json": "id-mismatch"}


def test_doctor_lists_problems_and_fix_moves_them_aside_without_deleting(sessions_dir, tmp_path):
    outside = tmp_path / "outside.json"
    expected = _damaged_folder(sessions_dir, outside)
    outside_before = outside.read_bytes()
    store = HistoryStore(sessions_dir)
    live = store.create("m")  # an open session with an empty, locked journal: not a problem
    try:
        problems = doctor(store)
        assert {p.path.name: p.kind for p in problems} == expected
        assert all(p.moved_to is None and p.detail for p in problems)

        r = cli("--sessions-dir", str(sessions_dir), "doctor")
        assert r.returncode == 1 and "doctor --fix" in r.stderr
        for name in expected:
            assert name in r.stdout

        fixed = doctor(store, fix=True)
        assert {p.path.name: p.kind for p in fixed} == expected
        for p in fixed:
            if p.kind == "id-mismatch":
                assert p.moved_to is None and p.path.exists()
                continue
            assert p.moved_to is not None
            assert re.fullmatch(re.escape(p.path.name) + r"\.corrupt-\d{14}(-\d+)?", p.moved_to.name)
            assert os.path.lexists(p.moved_to)
        assert os.path.islink(next(p.moved_to for p in fixed if p.kind == "symlink"))
        assert outside.read_bytes() == outside_before  # the link was moved, its target never touched
        assert (sessions_dir / ".session_ok.json.456.beef.tmp").exists()
        assert (sessions_dir / f"{live.session_id}.journal").exists()
        # the torn journal's complete turn was saved into the snapshot before it was moved aside
        assert [m["content"] for m in store.load("session_9").messages] == ["q1", "a1", "q2", "a2"]
        assert not (sessions_dir / "session_9.journal").exists()
        assert [p.kind for p in doctor(store)] == ["id-mismatch"]
        r = cli("--sessions-dir", str(sessions_dir), "doctor", "--fix")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        live.close()


def test_doctor_leaves_journals_of_open_sessions_alone(sessions_dir):
    _write_session(sessions_dir, "session_1", _turn("q", "a"))
    with _Holder(sessions_dir, "session_1"):
        with open(sessions_dir / "session_1.journal", "ab") as f:
            f.write(b'{"start": 2, "torn')  # looks torn, but its writer is alive
        assert doctor(HistoryStore(sessions_dir), fix=True) == []
        assert (sessions_dir / "session_1.journal").exists()


# -- hostile files ---------------------------------------------------------------------------------
def test_symlinks_are_never_followed_out_of_the_folder(sessions_dir, tmp_path):
    secret = tmp_path / "secret.json"
    _write_session(tmp_path, "secret", _turn("secret", "leak"))
    target_journal = tmp_path / "victim.txt"
    target_journal.write_text("do not append here\n")
    _write_session(sessions_dir, "session_1", _turn("q", "a"))
    (sessions_dir / "session_1.journal").symlink_to(target_journal)
    (sessions_dir / "session_2.json").symlink_to(secret)
    store = HistoryStore(sessions_dir)
    with pytest.raises(SessionFormatError, match="symbolic link"):
        store.load("session_2")
    with pytest.raises(SessionFormatError):
        store.load("session_1")
    assert store.list_sessions() == []
    with pytest.raises(SessionError):
        store.open("session_1")
    assert export_all(store, tmp_path / "out").written == []
    r = cli("--sessions-dir", str(sessions_dir), "sessions", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [] and "secret" not in r.stdout + r.stderr
    assert target_journal.read_text() == "do not append here\n"


def test_huge_files_are_refused_by_size_before_reading(sessions_dir, monkeypatch):
    sessions_dir.mkdir()
    with open(sessions_dir / "session_1.json", "wb") as f:
        f.truncate(10_000_000)
    store = HistoryStore(sessions_dir, max_file_bytes=1_000_000)
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(SessionFormatError, match="over the 1,000,000-byte limit"):
        store.load("session_1")
    assert store.list_sessions() == []
    assert [p.kind for p in doctor(store)] == ["oversized"]
    assert reads == []


def test_duplicate_ids_inside_files_the_file_name_wins(sessions_dir, caplog):
    _write_session(sessions_dir, "session_1", _turn("one", "a"))
    _write_session(sessions_dir, "session_2", _turn("two", "a"))
    data = json.loads((sessions_dir / "session_2.json").read_text())
    data["session_id"] = "session_1"
    (sessions_dir / "session_2.json").write_text(json.dumps(data))
    store = HistoryStore(sessions_dir)
    infos = {i.session_id: i.first_user_line for i in store.list_sessions()}
    assert infos == {"session_1": "one", "session_2": "two"}
    assert store.load("session_2").session_id == "session_2"
    assert any("using the file name" in r.getMessage() for r in caplog.records)
    result = export_all(store, sessions_dir.parent / "out")
    assert sorted(p.name for p in result.written) == ["session_1.json", "session_2.json"]
    assert [p.kind for p in doctor(store)] == ["id-mismatch"]


@pytest.mark.parametrize("raw", [
    b"[" * 100_000 + b"]" * 100_000,                                    # deeply nested
    b'{"session_id": 5, "created_at": [], "llm_model": {}, "conversation_history": "x"}',  # wrong types
    b'{"conversation_history": []}',                                   # missing keys
    b'{"session_id": "s", "created_at": "\xff\xfe", "llm_model": "m", "conversation_history": []}',  # not UTF-8
])
def test_damaged_files_are_reported_and_skipped_by_every_command(sessions_dir, tmp_path, raw):
    _write_session(sessions_dir, "session_1", _turn("good", "a"))
    (sessions_dir / "session_2.json").write_bytes(raw)
    os.utime(sessions_dir / "session_2.json", (2e9, 2e9))
    store = HistoryStore(sessions_dir)
    assert [i.session_id for i in store.list_sessions()] == ["session_1"]
    assert store.load_newest().session_id == "session_1"
    result = export_all(store, tmp_path / "out")
    assert [p.name for p in result.written] == ["session_1.json"] and list(result.skipped) == ["session_2"]
    assert prune(store, keep=0, dry_run=True) == ["session_1"]
    assert [(p.path.name, p.kind in ("unparseable", "malformed")) for p in doctor(store)] == [("session_2.json", True)]
    r = cli("--sessions-dir", str(sessions_dir), "sessions", "list", "--json")
    assert r.returncode == 0 and [x["session_id"] for x in json.loads(r.stdout)] == ["session_1"]
    assert "session_2" in r.stderr  # reported on stderr, stdout stays valid JSON


def test_a_lone_surrogate_in_a_file_does_not_crash_the_commands(sessions_dir, tmp_path):
    sessions_dir.mkdir()
    (sessions_dir / "session_1.json").write_text(
        '{"session_id": "session_1", "created_at": "x", "llm_model": "m", "conversation_history": '
        '[{"role": "user", "content": "bad \\ud800 text"}, {"role": "assistant", "content": "a"}]}')
    for args in (["sessions", "list"], ["sessions", "list", "--json"], ["sessions", "export", "session_1"],
                 ["sessions", "export", "--all", str(tmp_path / "out")], ["doctor"]):
        r = cli("--sessions-dir", str(sessions_dir), *args)
        assert "Traceback" not in r.stderr, (args, r.stderr)
        assert r.returncode in (0, 1)
    assert [p.kind for p in doctor(HistoryStore(sessions_dir))] == ["malformed"]


# -- schema versions -------------------------------------------------------------------------------
SEED = {"session_id": "session_1730000001", "created_at": "2025-10-24T12:00:00", "llm_model": "qwen2.5:3b",
        "turns": 1, "conversation_history": _turn("你好", "你好！")}


def test_a_file_without_schema_version_loads_from_disk_and_is_saved_upgraded(sessions_dir):
    sessions_dir.mkdir()
    (sessions_dir / "session_1730000001.json").write_text(json.dumps(SEED, ensure_ascii=False))
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir) as s:
        assert s.load_history("session_1730000001") is True
        s.chat("again")
    data = json.loads((sessions_dir / "session_1730000001.json").read_text())
    assert data["schema_version"] == _format.SCHEMA_VERSION and data["turns"] == 2
    assert data["created_at"] == SEED["created_at"]


def test_upgrade_steps_are_named_ordered_and_pure():
    targets = [t for t, _ in _format.MIGRATIONS]
    assert targets == list(range(1, _format.SCHEMA_VERSION + 1))
    for _target, step in _format.MIGRATIONS:
        assert step.__name__.startswith("_v") and step.__doc__
        original = json.loads(json.dumps(SEED))
        step(original)
        assert original == SEED  # a step returns a new dict, never edits the caller's


def test_a_future_upgrade_step_runs_in_order_on_every_older_file(monkeypatch, sessions_dir):
    calls: list[str] = []
    v1 = _format.MIGRATIONS[0][1]

    def _v1_spy(data):
        calls.append("v1")
        return v1(data)

    def _v2_title_from_first_line(data):
        """Version 2 (simulated): adds a "title" from the first user line."""
        calls.append("v2")
        assert data["schema_version"] == 1  # runs after v1
        data = dict(data)
        first = next((m["content"] for m in data["conversation_history"] if m.get("role") == "user"), "")
        data["title"] = first[:20]
        data["schema_version"] = 2
        return data

    monkeypatch.setattr(_format, "MIGRATIONS", [(1, _v1_spy), (2, _v2_title_from_first_line)])
    monkeypatch.setattr(_format, "SCHEMA_VERSION", 2)

    assert _format.upgrade(dict(SEED))["title"] == "你好" and calls == ["v1", "v2"]
    calls.clear()
    assert _format.upgrade({**SEED, "schema_version": 1, "updated_at": "x"})["schema_version"] == 2
    assert calls == ["v2"]
    calls.clear()
    assert _format.upgrade({**SEED, "schema_version": 2, "updated_at": "x"}) == {**SEED, "schema_version": 2,
                                                                                 "updated_at": "x"}
    assert calls == []
    with pytest.raises(SessionFormatError, match="schema_version 3 is newer"):
        _format.upgrade({**SEED, "schema_version": 3})

    # through the store: old files load, and what is written carries the new version
    _write_session(sessions_dir, "session_1", _turn("q", "a"))
    sessions_dir.joinpath("session_0.json").write_text(json.dumps({**SEED, "session_id": "session_0"}))
    store = HistoryStore(sessions_dir)
    assert store.load("session_0").messages == SEED["conversation_history"]
    assert store.load("session_1").turns == 1
    export_all(store, sessions_dir.parent / "out")
    assert json.loads((sessions_dir.parent / "out" / "session_0.json").read_text())["schema_version"] == 2


def test_on_a_terminal_delete_and_prune_ask_first(sessions_dir):
    pexpect = pytest.importorskip("pexpect")
    for n in (1, 2):
        _write_session(sessions_dir, f"session_{n}", _turn(f"q{n}", "a"), updated_at=f"2020-01-0{n}T00:00:00")
    child = pexpect.spawn(sys.executable, [str(MAIN), "sessions", "delete", "session_1"], encoding="utf-8", timeout=30)
    child.expect(r"Delete session_1\? This cannot be undone\. \[y/N\]")
    child.sendline("n")
    child.expect("not deleted")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and (sessions_dir / "session_1.json").exists()
    child = pexpect.spawn(sys.executable, [str(MAIN), "sessions", "prune", "--keep", "1"], encoding="utf-8", timeout=30)
    child.expect(r"\[y/N\]")
    child.sendline("y")
    child.expect("deleted 1 session")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert [i.session_id for i in HistoryStore(sessions_dir).list_sessions()] == ["session_2"]

"""Sealed exports (docs/encryption.md): an encrypted session exported to a file, one by one or with
``export --all``, stays encrypted on its way out; ``import`` opens it with the key, refuses it
without the key or altered, and plain sessions export exactly as before."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
from conversation_session.cli._export import PlaintextNeeded, write_export
from conversation_session.stores._crypto import is_encrypted_snapshot
from conversation_session.stores._file import _Core, encode_snapshot
from conversation_session.stores._housekeeping import export_all, import_session
from conversation_session.stores._postgres import PostgresStore
from conversation_session.stores._sealed_export import open_export
from test_pg_encryption import _raw_database

pg_server = _pg.pg_server
pg_url = _pg.pg_url

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CONVERSATION_SESSION_KEY_FILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a PostgreSQL store's KV folder


@pytest.fixture
def canary() -> str:
    return f"CANARY-{uuid.uuid4().hex[:12]}-sealed-export"  # unique: the server's WAL is shared


def _keygen(path: Path) -> Path:
    assert cli_main(["keygen", str(path)]) == 0
    return path


@pytest.fixture
def key_file(tmp_path) -> Path:
    return _keygen(tmp_path / "key")


def _no_canary(files: dict[str, bytes], canary: str) -> None:
    assert files
    for name, data in files.items():
        for form in (canary.encode(), json.dumps(canary).encode(), canary.encode("utf-16-le")):
            assert form not in data, f"{name} holds the canary in plaintext"


def _files(*paths: Path) -> dict[str, bytes]:
    """Every file at ``paths`` (a folder: every file in it), name -> raw bytes."""
    out: dict[str, bytes] = {}
    for path in paths:
        for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if p.is_file():
                out[str(p)] = p.read_bytes()
    return out


def _rich(canary: str, sid: str = "session_1700000000") -> SessionRecord:
    """A session with the canary in every field an export carries."""
    return SessionRecord(
        session_id=sid, llm_model="qwen2.5:3b", created_at="2026-01-02T03:04:05", updated_at="2026-01-02T03:05:00",
        system_prompt=f"system {canary}", title=f"title {canary}",
        summary={"text": f"summary {canary}", "covers": 2, "model": "m"},
        messages=[
            {"role": "system", "content": f"system {canary}"},
            {"role": "user", "content": f"what is the weather in {canary}? 你好 🎉"},
            {"role": "assistant", "content": "",
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "weather", "arguments": {"city": canary}}}]},
            {"role": "tool", "content": f"sunny in {canary}", "tool_call_id": "c1", "name": "weather"},
            {"role": "assistant", "content": f"It is sunny in {canary}.", "interrupted": True},
        ],
        undone=[{"at": "2026-01-02T03:04:30", "start": 5,
                 "messages": [{"role": "user", "content": f"undone {canary}"},
                              {"role": "assistant", "content": f"undone reply {canary}"}]}])


def _same(got: SessionRecord, want: SessionRecord) -> None:
    assert (got.messages, got.title, got.system_prompt, got.summary, got.undone, got.llm_model, got.created_at) == \
        (want.messages, want.title, want.system_prompt, want.summary, want.undone, want.llm_model, want.created_at)


def _encrypted_store(folder: Path, key: Path, canary: str) -> tuple[HistoryStore, str]:
    store = HistoryStore(folder, encryption_key=key)
    sid = store.import_record(_rich(canary))  # a store with a key stores it encrypted
    _no_canary(_files(folder), canary)
    return store, sid


def _cli(*args: str) -> int:
    """The app's exit status (a usage error exits through argparse: SystemExit(2))."""
    try:
        return cli_main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)


# -- export, one session and all of them -----------------------------------------------------------------
def test_an_encrypted_session_exports_sealed_and_comes_back_whole_with_the_key(sessions_dir, key_file, tmp_path,
                                                                             canary, capsys):
    store, sid = _encrypted_store(sessions_dir, key_file, canary)
    want = store.load(sid)
    one = tmp_path / "one.json"
    assert _cli("--key-file", str(key_file), "sessions", "export", sid, "-o", str(one)) == 0
    assert "sealed" in capsys.readouterr().err
    assert is_encrypted_snapshot(one.read_bytes()) and oct(one.stat().st_mode & 0o777) == "0o600"
    everything = tmp_path / "all"
    assert _cli("--key-file", str(key_file), "sessions", "export", "--all", str(everything)) == 0
    assert "1 encrypted session(s) written sealed" in capsys.readouterr().err
    assert [p.name for p in everything.iterdir()] == [f"{sid}.json"]
    _no_canary(_files(one, everything), canary)

    # Into another folder with the key: whole, and stored encrypted there too.
    for n, source in enumerate((one, everything)):
        dest = tmp_path / f"dest{n}"
        assert _cli("--sessions-dir", str(dest), "--key-file", str(key_file), "sessions", "import", str(source)) == 0
        assert capsys.readouterr().out.strip() == sid
        _no_canary(_files(dest), canary)
        got = HistoryStore(dest, encryption_key=key_file).load(sid)
        _same(got, want)
        assert canary in got.messages[1]["content"]
        [info] = HistoryStore(dest, encryption_key=key_file).list_sessions()
        assert info.encrypted


def test_the_sealed_plaintext_is_exactly_the_plain_export(sessions_dir, key_file, tmp_path, canary):
    store, sid = _encrypted_store(sessions_dir, key_file, canary)
    sealed = tmp_path / "s.json"
    plain = tmp_path / "p.json"
    assert write_export(store, sid, sealed) == (sealed, True)
    assert write_export(store, sid, plain, plaintext=True) == (plain, False)
    opened, sealed_for = open_export(sealed.read_bytes(), store.keyring, "s.json")
    record = store.load(sid)
    assert sealed_for == sid and opened == plain.read_bytes() == encode_snapshot(record, record.messages)
    # Each export gets a fresh data key: two exports of one session share no ciphertext.
    again = tmp_path / "again.json"
    write_export(store, sid, again)
    assert sealed.read_bytes().split(b"\n", 1)[1][:64] != again.read_bytes().split(b"\n", 1)[1][:64]


def test_export_to_standard_output_is_sealed_real_process(sessions_dir, key_file, tmp_path, canary):
    """``sessions export ID > backup.json`` (a real process writing to a file) is sealed too."""
    _store, sid = _encrypted_store(sessions_dir, key_file, canary)
    backup = tmp_path / "backup.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CONVERSATION_SESSIONS_DIR": str(sessions_dir)}
    with backup.open("wb") as out:
        r = subprocess.run([sys.executable, "-m", "conversation_session", "--key-file", str(key_file),
                            "sessions", "export", sid], stdout=out, stderr=subprocess.PIPE, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert is_encrypted_snapshot(backup.read_bytes())
    _no_canary(_files(backup), canary)
    dest = HistoryStore(tmp_path / "dest", encryption_key=key_file)
    _same(dest.load(import_session(dest, backup)), _rich(canary))


# -- without the key, with another key, altered ----------------------------------------------------------
@pytest.mark.parametrize("which", ["missing", "wrong"])
def test_import_without_the_key_is_one_clear_line_and_writes_nothing(sessions_dir, key_file, tmp_path, canary,
                                                                    capsys, which):
    _encrypted_store(sessions_dir, key_file, canary)
    everything = tmp_path / "all"
    assert export_all(HistoryStore(sessions_dir, encryption_key=key_file), everything).sealed
    [sealed] = everything.iterdir()
    dest = tmp_path / "dest"
    key = [] if which == "missing" else ["--key-file", str(_keygen(tmp_path / "other"))]
    capsys.readouterr()
    for source in (sealed, everything):
        assert _cli("--sessions-dir", str(dest), *key, "sessions", "import", str(source)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: cannot import")
        assert ("give its key" if which == "missing" else "encrypted with another key") in err
        assert not dest.exists() or not [p for p in dest.iterdir() if p.suffix in (".json", ".journal")]
    with pytest.raises(EncryptionKeyError):
        import_session(HistoryStore(dest), sealed)


def test_import_of_a_sessions_folder_itself_is_refused(sessions_dir, key_file, tmp_path, canary, capsys,
                                                      monkeypatch):
    """Its .json files are snapshots: the turns still in its journals would be left behind."""
    _encrypted_store(sessions_dir, key_file, canary)
    monkeypatch.setattr(_Core, "_request_snapshot", lambda self: None)  # turns stay in the journal
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, encryption_key=key_file,
                             persist_kv_cache=False) as s:
        s.chat("in the journal only")
        assert list(sessions_dir.glob("*.journal"))
        dest = tmp_path / "dest"
        assert _cli("--sessions-dir", str(dest), "--key-file", str(key_file), "sessions", "import",
                    str(sessions_dir)) == 1
        assert "it is a sessions folder, not an export" in capsys.readouterr().err
        assert not dest.exists() or not list(dest.iterdir())


@pytest.mark.parametrize("how", ["body byte", "last byte", "header session id", "header data key", "cut off"])
def test_an_altered_sealed_export_is_refused(sessions_dir, key_file, tmp_path, canary, capsys, how):
    store, sid = _encrypted_store(sessions_dir, key_file, canary)
    path, sealed = write_export(store, sid, tmp_path / "x.json")
    assert sealed
    raw = bytearray(path.read_bytes())
    end = raw.index(b"\n")
    if how == "body byte":
        raw[end + 40] ^= 1
    elif how == "last byte":
        raw[-1] ^= 0x80
    elif how == "header session id":  # claims to be another session: its data key no longer opens
        raw[:end] = raw[:end].replace(sid.encode(), b"session_1700000009")
    elif how == "header data key":
        at = raw.index(b'"data_key": "') + 30
        raw[at] = ord("A") if raw[at] != ord("A") else ord("B")
    else:
        del raw[len(raw) - 20:]
    path.write_bytes(bytes(raw))
    dest = tmp_path / "dest"
    assert _cli("--sessions-dir", str(dest), "--key-file", str(key_file), "sessions", "import", str(path)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused" in err, err
    assert not dest.exists() or not list(dest.iterdir())
    with pytest.raises(SessionFormatError):
        import_session(HistoryStore(dest, encryption_key=key_file), path)


# -- --plaintext, Markdown -------------------------------------------------------------------------------
def test_plaintext_writes_readable_json_and_markdown_and_markdown_needs_it(sessions_dir, key_file, tmp_path, canary,
                                                                         capsys):
    store, sid = _encrypted_store(sessions_dir, key_file, canary)
    k = ["--key-file", str(key_file)]
    md = tmp_path / "x.md"
    for args in (["--format", "md", "-o", str(tmp_path / "y")], ["-o", str(md)], ["--format", "md"]):
        assert _cli(*k, "sessions", "export", sid, *args) == 2
        assert "add --plaintext" in capsys.readouterr().err
    assert not md.exists() and not (tmp_path / "y").exists()
    assert _cli(*k, "sessions", "export", sid, "--plaintext", "-o", str(md)) == 0
    assert f"## user\n\nwhat is the weather in {canary}?" in md.read_text()
    js = tmp_path / "x.json"
    assert _cli(*k, "sessions", "export", sid, "--plaintext", "-o", str(js)) == 0
    _same(SessionRecord.from_dict(json.loads(js.read_text())), store.load(sid))
    everything = tmp_path / "all"
    assert _cli(*k, "sessions", "export", "--all", str(everything), "--plaintext") == 0
    assert "sealed" not in capsys.readouterr().err
    _same(HistoryStore(everything).load(sid), store.load(sid))  # readable without any key
    # The chat's /export writes through write_export: sealed JSON, and no Markdown without plaintext.
    with pytest.raises(PlaintextNeeded):
        write_export(store, sid, tmp_path / "chat.md")
    assert not (tmp_path / "chat.md").exists()


# -- plain sessions: exactly as before -------------------------------------------------------------------
def test_plain_sessions_export_exactly_as_before_with_or_without_a_key(sessions_dir, key_file, tmp_path, canary,
                                                                      capsys):
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, persist_kv_cache=False) as s:
        s.chat("a plain one")
        plain = s.session_id
    _store, enc = _encrypted_store(sessions_dir, key_file, canary)
    record = HistoryStore(sessions_dir).load(plain)
    seed_json = encode_snapshot(record, record.messages)  # what export wrote before sealing existed
    for key in ([], ["--key-file", str(key_file)]):
        out = tmp_path / f"plain{len(key)}.json"
        assert _cli(*key, "sessions", "export", plain, "-o", str(out)) == 0
        assert "sealed" not in capsys.readouterr().err
        assert out.read_bytes() == seed_json
        assert _cli(*key, "sessions", "export", plain) == 0
        assert capsys.readouterr().out.encode() == seed_json
        everything = tmp_path / f"all{len(key)}"
        assert _cli(*key, "sessions", "export", "--all", str(everything)) == 0
        assert (everything / f"{plain}.json").read_bytes() == seed_json
    assert not (tmp_path / "all0" / f"{enc}.json").exists()  # without the key: skipped, as before
    assert is_encrypted_snapshot((tmp_path / "all2" / f"{enc}.json").read_bytes())


# -- between stores: a folder and PostgreSQL --------------------------------------------------------------
def test_sealed_export_all_moves_to_postgresql_and_back_with_nothing_lost(pg_server, pg_url, sessions_dir, key_file,
                                                                         tmp_path, canary, capsys):
    store = HistoryStore(sessions_dir, encryption_key=key_file)
    wanted = {}
    for i in range(3):
        sid = store.import_record(_rich(f"{canary}-{i}", f"session_17000000{i:02d}"))
        wanted[sid] = store.load(sid)
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, persist_kv_cache=False) as s:
        s.chat("a plain one")  # created without the key: plain here (PostgreSQL, with the key, encrypts it)
    wanted[s.session_id] = HistoryStore(sessions_dir).load(s.session_id)
    k = ["--key-file", str(key_file)]
    out = tmp_path / "out"
    assert _cli("--sessions-dir", str(sessions_dir), *k, "sessions", "export", "--all", str(out)) == 0
    assert "3 encrypted session(s) written sealed" in capsys.readouterr().err
    _no_canary(_files(out), canary)

    assert _cli("--store", pg_url, *k, "sessions", "import", str(out)) == 0
    _no_canary(_raw_database(pg_server, pg_url), canary)
    with PostgresStore(pg_url, encryption_key=key_file) as pg:
        infos = {i.session_id: i.encrypted for i in pg.list_sessions()}
        assert infos == dict.fromkeys(wanted, True)
        for sid, want in wanted.items():
            _same(pg.load(sid), want)

    back = tmp_path / "back"
    assert _cli("--store", pg_url, *k, "sessions", "export", "--all", str(back)) == 0
    _no_canary(_files(back), canary)
    home = tmp_path / "home"
    assert _cli("--sessions-dir", str(home), *k, "sessions", "import", str(back)) == 0
    _no_canary(_files(home), canary)
    again = HistoryStore(home, encryption_key=key_file)
    for sid, want in wanted.items():
        _same(again.load(sid), want)


def test_a_sealed_export_opens_with_the_key_alone_after_its_session_and_keystore_entry_are_gone(
        sessions_dir, key_file, tmp_path, canary, capsys):
    """The export is a backup: its data key travels inside it (wrapped), never as a reference to
    the keystore, whose entry goes with the session."""
    store, sid = _encrypted_store(sessions_dir, key_file, canary)
    want = store.load(sid)
    out = tmp_path / "backup.json"
    assert _cli("--key-file", str(key_file), "sessions", "export", sid, "-o", str(out)) == 0
    assert b"keystore:" not in out.read_bytes()
    assert store.delete(sid)
    dest = tmp_path / "elsewhere"
    assert _cli("--sessions-dir", str(dest), "--key-file", str(key_file), "--keystore", str(tmp_path / "ks2"),
                "sessions", "import", str(out)) == 0, capsys.readouterr().err
    _same(HistoryStore(dest, encryption_key=key_file, keystore=tmp_path / "ks2").load(sid), want)

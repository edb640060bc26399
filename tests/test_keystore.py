"""The keystore (docs/encryption.md, "How"): encrypted sessions' data keys kept outside the
session files, so that deleting a session makes its copies in backups unreadable."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conversation_session import ConversationSession, EncryptionKeyError, FakeBackend, HistoryStore, SessionError
from conversation_session.cli import main as cli_main
from conversation_session.stores._crypto import open_kv, register_directory
from helpers import run_python

CANARY = "CANARY-keystore-91c2-orange-okapi"


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("CONVERSATION_SESSION_KEY_FILE", raising=False)
    monkeypatch.delenv("CONVERSATION_SESSION_KEYSTORE", raising=False)


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "secrets" / "key"
    path.parent.mkdir()
    assert cli_main(["keygen", str(path)]) == 0
    return path


def _chat(folder: Path, key, texts: list[str], **kw) -> str:
    with ConversationSession(backend=FakeBackend(), sessions_dir=folder, encryption_key=key, persist_kv_cache=False,
                             **kw) as s:
        for text in texts:
            assert s.chat(text).saved
        return s.session_id


def _raw(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def _no_canary(*folders: Path) -> None:
    for folder in folders:
        raw = _raw(folder)
        for form in (CANARY.encode(), json.dumps(CANARY).encode()):
            assert form not in raw, f"{folder} holds the canary in plaintext"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".list-cache.json"}


# -- the backup case ------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["library", "cli"])
def test_a_backup_of_a_deleted_session_is_unreadable_with_the_key(sessions_dir, key_file, tmp_path, how):
    doomed = _chat(sessions_dir, key_file, [f"my secret is {CANARY}", "more"])
    kept = _chat(sessions_dir, key_file, ["a session that stays"])
    keystore = Path(str(key_file) + ".keystore")
    backup = tmp_path / "backup"
    shutil.copytree(sessions_dir, backup)
    assert not list(backup.rglob("*.key")), "the backup of the folder holds no data key"
    assert CANARY in HistoryStore(backup, encryption_key=key_file).load(doomed).messages[0]["content"]

    if how == "library":
        assert HistoryStore(sessions_dir, encryption_key=key_file).delete(doomed)
    else:
        proc = subprocess.run([sys.executable, "-m", "conversation_session", "--key-file", str(key_file),
                               "sessions", "delete", doomed, "--yes"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert not list(keystore.glob(f"{doomed}.*")), "its key went with it"

    from_backup = HistoryStore(backup, encryption_key=key_file)
    with pytest.raises(EncryptionKeyError, match="not in the keystore"):
        from_backup.load(doomed)
    _no_canary(backup, keystore)
    assert from_backup.load(kept).messages[0]["content"] == "a session that stays"
    assert [i.first_user_line for i in from_backup.list_sessions()
            if i.session_id == doomed] == ["(encrypted)"]


def test_the_journal_lines_name_the_key_and_are_shorter(sessions_dir, key_file, monkeypatch):
    from conversation_session.stores._file import _Core

    monkeypatch.setattr(_Core, "_request_snapshot", lambda self: None)
    sid = _chat(sessions_dir, key_file, ["one"])
    # The session was closed: its snapshot holds the reference too.
    snap = (sessions_dir / f"{sid}.json").read_bytes().split(b"\n")[0]
    entry_ref = json.loads(snap)["data_key"]
    assert entry_ref.startswith("keystore:") and len(entry_ref) == len("keystore:") + 33
    _key_id, entry_id = entry_ref[len("keystore:"):].split(".")
    entry = Path(str(key_file) + ".keystore") / f"{sid}.{entry_id}.key"
    data = json.loads(entry.read_bytes())
    assert data["format"] == "conversation-session-keystore" and data["session_id"] == sid
    assert data["folder"] == str(sessions_dir)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert stat.S_IMODE(entry.parent.stat().st_mode) == 0o700


# -- where the keystore is -------------------------------------------------------------------------
def test_keystore_flag_and_environment_and_the_default_beside_the_key_file(sessions_dir, key_file, tmp_path,
                                                                           monkeypatch):
    beside = Path(str(key_file) + ".keystore")
    _chat(sessions_dir, key_file, ["default"])
    assert len(list(beside.glob("*.key"))) == 1 and not (sessions_dir / ".keystore").exists()

    named = tmp_path / "named-keystore"
    app = subprocess.run([sys.executable, "-m", "conversation_session", "--backend", "fake", "--key-file",
                          str(key_file), "--keystore", str(named), f"flag {CANARY}"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert app.returncode == 0, app.stderr
    [entry] = named.glob("*.key")
    sid = entry.name.split(".")[0]
    assert len(list(beside.glob("*.key"))) == 1
    with pytest.raises(EncryptionKeyError, match="not in the keystore"):
        HistoryStore(sessions_dir, encryption_key=key_file).load(sid)  # the default keystore: not there
    monkeypatch.setenv("CONVERSATION_SESSION_KEYSTORE", str(named))
    assert CANARY in HistoryStore(sessions_dir, encryption_key=key_file).load(sid).messages[0]["content"]
    env_sid = _chat(sessions_dir, key_file, ["from the environment"])
    assert list(named.glob(f"{env_sid}.*.key"))
    monkeypatch.delenv("CONVERSATION_SESSION_KEYSTORE")
    # A key given as bytes: beside the sessions (nowhere else is known).
    bytes_sid = _chat(sessions_dir, key_file.read_bytes(), ["bytes"])
    assert list((sessions_dir / ".keystore").glob(f"{bytes_sid}.*.key"))
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, encryption_key=key_file.read_bytes(),
                             keystore=named, persist_kv_cache=False) as s:
        s.load_history(sid)
        assert CANARY in s.history[0]["content"]


def test_a_default_keystore_that_cannot_be_made_is_a_one_line_error_naming_the_flag(sessions_dir, key_file,
                                                                                    capsys):
    Path(str(key_file) + ".keystore").write_text("not a folder")  # as a read-only secrets mount refuses it
    with pytest.raises(SessionError, match=r"cannot create the keystore .*--keystore DIR"):
        HistoryStore(sessions_dir, encryption_key=key_file)
    assert cli_main(["--key-file", str(key_file), "sessions", "list"]) == 1
    err = capsys.readouterr().err.strip()
    assert "--keystore DIR" in err and len(err.splitlines()) == 1
    assert not sessions_dir.exists()


# -- the first format, missing keys, orphans ------------------------------------------------------------
def _inline_session(folder: Path, key_file: Path, text: str) -> str:
    """A session written as before the keystore: its wrapped data key inside its files."""
    store = HistoryStore(folder, encryption_key=key_file)
    assert store.keyring is not None
    store.keyring.keystore = None
    writer = store.create("m")
    assert writer.append(0, [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}])
    writer.write_snapshot()
    writer.close()
    return writer.session_id


def test_inline_sessions_still_load_and_rekey_moves_them_to_the_keystore(sessions_dir, key_file, capsys):
    sid = _inline_session(sessions_dir, key_file, f"old {CANARY}")
    header = json.loads((sessions_dir / f"{sid}.json").read_bytes().split(b"\n")[0])
    assert not header["data_key"].startswith("keystore:")
    assert CANARY in HistoryStore(sessions_dir, encryption_key=key_file).load(sid).messages[0]["content"]
    assert cli_main(["--key-file", str(key_file), "sessions", "rekey", "--new-key-file", str(key_file)]) == 0
    assert "rekeyed 1 session(s)" in capsys.readouterr().out
    header = json.loads((sessions_dir / f"{sid}.json").read_bytes().split(b"\n")[0])
    assert header["data_key"].startswith("keystore:")
    assert CANARY in HistoryStore(sessions_dir, encryption_key=key_file).load(sid).messages[0]["content"]
    assert cli_main(["--key-file", str(key_file), "sessions", "rekey", "--new-key-file", str(key_file)]) == 0
    assert "already under the new key" in capsys.readouterr().out
    assert len(list(Path(str(key_file) + ".keystore").glob(f"{sid}.*.key"))) == 1


def test_a_missing_keystore_entry_is_a_clear_error_that_touches_nothing(sessions_dir, key_file, capsys):
    sid = _chat(sessions_dir, key_file, [f"lost {CANARY}"])
    for entry in Path(str(key_file) + ".keystore").glob(f"{sid}.*.key"):
        entry.unlink()
    before = _files(sessions_dir)
    store = HistoryStore(sessions_dir, encryption_key=key_file)
    with pytest.raises(EncryptionKeyError, match=r"not in the keystore .*deleted, or the keystore is another one"):
        store.load(sid)
    with pytest.raises(EncryptionKeyError):
        store.open(sid)
    [info] = store.list_sessions()
    assert info.first_user_line == "(encrypted)" and info.encrypted
    assert cli_main(["--key-file", str(key_file), "doctor", "--fix"]) == 0
    out = capsys.readouterr().out
    assert "encrypted" in out and "not in the keystore" in out
    assert _files(sessions_dir) == before


def test_doctor_removes_the_key_of_a_session_whose_deletion_was_cut_short(sessions_dir, key_file, capsys):
    gone = _chat(sessions_dir, key_file, ["gone"])
    kept = _chat(sessions_dir, key_file, ["kept"])
    for path in sessions_dir.glob(f"{gone}.*"):
        path.unlink()  # a crash after the files went, before the key did
    keystore = Path(str(key_file) + ".keystore")
    [orphan] = keystore.glob(f"{gone}.*.key")
    assert cli_main(["--key-file", str(key_file), "doctor", "--fix"]) == 0
    assert orphan.exists(), "a young key is left: its session may not have written its files yet"
    old = time.time() - 7200
    for entry in keystore.glob("*.key"):
        os.utime(entry, (old, old))
    capsys.readouterr()
    assert cli_main(["--key-file", str(key_file), "doctor"]) == 1  # reported, not removed
    assert "orphan-key" in capsys.readouterr().out and orphan.exists()
    assert cli_main(["--key-file", str(key_file), "doctor", "--fix"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not orphan.exists()
    assert HistoryStore(sessions_dir, encryption_key=key_file).load(kept).messages[0]["content"] == "kept"


def test_two_folders_sharing_a_keystore_keep_sessions_of_the_same_id_apart(tmp_path, key_file):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, text in ((a, "in a"), (b, "in b")):
        writer = HistoryStore(folder, encryption_key=key_file).create("m", session_id="same")
        assert writer.append(0, [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}])
        writer.close()
    assert HistoryStore(b, encryption_key=key_file).delete("same")
    assert HistoryStore(a, encryption_key=key_file).load("same").messages[0]["content"] == "in a"


# -- the KV file -----------------------------------------------------------------------------------------
@pytest.mark.model
def test_the_kv_file_of_a_deleted_session_is_unreadable_from_a_backup(sessions_dir, key_file, tmp_path):
    sid = run_python(f"""
        from conversation_session import ConversationSession
        with ConversationSession(max_tokens=4, temperature=0, encryption_key={str(key_file)!r}) as s:
            s.chat("Remember the word {CANARY}.")
            print(s.session_id)
    """).stdout.split()[-1]
    kv = sessions_dir / f"{sid}.kv"
    assert kv.read_bytes()[:4] == b"CSKE" and b'"data_key": "keystore:' in kv.read_bytes()[:256]
    backup = tmp_path / "backup"
    shutil.copytree(sessions_dir, backup)
    store = HistoryStore(backup, encryption_key=key_file)
    register_directory(backup, store.keyring)
    assert open_kv(backup / kv.name, bytearray((backup / kv.name).read_bytes()))[:4] != b"CSKE"  # opens now
    assert HistoryStore(sessions_dir, encryption_key=key_file).delete(sid)
    with pytest.raises(ValueError, match="cannot be decrypted"):
        open_kv(backup / kv.name, bytearray((backup / kv.name).read_bytes()))
    _no_canary(backup, Path(str(key_file) + ".keystore"))


def test_a_delete_without_the_key_still_destroys_the_data_key(sessions_dir, tmp_path):
    """`sessions delete` needs no key; the folder remembers where its data keys went
    (``.keystores/``), so a deletion run without the key still makes the backup unreadable."""
    key = tmp_path / "key"
    assert cli_main(["keygen", str(key)]) == 0
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, encryption_key=key,
                             persist_kv_cache=False) as s:
        s.chat(f"secret {CANARY}")
        sid = s.session_id
    backup = tmp_path / "backup"
    shutil.copytree(sessions_dir, backup)
    env = {k: v for k, v in os.environ.items() if k not in ("CONVERSATION_SESSION_KEY_FILE",
                                                              "CONVERSATION_SESSION_KEYSTORE")}
    done = subprocess.run([sys.executable, "-m", "conversation_session", "--sessions-dir", str(sessions_dir),
                           "sessions", "delete", sid, "--yes"], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert not list(Path(str(key) + ".keystore").glob(f"{sid}.*.key"))
    with pytest.raises(EncryptionKeyError, match="not in the keystore"):
        HistoryStore(backup, encryption_key=key).load(sid)

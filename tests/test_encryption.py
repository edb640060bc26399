"""Encryption at rest (docs/encryption.md): what reaches the disk, what a key opens, what is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from conversation_session import (
    ConversationSession,
    EncryptionKeyError,
    FakeBackend,
    HistoryStore,
    SessionError,
    SessionFormatError,
)
from conversation_session.cli import main as cli_main
from conversation_session.stores._file import _Core
from helpers import run_python
from test_service import service

CANARY = "CANARY-7f3a-purple-giraffe"


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch):
    monkeypatch.delenv("CONVERSATION_SESSION_KEY_FILE", raising=False)


@pytest.fixture
def key_file(tmp_path) -> Path:
    path = tmp_path / "key"
    assert cli_main(["keygen", str(path)]) == 0
    return path


def _disk(folder: Path) -> dict[str, bytes]:
    """Every file in the folder, name -> bytes (what a stolen disk shows)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _no_canary(folder: Path, canary: str = CANARY) -> None:
    for name, data in _disk(folder).items():
        for form in (canary.encode(), json.dumps(canary).encode(), canary.encode("utf-16-le")):
            assert form not in data, f"{name} holds the canary in plaintext"


def _session(folder: Path, key, **kw) -> ConversationSession:
    return ConversationSession(backend=FakeBackend(), sessions_dir=folder, encryption_key=key,
                               persist_kv_cache=False, **kw)


@pytest.fixture
def no_snapshots(monkeypatch):
    """Journal lines stay in the journal (as when a process dies before its snapshot is written)."""
    monkeypatch.setattr(_Core, "_request_snapshot", lambda self: None)


def _die_after(folder: Path, key: Path, texts: list[str], sid: str | None = None) -> str:
    """A real process chats ``texts`` (resuming ``sid``) and dies before any snapshot: the turns
    are in the journal only, and no lock is left."""
    out = run_python(f"""
        import os
        from conversation_session import ConversationSession, FakeBackend
        from conversation_session.stores._file import _Core
        _Core._request_snapshot = lambda self: None
        s = ConversationSession(backend=FakeBackend(), sessions_dir={str(folder)!r}, encryption_key={str(key)!r},
                                persist_kv_cache=False)
        if {sid!r} is not None:
            s.load_history({sid!r})
        for text in {texts!r}:
            assert s.chat(text).saved
        print(s.session_id, flush=True)
        os._exit(0)
    """)
    return out.stdout.split()[-1]


# -- the key -------------------------------------------------------------------------------------
def test_keygen_writes_a_private_32_byte_key_and_never_overwrites_one(tmp_path, capsys):
    path = tmp_path / "k"
    assert cli_main(["keygen", str(path)]) == 0
    key = path.read_bytes()
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cli_main(["keygen", str(path)]) == 1
    assert "never overwritten" in capsys.readouterr().err
    assert path.read_bytes() == key
    other = tmp_path / "k2"
    assert cli_main(["keygen", str(other)]) == 0 and other.read_bytes() != key


def test_a_bad_key_is_refused_before_anything_is_created(tmp_path, sessions_dir):
    with pytest.raises(ValueError, match="32 bytes"):
        _session(sessions_dir, b"short")
    not_a_key = tmp_path / "notakey"
    not_a_key.write_text("hello")
    with pytest.raises(SessionError, match="not a key file"):
        _session(sessions_dir, not_a_key)
    with pytest.raises(SessionError, match="cannot read the key file"):
        _session(sessions_dir, tmp_path / "missing")
    assert not sessions_dir.exists() or not any(sessions_dir.iterdir())


# -- the canary ------------------------------------------------------------------------------------
def test_the_canary_never_reaches_the_disk_in_plaintext_and_comes_back_with_the_key(sessions_dir, key_file,
                                                                                   no_snapshots):
    s = _session(sessions_dir, key_file, system_prompt=f"system {CANARY}")
    assert s.chat(f"my secret is {CANARY}").saved
    sid = s.session_id
    journal = (sessions_dir / f"{sid}.journal").read_bytes()
    assert journal.startswith(b'{"enc": 1, ') and journal.count(b"\n") == 1
    _no_canary(sessions_dir)
    s.close()  # the final snapshot
    assert not (sessions_dir / f"{sid}.journal").exists()
    HistoryStore(sessions_dir, encryption_key=key_file).set_title(sid, f"title {CANARY}")  # a journal line
    _no_canary(sessions_dir)

    store = HistoryStore(sessions_dir, encryption_key=key_file)
    record = store.load(sid)
    assert CANARY in record.messages[0]["content"] and CANARY in (record.title or "")
    assert CANARY in (record.system_prompt or "")
    [info] = store.list_sessions()  # also writes the listing cache
    assert info.encrypted and CANARY in (info.title or "") and info.turns == 1
    _no_canary(sessions_dir)
    assert (sessions_dir / ".list-cache.json").exists()
    assert store.list_sessions() == [info]  # from the sealed cache entry
    assert [h.index for h in store.search(CANARY)] == [-1, 0, 1]


def test_a_resumed_session_stays_encrypted_and_loads_whole(sessions_dir, key_file):
    with _session(sessions_dir, key_file) as s:
        s.chat(f"one {CANARY}")
        sid = s.session_id
    with _session(sessions_dir, key_file) as s:
        s.load_history(sid)
        s.chat(f"two {CANARY}")
        s.undo()
        s.chat(f"three {CANARY}")
    _no_canary(sessions_dir)
    record = HistoryStore(sessions_dir, encryption_key=key_file).load(sid)
    assert [m["content"] for m in record.messages if m["role"] == "user"] == [f"one {CANARY}", f"three {CANARY}"]
    assert record.undone and record.undone[0]["messages"][0]["content"] == f"two {CANARY}"


def test_export_writes_plaintext_only_where_asked(sessions_dir, key_file, tmp_path, capsys):
    with _session(sessions_dir, key_file) as s:
        s.chat(f"exported {CANARY}")
        sid = s.session_id
    out = tmp_path / "out.json"
    assert cli_main(["sessions", "export", sid, "-o", str(out)]) == 1  # no key: nothing written
    assert "encrypted" in capsys.readouterr().err and not out.exists()
    assert cli_main(["--key-file", str(key_file), "sessions", "export", sid, "-o", str(out)]) == 0
    _no_canary(tmp_path)  # sealed by default (tests/test_sealed_export.py)
    assert cli_main(["--key-file", str(key_file), "sessions", "export", sid, "--plaintext", "-o", str(out)]) == 0
    assert CANARY in json.loads(out.read_text())["conversation_history"][0]["content"]
    _no_canary(sessions_dir)  # the store itself still holds no plaintext
    with _session(sessions_dir, None) as s:
        s.chat("a plain one")
    everything = tmp_path / "all"
    assert cli_main(["sessions", "export", "--all", str(everything)]) == 0  # without the key: the plain one
    assert [p.name for p in everything.iterdir()] == [f"{s.session_id}.json"]
    assert f"skipped {sid}" in capsys.readouterr().err


# -- wrong and missing keys --------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["missing", "wrong"])
def test_a_missing_or_wrong_key_is_a_clear_error_that_touches_nothing(sessions_dir, key_file, tmp_path, which,
                                                                      capsys, no_snapshots):
    with _session(sessions_dir, key_file) as s:
        s.chat(f"first {CANARY}")
        sid = s.session_id
    _die_after(sessions_dir, key_file, ["second"], sid)  # left in the journal: no snapshot
    before = _disk(sessions_dir)
    assert f"{sid}.journal" in before and f"{sid}.json" in before
    other = tmp_path / "other"
    cli_main(["keygen", str(other)])
    key = None if which == "missing" else other
    store = HistoryStore(sessions_dir, encryption_key=key)
    with pytest.raises(EncryptionKeyError, match="encrypted" if which == "missing" else "another key"):
        store.load(sid)
    with pytest.raises(EncryptionKeyError):
        store.open(sid)
    with pytest.raises(EncryptionKeyError):
        _session(sessions_dir, key).load_history(sid)
    [info] = store.list_sessions()
    assert info.encrypted and info.first_user_line == "(encrypted)" and info.turns == 0
    args = ["doctor", "--fix"] + ([] if key is None else ["--key-file", str(key)])
    assert cli_main(args) == 0
    assert "encrypted" in capsys.readouterr().out
    assert {k: v for k, v in _disk(sessions_dir).items() if k != ".list-cache.json"} == \
        {k: v for k, v in before.items() if k != ".list-cache.json"}
    record = HistoryStore(sessions_dir, encryption_key=key_file).load(sid)  # the right key still opens it
    assert [m["content"] for m in record.messages if m["role"] == "user"] == [f"first {CANARY}", "second"]


# -- tampering ---------------------------------------------------------------------------------------
def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


def test_a_tampered_snapshot_is_refused(sessions_dir, key_file, capsys):
    with _session(sessions_dir, key_file) as s:
        s.chat(f"hello {CANARY}")
        sid = s.session_id
    snap = sessions_dir / f"{sid}.json"
    original = snap.read_bytes()
    store = HistoryStore(sessions_dir, encryption_key=key_file)
    for at in (len(original) - 5, original.index(b"\n") + 20):  # the tag, the ciphertext
        snap.write_bytes(_flip(original, at))
        with pytest.raises(SessionFormatError, match="fails authentication"):
            store.load(sid)
    header = original.replace(b'"version": 1, "cipher"', b'"version": 1,  "cipher"')
    snap.write_bytes(header)
    with pytest.raises(SessionFormatError, match="fails authentication"):
        store.load(sid)
    assert cli_main(["--key-file", str(key_file), "doctor"]) == 1
    assert "tampered" in capsys.readouterr().out


def _journal_lines(folder: Path, key, texts: list[str]) -> tuple[str, list[bytes]]:
    sid = _die_after(folder, key, texts)
    return sid, (folder / f"{sid}.journal").read_bytes().splitlines(keepends=True)


def test_a_tampered_journal_line_is_refused_never_loaded_altered(sessions_dir, key_file, no_snapshots):
    sid, lines = _journal_lines(sessions_dir, key_file, ["one", "two"])
    journal = sessions_dir / f"{sid}.journal"
    store = HistoryStore(sessions_dir, encryption_key=key_file)
    assert len(store.load(sid).messages) == 4
    data_at = lines[0].index(b'"data": "') + 30
    other = b"B" if lines[0][data_at:data_at + 1] == b"A" else b"A"  # still base64: only the cipher can tell
    journal.write_bytes(lines[0][:data_at] + other + lines[0][data_at + 1:] + lines[1])
    with pytest.raises(SessionFormatError, match="line 1 fails authentication"):
        store.load(sid)
    before = _disk(sessions_dir)
    with pytest.raises(SessionFormatError):
        store.open(sid)  # refused: no copy aside, nothing rewritten
    assert _disk(sessions_dir) == before
    # A plaintext line slipped into an encrypted session's journal is refused too.
    plain = json.dumps({"session_id": sid, "start": 4, "messages": [{"role": "user", "content": "forged"},
                       {"role": "assistant", "content": "forged"}], "updated_at": "2026-01-01T00:00:00"})
    journal.write_bytes(b"".join(lines) + plain.encode() + b"\n")
    with pytest.raises(SessionFormatError, match="not encrypted"):
        store.load(sid)


def test_lines_swapped_between_sessions_or_reordered_are_refused(sessions_dir, key_file, no_snapshots):
    a, a_lines = _journal_lines(sessions_dir, key_file, ["a1", "a2"])
    b, b_lines = _journal_lines(sessions_dir, key_file, ["b1", "b2"])
    store = HistoryStore(sessions_dir, encryption_key=key_file)
    (sessions_dir / f"{b}.journal").write_bytes(a_lines[0] + b_lines[1])
    with pytest.raises(SessionFormatError, match=r"line 1.*fails authentication"):
        store.load(b)
    # ... even with B's wrapped data key put in front of A's ciphertext.
    b_key = b_lines[0].split(b'"data"')[0]
    (sessions_dir / f"{b}.journal").write_bytes(b_key + b'"data"' + a_lines[0].split(b'"data"')[1] + b_lines[1])
    with pytest.raises(SessionFormatError, match="line 1 fails authentication"):
        store.load(b)
    (sessions_dir / f"{a}.journal").write_bytes(a_lines[1] + a_lines[0])
    with pytest.raises(SessionFormatError, match="line 1 fails authentication"):
        store.load(a)
    # A whole journal moved to the other session's name: its data key is bound to its session.
    (sessions_dir / f"{b}.journal").write_bytes(b"".join(a_lines))
    with pytest.raises(SessionFormatError, match="fails authentication"):
        store.load(b)


def test_a_line_too_damaged_to_parse_is_damage_not_loaded(sessions_dir, key_file, no_snapshots):
    sid, lines = _journal_lines(sessions_dir, key_file, ["one", "two", "three"])
    (sessions_dir / f"{sid}.journal").write_bytes(lines[0] + lines[1][:60] + b"\0" * 40 + b"\n" + lines[2])
    record = HistoryStore(sessions_dir, encryption_key=key_file).load(sid)
    assert [m["content"] for m in record.messages if m["role"] == "user"] == ["one"]


def test_a_plain_journal_with_a_torn_tail_that_looks_encrypted_stays_plain(sessions_dir):
    # Found by the loader's fuzzing: a torn last line alone must not make a plain session
    # "encrypted" (which refused its complete plain lines as forged).
    line = json.dumps({"session_id": "session_1", "start": 0, "messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}], "updated_at": "2026-01-01T00:00:00"}).encode()
    sessions_dir.mkdir()
    (sessions_dir / "session_1.journal").write_bytes(line + b'\n{"enc": 1, ')
    assert len(HistoryStore(sessions_dir).load("session_1").messages) == 2


def test_continue_skips_a_session_it_cannot_decrypt(sessions_dir, key_file):
    with _session(sessions_dir, None) as s:
        s.chat("older, plain")
        plain = s.session_id
    time.sleep(0.01)
    with _session(sessions_dir, key_file) as s:
        s.chat("newer, encrypted")
    assert HistoryStore(sessions_dir).load_newest().session_id == plain
    assert HistoryStore(sessions_dir, encryption_key=key_file).load_newest().session_id != plain


def test_a_torn_last_line_is_ignored_as_after_a_crash(sessions_dir, key_file, no_snapshots):
    sid, lines = _journal_lines(sessions_dir, key_file, ["one", "two"])
    (sessions_dir / f"{sid}.journal").write_bytes(lines[0] + lines[1][:40])
    record = HistoryStore(sessions_dir, encryption_key=key_file).load(sid)
    assert [m["content"] for m in record.messages if m["role"] == "user"] == ["one"]


# -- crashes -------------------------------------------------------------------------------------------
def test_kill_9_mid_turn_then_reload_with_the_key(sessions_dir, key_file):
    script = textwrap.dedent(f"""
        import sys
        from conversation_session import ConversationSession, FakeBackend
        s = ConversationSession(backend=FakeBackend(piece_delay=0.002), sessions_dir={str(sessions_dir)!r},
                                encryption_key={str(key_file)!r}, persist_kv_cache=False)
        print("SID", s.session_id, flush=True)
        n = 0
        while True:
            n += 1
            r = s.chat("turn %d {CANARY}" % n)
            assert r.saved
            print("ACK", n, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    sid = proc.stdout.readline().split()[1]
    acked = 0
    while acked < 12:
        acked = int(proc.stdout.readline().split()[1])
    time.sleep(0.013)  # inside a later turn, most likely mid-reply
    os.kill(proc.pid, signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    acked = max([acked] + [int(line.split()[1]) for line in rest.splitlines() if line.startswith("ACK")])
    _no_canary(sessions_dir)
    record = HistoryStore(sessions_dir, encryption_key=key_file).load(sid)
    users = [m["content"] for m in record.messages if m["role"] == "user"]
    assert users[:acked] == [f"turn {n} {CANARY}" for n in range(1, acked + 1)]
    assert len(users) - acked in (0, 1)  # a turn written but not yet acknowledged may be there too
    with _session(sessions_dir, key_file) as s:  # and it goes on
        s.load_history(sid)
        assert s.chat("after the crash").saved
    assert HistoryStore(sessions_dir, encryption_key=key_file).load(sid).messages[-2]["content"] == "after the crash"


# -- plain sessions ------------------------------------------------------------------------------------
def test_plain_sessions_keep_working_with_and_without_a_key(sessions_dir, key_file):
    with _session(sessions_dir, None) as s:
        s.chat(f"plain {CANARY}")
        sid = s.session_id
    snap = sessions_dir / f"{sid}.json"
    assert snap.read_bytes().startswith(b"{\n") and CANARY.encode() in snap.read_bytes()
    with _session(sessions_dir, key_file) as s:  # a store with a key opens it, and keeps it plain
        s.load_history(sid)
        s.chat("more")
    data = json.loads(snap.read_bytes())
    assert [m["content"] for m in data["conversation_history"] if m["role"] == "user"] == [f"plain {CANARY}", "more"]
    for key in (None, key_file):
        [info] = HistoryStore(sessions_dir, encryption_key=key).list_sessions()
        assert not info.encrypted and info.first_user_line == f"plain {CANARY}"
    assert cli_main(["doctor"]) == 0


def test_the_key_file_from_the_environment_and_the_chat_app(sessions_dir, key_file, monkeypatch, capsys):
    app = subprocess.run([sys.executable, "-m", "conversation_session", "--backend", "fake", "--key-file",
                          str(key_file), f"from the app {CANARY}"], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=120)
    assert app.returncode == 0, app.stderr
    assert CANARY in app.stdout
    _no_canary(sessions_dir)
    [sid] = {p.name.split(".")[0] for p in sessions_dir.glob("session_*")}
    with pytest.raises(EncryptionKeyError):
        HistoryStore(sessions_dir).load(sid)
    monkeypatch.setenv("CONVERSATION_SESSION_KEY_FILE", str(key_file))
    assert CANARY in HistoryStore(sessions_dir).load(sid).messages[0]["content"]
    assert cli_main(["sessions", "list"]) == 0
    assert f"from the app {CANARY}" in capsys.readouterr().out


def test_serve_with_a_key_file_keeps_its_sessions_encrypted_real_process(sessions_dir, key_file):
    with service(sessions_dir, "--key-file", str(key_file)) as srv:
        sid = httpx.post(f"{srv.url}/v1/sessions", timeout=10).json()["session_id"]
        reply = httpx.post(f"{srv.url}/v1/sessions/{sid}/messages", json={"text": f"served {CANARY}"}, timeout=30)
        assert reply.status_code == 200 and reply.json()["figures"]["saved"], reply.text
        _no_canary(sessions_dir)
        listed = httpx.get(f"{srv.url}/v1/sessions", timeout=10).json()["sessions"]
        assert [x["first_user_line"] for x in listed] == [f"served {CANARY}"]
    _no_canary(sessions_dir)
    assert CANARY in HistoryStore(sessions_dir, encryption_key=key_file).load(sid).messages[0]["content"]


# -- the embedded model's KV file ----------------------------------------------------------------------
@pytest.mark.model
def test_the_kv_file_is_encrypted_and_restored_with_the_key(sessions_dir, key_file):
    out = run_python(f"""
        from conversation_session import ConversationSession
        with ConversationSession(max_tokens=8, temperature=0, encryption_key={str(key_file)!r}) as s:
            s.chat("Remember the word {CANARY}. " * 3)
            print(s.session_id)
    """).stdout.split()[-1]
    kv = sessions_dir / f"{out}.kv"
    raw = kv.read_bytes()
    assert raw[:4] == b"CSKE" and b"CSKV" not in raw[:64]
    _no_canary(sessions_dir)
    resume = f"""
        import json
        from conversation_session import ConversationSession
        with ConversationSession(max_tokens=4, temperature=0, encryption_key={{key}}) as s:
            s.backend.reset_cache()
            try:
                s.load_history({out!r})
            except Exception as exc:
                print(json.dumps({{"error": type(exc).__name__}}))
            else:
                s.chat("Which word?")
                st = s.get_cache_stats()
                print(json.dumps({{"restored": st.get("kv_restored"), "reason": st.get("kv_restore_reason")}}))
    """
    with_key = json.loads(run_python(resume.replace("{key}", repr(str(key_file)))).stdout.splitlines()[-1])
    assert with_key["restored"] is True
    without = json.loads(run_python(resume.replace("{key}", "None")).stdout.splitlines()[-1])
    assert without == {"error": "EncryptionKeyError"}


# -- rekey -----------------------------------------------------------------------------------------------
def _make_sessions(folder: Path, key, n: int) -> dict[str, list[str]]:
    ids = []
    for i in range(n):
        with _session(folder, key) as s:
            s.chat(f"s{i} one {CANARY}")
            s.chat(f"s{i} two")
            ids.append(s.session_id)
    return {sid: [m["content"] for m in HistoryStore(folder, encryption_key=key).load(sid).messages] for sid in ids}


def test_rekey_puts_every_session_under_the_new_key(sessions_dir, key_file, tmp_path, capsys):
    made = _make_sessions(sessions_dir, key_file, 3)
    with _session(sessions_dir, None) as s:  # a plain one is encrypted too
        s.chat(f"plain {CANARY}")
        made[s.session_id] = [m["content"] for m in HistoryStore(sessions_dir).load(s.session_id).messages]
    new = tmp_path / "new"
    cli_main(["keygen", str(new)])
    assert cli_main(["--key-file", str(key_file), "sessions", "rekey", "--new-key-file", str(new)]) == 0
    assert "rekeyed 4 session(s)" in capsys.readouterr().out
    _no_canary(sessions_dir)
    for sid, contents in made.items():
        assert [m["content"] for m in HistoryStore(sessions_dir, encryption_key=new).load(sid).messages] == contents
        with pytest.raises(EncryptionKeyError):
            HistoryStore(sessions_dir, encryption_key=key_file).load(sid)
    assert cli_main(["--key-file", str(new), "sessions", "rekey", "--new-key-file", str(new)]) == 0
    assert "already under the new key" in capsys.readouterr().out


@pytest.mark.parametrize("kill_at", [1, 2, 5, 6])  # odd: before a session's fold; even: between fold and new key
def test_rekey_interrupted_by_kill_9_loses_nothing(sessions_dir, key_file, tmp_path, kill_at):
    made = _make_sessions(sessions_dir, key_file, 4)
    new = tmp_path / "new"
    cli_main(["keygen", str(new)])
    proc = run_python(f"""
        import os, signal, sys
        from conversation_session.cli import main
        from conversation_session.stores import _file
        real, calls = _file._Core._write_snapshot, [0]
        def counting(self, *a, **kw):
            calls[0] += 1
            if calls[0] == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, *a, **kw)
        _file._Core._write_snapshot = counting
        sys.exit(main(["--key-file", {str(key_file)!r}, "--sessions-dir", {str(sessions_dir)!r},
                       "sessions", "rekey", "--new-key-file", {str(new)!r}]))
    """, check=False)
    assert proc.returncode == -signal.SIGKILL
    both = HistoryStore(sessions_dir, encryption_key=new)
    both.also_read_with(key_file)  # the old key, and its keystore beside it
    for sid, contents in made.items():  # every session whole, under one key or the other
        assert [m["content"] for m in both.load(sid).messages] == contents
    _no_canary(sessions_dir)
    assert cli_main(["--key-file", str(key_file), "sessions", "rekey", "--new-key-file", str(new)]) == 0
    for sid, contents in made.items():
        assert [m["content"] for m in HistoryStore(sessions_dir, encryption_key=new).load(sid).messages] == contents
    # Each session's data key moved to the new key's keystore; none is left beside the old key.
    old_keys, new_keys = Path(f"{key_file}.keystore"), Path(f"{new}.keystore")
    assert not list(old_keys.glob("*.key"))
    assert sorted(p.name.split(".")[0] for p in new_keys.glob("*.key")) == sorted(made)
    _no_canary(new_keys)


# -- power cuts ----------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (scripts/_setup.sh dev)")
def test_power_cuts_at_every_point_of_an_encrypted_run_lose_no_acknowledged_turn(tmp_path, key_file, monkeypatch):
    """The crash-state harness of docs/durability.md over a run whose sessions are encrypted
    (the key from the environment reaches the recorded process and every load of a state)."""
    from crash_states import check, record
    monkeypatch.setenv("CONVERSATION_SESSION_KEY_FILE", str(key_file))
    rec = record("power", tmp_path)
    snapshots = list(tmp_path.rglob("session_*.json"))
    assert snapshots and all(p.read_bytes().startswith(b'{"format": "conversation-session-encrypted"')
                             for p in snapshots)
    verdict = check(rec, limit=200)
    assert verdict.failures == [] and verdict.lost_turns == 0
    assert verdict.explored >= 100


def test_a_torn_first_line_does_not_turn_an_encrypted_session_plain(tmp_path, key_file):
    """A new session with a key whose first journal line was torn by a crash (no snapshot, no
    complete line): the turns saved after reopening it are encrypted too."""
    from conversation_session import HistoryStore

    folder = tmp_path / "sessions"
    store = HistoryStore(folder, encryption_key=key_file)
    writer = store.create("m")
    sid = writer.session_id
    writer.close()
    for leftover in folder.glob(f"{sid}*"):
        leftover.unlink()
    (folder / f"{sid}.journal").write_bytes(b'{"enc": 1, "key": "AAAA')  # a torn first line
    writer, record = store.open(sid)
    assert record.messages == []
    assert writer.append(0, [{"role": "user", "content": f"my secret is {CANARY}"},
                             {"role": "assistant", "content": "kept"}])
    writer.close()
    _no_canary(folder)
    assert CANARY in store.load(sid).messages[0]["content"]

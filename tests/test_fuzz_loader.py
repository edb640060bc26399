"""The loader against damaged and hostile files: a committed corpus and hypothesis fuzzing.

Whatever the bytes of ``<id>.json`` and ``<id>.journal``, every path that reads them (load,
list, newest, import, export, prune, doctor) either works or reports a ``SessionFormatError``
(or, for bytes that claim to be encrypted, an ``EncryptionKeyError``); nothing crashes, and the
doctor never loses a byte.  ``-m slow`` runs 10,000 cases.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversation_session import ConversationSession, EncryptionKeyError, FakeBackend, HistoryStore, SessionFormatError
from conversation_session.stores._housekeeping import INFO_KINDS, doctor, export_all, import_session, prune
from conversation_session.stores._record import ROLES

CORPUS = Path(__file__).resolve().parent / "corpus"
SID = "session_1"
KINDS = {"symlink", "not-regular", "oversized", "unreadable", "unparseable", "malformed", "id-mismatch",
         "stray-temp", "orphan-journal", "torn-journal", "damaged-journal", "foreign-journal",
         "encrypted", "tampered"}  # bytes may claim to be encrypted (docs/encryption.md)
VALID_HISTORY = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
VALID = json.dumps({"schema_version": 1, "session_id": SID, "created_at": "2025-10-24T12:00:00",
                    "updated_at": "2025-10-24T12:00:00", "llm_model": "m", "turns": 1,
                    "conversation_history": VALID_HISTORY}, ensure_ascii=False).encode()
VALID_LINE = json.dumps({"start": 2, "messages": VALID_HISTORY, "updated_at": "2025-10-24T12:01:00"},
                        ensure_ascii=False).encode() + b"\n"


@pytest.fixture(autouse=True)
def _quiet_store_warnings(caplog: pytest.LogCaptureFixture) -> None:
    # Every case logs "skipping session ..."; keep the captured log small.
    caplog.set_level(logging.ERROR, logger="conversation_session")


def check_every_loader_path(directory: Path, snapshot: bytes | None, journal: bytes | None) -> None:
    """Write the two files into an empty ``directory`` and drive every reader over them."""
    if snapshot is not None:
        (directory / f"{SID}.json").write_bytes(snapshot)
    if journal is not None:
        (directory / f"{SID}.journal").write_bytes(journal)
    store = HistoryStore(directory)

    try:
        record = store.load(SID)
    except (SessionFormatError, EncryptionKeyError) as exc:
        record, load_error = None, exc
        assert str(exc)
    else:
        load_error = None
        assert record.session_id == SID  # the file name wins
        assert isinstance(record.created_at, str) and isinstance(record.updated_at, str)
        for m in record.messages:
            assert set(m) == {"role", "content"} and m["role"] in ROLES and isinstance(m["content"], str)

    infos = store.list_sessions()
    assert [i.session_id for i in infos] in ([], [SID])
    newest = store.load_newest()
    assert newest is None or newest.session_id == SID
    assert prune(store, older_than=timedelta(days=36500), dry_run=True) == []

    problems = doctor(store, fix=False)
    assert {p.kind for p in problems} <= KINDS
    if isinstance(load_error, EncryptionKeyError):
        assert any(p.kind == "encrypted" for p in problems), f"load failed ({load_error}) but doctor saw nothing"
    elif load_error is not None:
        assert any(p.kind not in INFO_KINDS for p in problems), f"load failed ({load_error}) but doctor saw nothing"
    if not any(p.kind not in INFO_KINDS for p in problems) and snapshot is not None:
        assert record is not None, "doctor found nothing but the session does not load"

    out = directory.parent / (directory.name + "-export")
    result = export_all(store, out)
    if record is not None and record.messages and not problems:
        assert [p.name for p in result.written] == [f"{SID}.json"]
        assert HistoryStore(out).load(SID).messages == record.messages

    if snapshot is not None:
        other = HistoryStore(directory.parent / (directory.name + "-import"))
        try:
            new_id = import_session(other, directory / f"{SID}.json")
        except SessionFormatError as exc:
            assert "cannot import" in str(exc)
        else:
            assert other.load(new_id).messages

    originals = {p: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.is_symlink()}
    fixed = doctor(store, fix=True)
    assert [(p.path, p.kind) for p in fixed] == [(p.path, p.kind) for p in problems]
    for p in fixed:
        if p.kind in INFO_KINDS:
            assert p.moved_to is None and p.path.exists()
            continue
        assert p.moved_to is not None, p  # (a snapshot may reappear: folded from a damaged journal)
        if p.path in originals:  # moved aside byte for byte, never deleted
            assert p.moved_to.read_bytes() == originals[p.path]
    assert all(p.kind in INFO_KINDS for p in doctor(store, fix=False))
    snapshot_moved = any(p.moved_to is not None and p.path.suffix == ".json" for p in fixed)
    try:
        again = store.load(SID)
    except FileNotFoundError:
        assert record is None or snapshot_moved or snapshot is None
    else:
        if record is not None and not snapshot_moved:
            assert again.messages == record.messages  # a fix never loses a turn that loaded


# -- the corpus ----------------------------------------------------------------------------------
CORPUS_FILES = sorted(p.name for p in CORPUS.iterdir() if p.suffix in (".json", ".journal"))
LOADABLE = ("seed_no_schema_version.json", "duplicate_keys.json", "session_id_other.json", "session_id_path.json",
            # harmless oddities (issue 10 §8): a BOM, and "turns" (derived from the history) of any value
            "utf8_bom.json", "turns_string.json", "turns_bool.json", "nan_and_infinity.json")


@pytest.mark.parametrize("name", LOADABLE)
def test_harmless_corpus_files_load(name, tmp_path):
    shutil.copy(CORPUS / name, tmp_path / "session_1.json")
    assert HistoryStore(tmp_path).load("session_1").messages == VALID_HISTORY


def test_corpus_is_small_and_covers_both_kinds_of_file():
    assert len(CORPUS_FILES) >= 40
    assert any(n.endswith(".journal") for n in CORPUS_FILES)
    assert sum((CORPUS / n).stat().st_size for n in CORPUS_FILES) < 200_000


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_corpus_file_is_handled_by_every_loader_path(name, tmp_path):
    data = (CORPUS / name).read_bytes()
    directory = tmp_path / "sessions"
    directory.mkdir()
    if name.endswith(".json"):
        check_every_loader_path(directory, data, None)
    else:
        check_every_loader_path(directory, VALID, data)


def test_corpus_through_the_library_and_the_app(tmp_path, sessions_dir):
    """All corpus snapshots in one folder: the library resumes the only good one, listing skips the rest."""
    sessions_dir.mkdir()
    for n, name in enumerate(CORPUS_FILES):
        if name.endswith(".json") and name not in (*LOADABLE, "updated_at_list.json", "lone_surrogate.json"):
            shutil.copy(CORPUS / name, sessions_dir / f"session_{1000 + n}.json")
    shutil.copy(CORPUS / "seed_no_schema_version.json", sessions_dir / "session_1.json")
    os.utime(sessions_dir / "session_1.json", (1e9, 1e9))  # the oldest: every bad one is tried first
    with ConversationSession(backend=FakeBackend()) as s:
        assert s.load_history() is True
        assert s.session_id == "session_1" and s.history == VALID_HISTORY
    assert [i.session_id for i in HistoryStore(sessions_dir).list_sessions()] == ["session_1"]


def test_seed_file_from_the_corpus_loads_and_upgrades(tmp_path):
    shutil.copy(CORPUS / "seed_no_schema_version.json", tmp_path / "session_1.json")
    record = HistoryStore(tmp_path).load("session_1")
    assert record.updated_at == record.created_at == "2025-10-24T12:00:00"
    assert record.messages == VALID_HISTORY


# -- hypothesis -----------------------------------------------------------------------------------
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                          st.text(max_size=20))
_json_values = st.recursive(_json_scalars,
                            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                            max_leaves=20)
_messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(sorted(ROLES)), "content": st.text(max_size=30)}),
    st.fixed_dictionaries({"role": _json_values, "content": _json_values}),
    _json_values,
), max_size=6)
_KEYS = ["schema_version", "session_id", "created_at", "updated_at", "llm_model", "turns", "conversation_history"]
_good = {"schema_version": st.sampled_from([0, 1]), "session_id": st.sampled_from([SID, "other", "../x"]),
         "created_at": st.just("2025-10-24T12:00:00"), "updated_at": st.just("2025-10-24T12:01:00"),
         "llm_model": st.just("m"), "turns": st.integers(0, 3), "conversation_history": _messages}


@st.composite
def _session_dicts(draw: st.DrawFn) -> bytes:
    """Nearly valid sessions: each key present or not, well-typed or not."""
    data: dict[str, object] = {}
    for key in _KEYS:
        choice = draw(st.sampled_from(["good", "good", "good", "missing", "wrong"]))
        if choice == "good":
            data[key] = draw(_good[key])
        elif choice == "wrong":
            data[key] = draw(_json_values)
    return json.dumps(data, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def _mutated(draw: st.DrawFn, base: bytes) -> bytes:
    """``base`` cut short, with bytes flipped, inserted or removed."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.sampled_from([b"\x00", b"\xff", b"[", b"{", b'"', b"\\ud800", b"\n", b"1e999"]))
        elif op == "delete":
            del data[i]
        else:
            del data[i:]
    return bytes(data)


_snapshots = st.one_of(
    st.none(),
    st.binary(max_size=300),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _session_dicts(),
    _mutated(VALID),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)
_journal_lines = st.one_of(
    st.just(VALID_LINE),
    st.builds(lambda start, msgs: json.dumps({"start": start, "messages": msgs, "updated_at": "t"}).encode() + b"\n",
              st.integers(-2, 8), _messages),
    _mutated(VALID_LINE),
    st.binary(max_size=60),
)
_journals = st.one_of(st.none(), st.just(b""), st.lists(_journal_lines, max_size=4).map(b"".join))


def _run_case(snapshot: bytes | None, journal: bytes | None) -> None:
    if snapshot is None and journal is None:
        snapshot = VALID
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "sessions"
        directory.mkdir()
        check_every_loader_path(directory, snapshot, journal)


_SETTINGS = {"deadline": None, "database": None, "derandomize": False,
             "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much]}


@settings(max_examples=300, **_SETTINGS)
@given(snapshot=_snapshots, journal=_journals)
def test_fuzz_loader_quick(snapshot, journal):
    _run_case(snapshot, journal)


_fuzz_10k = settings(max_examples=10_000, **_SETTINGS)(given(snapshot=_snapshots, journal=_journals)(_run_case))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fuzz_loader_10k():
    """Two to five minutes (every case fsyncs its exports and imports); part of every full run,
    CI included.  Skip with -m "not slow"."""
    _fuzz_10k()

"""The on-disk states a power cut can leave behind a real run of the file store, and their check.

How it works (after ALICE, "All File Systems Are Not Created Equal", OSDI 2014):

1. **Record.**  ``record(level, base)`` runs ``drive()`` (below) in a child process under
   ``strace -f`` (every thread), which logs each ``openat``, ``write``, ``pwrite64``,
   ``ftruncate``, ``rename*``, ``unlink*``, ``mkdir``, ``close``, ``fsync``, ``fdatasync`` and
   ``syncfs`` with its bytes.  The driver is a real session (``ConversationSession`` with the
   fake backend) doing appends, a title, retry and undo, explicit snapshots (a rename over the
   live ``.json``), a run of back-to-back turns while background snapshots cut the journal, a
   close (final snapshot, journal removed), a resume and ``HistoryStore.set_title``.  After
   each operation returns, it writes ``ACK <n>`` to a marker file: the trace says exactly which
   system calls came before each acknowledgement.
2. **Model.**  ``replay(events)`` follows the calls on an in-memory file system that keeps, for
   every file and folder, what is durable and what is not yet: a file's content is durable up
   to its last ``fsync``/``fdatasync`` (``syncfs``: everything); a folder's entries (creations,
   renames, removals) up to its last ``fsync``.  What came after may reach the disk in part:
   for each file and folder a *prefix* of its later operations in order (the ordering ext4
   and most journaling file systems keep for one file), the next write possibly torn (a prefix
   of its bytes, or its length of zeros, as ext4 ``data=writeback`` can leave), and
   independently of every other file and folder (so operations are reordered across files).
3. **Enumerate.**  At every point of the trace (after each call), ``states_at`` yields the
   durable-only state, the everything-written state, and, for each object with pending
   operations, every prefix (and torn variant) of them with the other objects all-persisted
   and none-persisted (``pairs=True``: also every two objects at any prefix each).  Identical
   states are explored once.
4. **Check.**  Each state is written to a fresh folder and loaded with the library
   (``HistoryStore.load``), which must: never raise anything but ``SessionNotFoundError``
   (nothing corrupt or unreadable); give a session equal to one the driver had at some
   operation (messages and title: nothing half-applied); never go back behind what was
   durable at an earlier point (nothing readable is destroyed); and, at the ``power`` level,
   hold every operation acknowledged before the cut.

Used by tests/test_crash_states.py (a bounded sample) and bench/bench_crash_states.py (all).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSCALLS = ("openat,write,pwrite64,rename,renameat,renameat2,ftruncate,fsync,fdatasync,syncfs,"
            "unlink,unlinkat,close,mkdir")
SESSIONS = "sessions"
KEYSTORE = "keystore/"  # a state's files of the keystore (a ``*.keystore`` folder in the run's folder)
ACKS = "acks"
FOLD_LINES = 3  # the driver's journal cut threshold (the library's is 64): cuts happen in a short run


# -- 1. the driver -------------------------------------------------------------------------------
BREAKS = ("none", "no-folder-fsync", "no-journal-flush", "unsynced-snapshot", "unsynced-keystore")
"""Defects the driver can plant in its own copy of the library, for the harness's self-test: a
checker that finds nothing wrong with them would prove nothing."""


def drive(base: Path, level: str, load_turns: int, breaks: str = "none") -> None:
    """The recorded run (in the child process).  Writes ``states.json``: the session after each
    acknowledged operation (messages, title), in order."""
    sys.path.insert(0, str(ROOT / "src"))
    from conversation_session import ConversationSession
    from conversation_session.backends._fake import FakeBackend
    from conversation_session.stores import _file
    from conversation_session.stores._file import HistoryStore

    _file.FOLD_LINES = FOLD_LINES
    if breaks == "no-folder-fsync":
        _file.fsync_dir = lambda directory: None  # type: ignore[assignment]
    elif breaks == "no-journal-flush":
        _file.group_sync.sync = lambda fd: None  # type: ignore[method-assign]
    elif breaks == "unsynced-snapshot":
        plain = _file.atomic_write_bytes
        _file.atomic_write_bytes = lambda path, data, **kw: plain(path, data, durable=False)  # type: ignore
    elif breaks == "unsynced-keystore":  # an encrypted run whose data keys are not flushed
        from conversation_session.stores import _keystore
        from conversation_session.stores._crypto import KEY_ENV, keygen

        if not os.environ.get(KEY_ENV):
            os.environ[KEY_ENV] = str(keygen(base / "key"))  # the keystore beside it, in the run's folder
        unsynced = _keystore.atomic_write_bytes
        _keystore.atomic_write_bytes = lambda path, data, **kw: unsynced(  # type: ignore
            path, data, **{**kw, "durable": False})
    sessions = base / SESSIONS
    ack_fd = os.open(base / ACKS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    states: list[dict[str, object]] = []

    def ack(ok: object, messages: list[dict[str, object]], title: str | None) -> None:
        assert ok, "the driver's operation was not saved"
        states.append({"messages": [{"role": m["role"], "content": m["content"]} for m in messages],
                       "title": title})
        os.write(ack_fd, f"ACK {len(states) - 1}\n".encode())

    def new_session() -> ConversationSession:
        return ConversationSession(backend=FakeBackend(), sessions_dir=sessions, durability=level,
                                   persist_kv_cache=False, max_tokens=16)

    s = new_session()
    sid = s.session_id
    ack(s.chat("How do I keep a sourdough starter alive?").saved, s.history, s.title)
    ack(s.chat("And if I am away for a week? 我下周出差。").saved, s.history, s.title)
    ack(s.set_title("Sourdough"), s.history, s.title)
    ack(s.retry().saved, s.history, s.title)
    ack(s.undo(), s.history, s.title)
    ack(s.chat("What flour should I feed it?").saved, s.history, s.title)
    s.save_history()  # an explicit snapshot: a rename over the live .json
    ack(True, s.history, s.title)
    for i in range(load_turns):  # back to back: background snapshots cut the journal meanwhile
        ack(s.chat(f"Question {i} of a long evening").saved, s.history, s.title)
    s.close()  # the final snapshot, then the journal is removed
    ack(True, s.history, s.title)
    s = new_session()
    s.load_history(sid)  # resume for writing: a new journal
    ack(s.chat("I am back. Is it still alive?").saved, s.history, s.title)
    s.close()
    HistoryStore(sessions, durability=level).set_title(sid, "Sourdough diary")
    record = HistoryStore(sessions).load(sid)
    ack(True, record.messages, record.title)
    (base / "states.json").write_text(json.dumps({"session_id": sid, "states": states}))


# -- 2. recording and parsing --------------------------------------------------------------------
@dataclass
class Event:
    """One system call that matters: ``op`` and its arguments (paths absolute)."""

    op: str
    fd: int = -1
    path: str = ""
    path2: str = ""
    data: bytes = b""
    offset: int = -1
    length: int = 0
    flags: str = ""
    ret: int = 0
    ack: int = -1


@dataclass
class Recording:
    level: str
    base: Path
    session_id: str
    states: list[dict[str, object]]
    events: list[Event]


def record(level: str, base: Path, *, load_turns: int = 6, breaks: str = "none",
           python: str = sys.executable) -> Recording:
    """Run the driver under strace in ``base`` (an empty folder on a real file system)."""
    trace = base / "trace.txt"
    cmd = ["strace", "-f", "-qq", "-e", f"trace={SYSCALLS}", "-y", "-s", "1048576", "-xx", "-o", str(trace),
           python, str(Path(__file__).resolve()), "drive", str(base), level, str(load_turns), breaks]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("CONVERSATION_SESSION_DURABILITY", None)
    proc = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"the driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    done = json.loads((base / "states.json").read_text())
    events = parse_trace(trace.read_text(), base)
    return Recording(level, base, done["session_id"], done["states"], events)


_LINE = re.compile(r"^(\d+)\s+(.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<([^>]*)>)?")
_HEX = re.compile(r'"((?:\\x[0-9a-f]{2})*)"(\.\.\.)?')


def _unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


def _strings(args: str) -> list[bytes]:
    out = []
    for m in _HEX.finditer(args):
        if m.group(2):
            raise ValueError("strace cut a string short: raise -s")
        out.append(_unhex(m.group(1)))
    return out


def _fd(args: str) -> int:
    return int(args.split("<", 1)[0].split(",", 1)[0])


def _abs(base: Path, raw: bytes) -> str:
    path = raw.decode()
    return os.path.normpath(path if path.startswith("/") else os.path.join(base, path))


def parse_trace(text: str, base: Path) -> list[Event]:
    """The events of a ``strace -f -y -xx`` log, in the order they took effect.

    A flush (``fsync``, ``fdatasync``, ``syncfs``) is placed where it *started* (it covers only
    what was written before); every other call where it *returned* (its effect may land any time
    before).  Both choices can only make the model more pessimistic.
    """
    pending: dict[str, str] = {}
    events: list[Event] = []
    placeholder: dict[str, int] = {}
    for raw_line in text.splitlines():
        m = _LINE.match(raw_line)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")].rstrip()
            name = rest.split("(", 1)[0]
            if name in ("fsync", "fdatasync", "syncfs"):
                placeholder[pid] = len(events)
                events.append(Event(op="_placeholder"))
            continue
        resumed = re.match(r"^<\.\.\. (\w+) resumed>(.*)$", rest)
        if resumed:
            rest = pending.pop(pid, resumed.group(1) + "(") + resumed.group(2)
        call = _CALL.match(rest)
        if not call:
            continue
        name, args, ret_s, _ret_path = call.groups()
        ret = int(ret_s)
        ev = _event(name, args, ret, call.group(4), base)
        slot = placeholder.pop(pid, None) if resumed else None
        if slot is not None:
            events[slot] = ev if ev is not None and ret >= 0 else Event(op="_none")
        elif ev is not None and ret >= 0:
            events.append(ev)
    return [e for e in events if not e.op.startswith("_")]


def _event(name: str, args: str, ret: int, ret_path: str | None, base: Path) -> Event | None:
    if name == "openat":
        if ret_path is None:
            return None
        path = _unhex(ret_path.split(">")[0]).decode() if ret_path.startswith("\\x") else ret_path
        flags = args.split(", ")[2] if args.count(", ") >= 2 else ""
        return Event("open", fd=ret, path=os.path.normpath(path), flags=flags)
    if name in ("write", "pwrite64"):
        data = _strings(args)[0][:ret]
        offset = int(args.rsplit(",", 1)[1]) if name == "pwrite64" else -1
        return Event("write", fd=_fd(args), data=data, offset=offset)
    if name == "ftruncate":
        return Event("truncate", fd=_fd(args), length=int(args.rsplit(",", 1)[1]))
    if name in ("fsync", "fdatasync"):
        return Event("fsync", fd=_fd(args))
    if name == "syncfs":
        return Event("syncfs", fd=_fd(args))
    if name == "close":
        return Event("close", fd=_fd(args))
    strings = _strings(args)
    if name in ("rename", "renameat", "renameat2"):
        return Event("rename", path=_abs(base, strings[0]), path2=_abs(base, strings[1]))
    if name in ("unlink", "unlinkat"):
        return Event("unlink", path=_abs(base, strings[0]))
    if name == "mkdir":
        return Event("mkdir", path=_abs(base, strings[0]))
    return None


# -- 3. the file-system model ---------------------------------------------------------------------
@dataclass
class Node:
    """A file or folder: what is durable, and the operations since (in order)."""

    is_dir: bool
    durable: bytes = b""                                         # files
    entries: dict[str, Node] = field(default_factory=dict)       # folders: name -> node
    pending: list[tuple] = field(default_factory=list)

    def content(self, upto: int | None = None, torn: bytes | None = None) -> bytes:
        data = bytearray(self.durable)
        ops = self.pending if upto is None else self.pending[:upto]
        for op in ops:
            _apply_file(data, op)
        if torn is not None:
            _apply_file(data, ("w", self.pending[upto or 0][1], torn))
        return bytes(data)

    def names(self, upto: int | None = None) -> dict[str, Node]:
        entries = dict(self.entries)
        for op in (self.pending if upto is None else self.pending[:upto]):
            if op[0] == "link":
                entries[op[1]] = op[2]
            elif op[0] == "unlink":
                entries.pop(op[1], None)
            elif op[0] == "rename":
                node = entries.pop(op[1], None)
                if node is not None:
                    entries[op[2]] = node
        return entries


def _apply_file(data: bytearray, op: tuple) -> None:
    if op[0] == "w":
        _, off, chunk = op
        if len(data) < off:
            data.extend(b"\0" * (off - len(data)))
        data[off:off + len(chunk)] = chunk
    elif op[0] == "t":
        del data[op[1]:]
        if len(data) < op[1]:
            data.extend(b"\0" * (op[1] - len(data)))


@dataclass
class CrashPoint:
    """The model right after ``index`` events (live: read it before resuming ``replay``)."""

    index: int             # events applied
    acked: int             # the last operation acknowledged before it (-1: none)
    nodes: list[Node]      # every object with operations not yet durable
    root: Node


def replay(rec: Recording) -> Iterator[CrashPoint]:
    """Follow the trace on the model; yield the crash point after every event."""
    base = str(rec.base)
    root = Node(is_dir=True)                      # ``base``: exists, durable, before the run
    fds: dict[int, tuple[Node, int, bool]] = {}   # fd -> (node, offset, append)
    ack_fds: set[int] = set()                     # the driver's marker file
    acked = -1
    every: list[Node] = [root]

    def lookup(path: str) -> tuple[Node, str] | None:
        """The folder node holding ``path`` (in the current, volatile view) and the name."""
        if not path.startswith(base + "/"):
            return None
        parts = path[len(base) + 1:].split("/")
        node = root
        for part in parts[:-1]:
            nxt = node.names().get(part)
            if nxt is None or not nxt.is_dir:
                return None
            node = nxt
        return node, parts[-1]

    for i, ev in enumerate(rec.events):
        if ev.op == "open":
            ack_fds.discard(ev.fd)
            if ev.path == str(rec.base / ACKS):
                ack_fds.add(ev.fd)
                continue
            if ev.path == base:
                fds[ev.fd] = (root, 0, False)
                continue
            where = lookup(ev.path)
            if where is None:
                fds.pop(ev.fd, None)
                continue
            folder, name = where
            node = folder.names().get(name)
            if node is None:
                if "O_CREAT" not in ev.flags:
                    continue  # not one of the run's files
                node = Node(is_dir=False)
                folder.pending.append(("link", name, node))
                every.append(node)
            fds[ev.fd] = (node, 0, "O_APPEND" in ev.flags)
        elif ev.op == "write" and ev.fd in ack_fds:
            for line in ev.data.decode().splitlines():
                acked = max(acked, int(line.split()[1]))
        elif ev.op == "write" and ev.fd in fds:
            node, offset, append = fds[ev.fd]
            size = len(node.content())
            at = ev.offset if ev.offset >= 0 else (size if append else offset)
            node.pending.append(("w", at, ev.data))
            if ev.offset < 0:
                fds[ev.fd] = (node, at + len(ev.data), append)
        elif ev.op == "truncate" and ev.fd in fds:
            fds[ev.fd][0].pending.append(("t", ev.length))
        elif ev.op == "fsync" and ev.fd in fds:
            _make_durable(fds[ev.fd][0])
        elif ev.op == "syncfs":
            for node in every:
                _make_durable(node)
        elif ev.op == "close":
            fds.pop(ev.fd, None)
            ack_fds.discard(ev.fd)
            continue  # no change on the disk
        elif ev.op in ("rename", "unlink", "mkdir"):
            where = lookup(ev.path)
            if where is None:
                continue
            folder, name = where
            if ev.op == "rename":
                target = lookup(ev.path2)
                assert target is not None and target[0] is folder, "renames stay in one folder"
                folder.pending.append(("rename", name, target[1]))
            elif ev.op == "unlink":
                folder.pending.append(("unlink", name))
            else:
                node = Node(is_dir=True)
                folder.pending.append(("link", name, node))
                every.append(node)
        else:
            continue
        yield CrashPoint(i + 1, acked, [n for n in every if n.pending], root)


def _make_durable(node: Node) -> None:
    if node.is_dir:
        node.entries = node.names()
    else:
        node.durable = node.content()
    node.pending = []


# -- 4. the states of a crash point ---------------------------------------------------------------
# file name in the sessions folder (or "keystore/" + name in the keystore, for an encrypted run
# whose data keys are kept beside its key file) -> content
State = dict[str, bytes]


def _materialise(root: Node, choice: dict[int, tuple[int, bytes | None]], default_all: bool) -> State | None:
    """The sessions folder as the disk holds it when each object persisted ``choice[id]``
    (operations kept, torn bytes) and the others all (``default_all``) or none of theirs."""

    def upto(n: Node) -> tuple[int | None, bytes | None]:
        if id(n) in choice:
            return choice[id(n)]
        return (None, None) if default_all else (0, None)

    k, _ = upto(root)
    top = root.names(k)
    folder = top.get(SESSIONS)
    if folder is None:
        return None
    out: State = {}

    def files(of: Node, prefix: str) -> None:
        kf, _ = upto(of)
        for name, node in of.names(kf).items():
            if not node.is_dir:
                kk, torn = upto(node)
                out[prefix + name] = node.content(kk, torn)

    files(folder, "")
    # The data keys of an encrypted run are on the disk as the cut left them too: a journal line
    # naming a key the cut lost would be a session lost.
    for name, node in top.items():
        if node.is_dir and name.endswith(".keystore"):
            files(node, KEYSTORE)
    return out


def _torn(op: tuple) -> list[bytes]:
    if op[0] != "w" or not op[2]:
        return []
    data = op[2]
    cuts = sorted({1, len(data) // 2, len(data) - 1} - {0, len(data)})
    return [data[:c] for c in cuts] + [b"\0" * len(data)]


def states_at(cp: CrashPoint, *, pairs: bool = False) -> Iterator[State | None]:
    """The states a power cut at ``cp`` can leave (see the module docstring, step 3); with
    ``pairs``, also every two objects at any prefix each (the others all or none persisted)."""
    yield _materialise(cp.root, {}, True)
    yield _materialise(cp.root, {}, False)
    for node in cp.nodes:
        for k in range(len(node.pending) + 1):
            variants: list[tuple[int, bytes | None]] = [(k, None)]
            if not node.is_dir and k < len(node.pending):
                variants += [(k, t) for t in _torn(node.pending[k])]
            for choice in variants:
                for default_all in (True, False):
                    yield _materialise(cp.root, {id(node): choice}, default_all)
    if pairs:
        for i, a in enumerate(cp.nodes):
            for b in cp.nodes[i + 1:]:
                for ka in range(len(a.pending) + 1):
                    for kb in range(len(b.pending) + 1):
                        for default_all in (True, False):
                            yield _materialise(cp.root, {id(a): (ka, None), id(b): (kb, None)}, default_all)


def fingerprint(state: State | None) -> str:
    h = hashlib.sha256()
    for name in sorted(state or {"<no folder>": b""}):
        h.update(name.encode() + b"\0" + (state or {}).get(name, b"") + b"\0")
    return h.hexdigest()


# -- 5. the check ----------------------------------------------------------------------------------
@dataclass
class Verdict:
    explored: int = 0          # distinct states loaded
    crash_points: int = 0
    lost_turns: int = 0        # states missing an acknowledged operation
    failures: list[str] = field(default_factory=list)


def _norm(state: dict[str, object]) -> tuple[str, str | None]:
    return json.dumps(state["messages"], ensure_ascii=False), state["title"]  # type: ignore[return-value]


def load_state(state: State | None, session_id: str, scratch: Path,
               key: Path | None = None) -> tuple[str, object]:
    """Load one state with the library: ``("ok", (messages, title))``, ``("missing", None)`` or
    ``("error", text)``."""
    sys.path.insert(0, str(ROOT / "src"))
    from conversation_session import SessionNotFoundError
    from conversation_session.stores._file import HistoryStore

    folder = scratch / SESSIONS
    keystore = scratch / "state.keystore"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(keystore, ignore_errors=True)
    if state is None:
        return "missing", None
    folder.mkdir(parents=True)
    keystore.mkdir()
    for name, data in state.items():
        target = keystore / name[len(KEYSTORE):] if name.startswith(KEYSTORE) else folder / name
        target.write_bytes(data)
    try:
        record = HistoryStore(folder, keystore=keystore, encryption_key=key).load(session_id)
    except SessionNotFoundError:
        return "missing", None
    except Exception as exc:  # noqa: BLE001 - any failure to load is what the check reports
        return "error", f"{type(exc).__name__}: {exc}"
    msgs = [{"role": m["role"], "content": m["content"]} for m in record.messages]
    return "ok", (json.dumps(msgs, ensure_ascii=False), record.title)


def check(rec: Recording, *, limit: int | None = None, seed: int = 25, pairs: bool = False) -> Verdict:
    """Explore the recording's crash states (all of them, or a sample of about ``limit`` drawn
    with ``seed``, always keeping each crash point's durable-only state) and check each."""
    # Operation -1: the session just created, before its first turn (an empty journal).
    empty: tuple[str, str | None] = ("[]", None)
    keys = [_norm(s) for s in rec.states]
    verdict = Verdict()
    contents: dict[str, State | None] = {}
    plan: list[tuple[int, int, list[str]]] = []   # (event index, acked, fingerprints: [all, durable, ...])
    for cp in replay(rec):
        fps = []
        for st in states_at(cp, pairs=pairs):
            fp = fingerprint(st)
            contents.setdefault(fp, st)
            fps.append(fp)
        plan.append((cp.index, cp.acked, fps))
    verdict.crash_points = len(plan)
    floors = {fps[1] for _i, _a, fps in plan}
    if limit is None or limit >= len(contents):
        chosen = set(contents)
    else:
        rest = sorted(set(contents) - floors)
        random.Random(seed).shuffle(rest)
        chosen = floors | set(rest[: max(0, limit - len(floors))])
    scratch = Path(tempfile.mkdtemp(prefix="crash-", dir=rec.base))
    seen: dict[str, tuple[str, object]] = {}
    # Damaged journals are expected in these states: the verdict reports, not the log.
    log = logging.getLogger("conversation_session")
    log_level, log.level = log.level, logging.CRITICAL

    # An encrypted run's key: the environment's, or the one the driver made in its folder.
    key = rec.base / "key" if (rec.base / "key").is_file() else None

    def load(fp: str) -> tuple[str, object]:
        if fp not in seen:
            seen[fp] = load_state(contents[fp], rec.session_id, scratch, key)
        return seen[fp]

    floor = -1  # the latest operation whose result was durable (nothing may go back behind it)
    for index, acked, fps in plan:
        kind, value = load(fps[1])
        if kind == "ok" and value == empty and floor < 0:
            pass  # created, nothing saved yet
        elif kind == "ok":
            later = [j for j in range(max(floor, 0), len(keys)) if keys[j] == value]
            if later:
                floor = later[0]
            else:
                verdict.failures.append(f"after event {index}: the durable state {value} is none the session "
                                        f"had since operation {floor} (readable data destroyed?)")
        elif kind == "error" or floor >= 0:
            verdict.failures.append(f"after event {index}: the durable state is {kind}: {value}")
        for fp in dict.fromkeys(fps):
            if fp not in chosen:
                continue
            kind, value = load(fp)
            if kind == "error":
                verdict.failures.append(f"after event {index}: loading raised {value}")
                continue
            if kind == "missing" or (value == empty and floor < 0):
                got = -1
            else:
                matches = [j for j in range(len(keys)) if keys[j] == value]
                if not matches:
                    verdict.failures.append(f"after event {index}: a state the session never had: {value}")
                    continue
                got = max(matches)
            if got < floor:
                verdict.failures.append(f"after event {index}: state of operation {got}, behind the durable "
                                        f"operation {floor}")
            elif got < acked:
                verdict.lost_turns += 1
                if rec.level == "power":
                    verdict.failures.append(f"after event {index}: operation {acked} was acknowledged, the "
                                            f"state is operation {got}")
    verdict.explored = len(seen)
    log.setLevel(log_level)
    shutil.rmtree(scratch, ignore_errors=True)
    return verdict


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "drive":
    drive(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])

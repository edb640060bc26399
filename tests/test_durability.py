"""Durability levels (docs/durability.md): which level a turn is saved at, where the level comes
from (argument, environment, store, chat app, service, PostgreSQL), and group commit.  What
each level survives is proven over crash states in test_crash_states.py."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from pathlib import Path

import httpx
import pytest

import pg_server as _pg
from conversation_session import AsyncConversationSession, ConversationSession, FakeBackend, HistoryStore
from conversation_session.cli._args import build_parser as build_chat_parser
from conversation_session.cli._args import parse_args
from conversation_session.cli._chat import ChatApp
from conversation_session.service._config import ServiceConfig, build_parser, config_from_args
from conversation_session.stores._fileio import GroupSync
from test_service import service

ENV = "CONVERSATION_SESSION_DURABILITY"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_level_from_outside(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@pytest.mark.parametrize("level", ["process", "power"])
def test_a_turn_says_the_level_it_was_saved_at(sessions_dir: Path, level: str) -> None:
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, durability=level) as s:
        result = s.chat("hello")
        assert s.durability == level
        assert result.saved and result.durability == level
        assert s.retry().durability == level
    # Saved either way: the level changes what a power cut can take, not what is written.
    store = HistoryStore(sessions_dir)
    assert store.load(s.session_id).messages[0]["content"] == "hello"


def test_the_default_is_power_and_the_environment_chooses_otherwise(sessions_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir) as s:
        assert s.chat("hi").durability == "power"
    monkeypatch.setenv(ENV, "Process")
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir) as s:
        assert s.chat("hi").durability == "process"
    # An explicit argument wins over the environment.
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, durability="power") as s:
        assert s.chat("hi").durability == "power"


def test_an_unknown_level_is_a_clear_error_that_creates_nothing(sessions_dir: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="durability='disk' is not a durability level; use one of: process, power"):
        ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, durability="disk")
    monkeypatch.setenv(ENV, "fsync")
    with pytest.raises(ValueError, match=r"\$CONVERSATION_SESSION_DURABILITY='fsync'"):
        ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir)
    assert not sessions_dir.exists() or not any(sessions_dir.iterdir())


def test_a_store_object_carries_its_level_to_the_sessions_using_it(sessions_dir: Path) -> None:
    store = HistoryStore(sessions_dir, durability="process")
    with ConversationSession(backend=FakeBackend(), store=store) as s:
        assert s.chat("hi").durability == "process"
        sid = s.session_id
    with ConversationSession(backend=FakeBackend(), store=store, durability="power") as s:
        assert s.load_history(sid)
        assert s.chat("again").durability == "power"  # the resumed writer takes the session's level


def test_an_unsaved_turn_has_no_level(sessions_dir: Path) -> None:
    with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, enable_cache=False) as s:
        result = s.chat("hi")
        assert not result.saved and result.durability is None


def test_the_async_session_takes_the_level_too(sessions_dir: Path) -> None:
    async def main() -> tuple[str | None, str | None]:
        out = []
        for level in ("process", "power"):
            async with AsyncConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir,
                                                durability=level) as s:
                out.append((await s.chat("hi")).durability)
        return out[0], out[1]

    assert asyncio.run(main()) == ("process", "power")


def test_many_async_sessions_committing_at_the_power_level_all_save(sessions_dir: Path) -> None:
    # Power-level appends run off the event loop, so their flushes can overlap and be shared.
    async def main() -> list[bool]:
        sessions = [AsyncConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, durability="power")
                    for _ in range(20)]
        try:
            results = await asyncio.gather(*(s.chat(f"question {i}") for i, s in enumerate(sessions)))
            return [r.saved and r.durability == "power" for r in results]
        finally:
            for s in sessions:
                await s.aclose()

    assert all(asyncio.run(main()))
    store = HistoryStore(sessions_dir)
    assert sorted(store.load(i.session_id).messages[0]["content"] for i in store.list_sessions()) == \
        sorted(f"question {i}" for i in range(20))


# -- group commit -------------------------------------------------------------------------------------
class _HeldFirstFlush(GroupSync):
    """The first flush waits until the other committers have queued behind it."""

    def __init__(self, others: int):
        super().__init__()
        self.others = others
        self.batches: list[int] = []

    def _flush(self, batch):  # type: ignore[no-untyped-def]
        if not self.batches:
            with self._cond:  # (followers queue without notifying: look every few ms)
                for _ in range(3000):
                    if len(self._queue) == self.others:
                        break
                    self._cond.wait(0.01)
        self.batches.append(len(batch))
        super()._flush(batch)


def test_committers_that_queue_during_a_flush_share_the_next_one(tmp_path: Path) -> None:
    n = 12
    sync = _HeldFirstFlush(others=n - 1)
    fds = [os.open(tmp_path / f"j{i}", os.O_WRONLY | os.O_CREAT | os.O_APPEND) for i in range(n)]
    errors: list[BaseException] = []

    def commit(fd: int) -> None:
        try:
            os.write(fd, b"a line\n")
            sync.sync(fd)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    first = threading.Thread(target=commit, args=(fds[0],))
    first.start()
    while not sync._leading:  # the first is the leader, held in its flush
        threading.Event().wait(0.001)
    rest = [threading.Thread(target=commit, args=(fd,)) for fd in fds[1:]]
    for t in [*rest]:
        t.start()
    for t in [first, *rest]:
        t.join(30)
    for fd in fds:
        os.close(fd)
    assert errors == []
    assert sync.batches == [1, n - 1]     # two batches for twelve commits
    assert sync.flushes == 2              # one fdatasync, then one syncfs for the eleven


def test_a_failed_flush_is_raised_to_its_committer(tmp_path: Path) -> None:
    r, w = os.pipe()  # fdatasync of a pipe fails (EINVAL): the committer must hear of it
    try:
        with pytest.raises(OSError):
            GroupSync().sync(w)
    finally:
        os.close(r)
        os.close(w)


_FORK_WHILE_FLUSHING = """
import json, os, signal, sys, tempfile, threading, time
from conversation_session import ConversationSession, FakeBackend, HistoryStore
from conversation_session.stores import _fileio

sessions_dir = sys.argv[1]
parent, release, real = os.getpid(), threading.Event(), _fileio._fdatasync

def held_in_the_parent(fd):
    if os.getpid() == parent:
        release.wait(60)  # the parent's leader stays mid-flush while the child is forked
    real(fd)

_fileio._fdatasync = held_in_the_parent
fd = os.open(os.path.join(tempfile.mkdtemp(), "journal"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.write(fd, b"a line")
leader = threading.Thread(target=_fileio.group_sync.sync, args=(fd,))
leader.start()
while not _fileio.group_sync._leading:
    time.sleep(0.001)
pid = os.fork()
if pid == 0:
    try:
        with ConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, durability="power") as s:
            result = s.chat("from the child")
        os._exit(0 if result.saved and result.durability == "power" else 1)
    except BaseException:
        os._exit(2)
release.set()
leader.join(60)
end = time.monotonic() + 30  # a bound on a hang, not a timing assert
while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < end:
    time.sleep(0.01)
if done[0] == 0:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print(json.dumps("the child's commit never returned"))
else:
    print(json.dumps(os.waitstatus_to_exitcode(done[1])))
"""


def test_a_child_forked_during_the_parents_flush_commits_at_the_power_level(sessions_dir: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FORK_WHILE_FLUSHING, str(sessions_dir)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0", done.stdout + done.stderr
    store = HistoryStore(sessions_dir)
    assert [store.load(i.session_id).messages[0]["content"] for i in store.list_sessions()] == ["from the child"]


# -- the chat app and the service ---------------------------------------------------------------------
def test_the_chat_app_takes_durability(sessions_dir: Path) -> None:
    args = parse_args(["--backend", "fake", "--durability", "process", "--sessions-dir", str(sessions_dir)])
    out = io.StringIO()
    app = ChatApp(args, stdin=io.StringIO("hello\n"), stdout=out, stderr=io.StringIO(), interactive=False,
                  backend=FakeBackend())
    assert app.run() == 0
    assert app.session is not None and app.session.durability == "process"
    with pytest.raises(SystemExit):
        parse_args(["--durability", "sometimes"])


def test_both_command_lines_take_the_levels_of_the_one_definition() -> None:
    from conversation_session.stores._durability import DURABILITY_LEVELS

    for parser in (build_parser(), build_chat_parser()):
        action = next(a for a in parser._actions if a.dest == "durability")
        assert tuple(action.choices or ()) == DURABILITY_LEVELS
        # Spelled as the environment variable takes them (any case), not only in lower case.
        assert parser.parse_args(["--durability", "Power"]).durability == "power"
        with pytest.raises(SystemExit):
            parser.parse_args(["--durability", "disk"])


def test_the_service_config_checks_the_level() -> None:
    args = build_parser().parse_args(["--durability", "process"])
    assert config_from_args(args, {}).durability == "process"
    assert ServiceConfig.from_env(ServiceConfig(durability="process").to_env()).durability == "process"
    with pytest.raises(ValueError, match="not a durability level"):
        ServiceConfig(durability="sometimes")


def test_the_service_saves_at_the_level_it_was_started_with(tmp_path: Path) -> None:
    with service(tmp_path / "sessions", "--durability", "process") as svc:
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            sid = client.post("/v1/sessions").json()["session_id"]
            body = client.post(f"/v1/sessions/{sid}/messages", json={"text": "hello"}).json()
    assert body["figures"]["saved"] is True
    assert body["figures"]["durability"] == "process"


# -- PostgreSQL ------------------------------------------------------------------------------------
pg_server = _pg.pg_server
pg_url = _pg.pg_url


def test_postgresql_commits_with_synchronous_commit_as_the_level_asks(pg_url: str) -> None:
    from conversation_session.stores._postgres import PostgresStore

    store = PostgresStore(pg_url, pool_size=1)  # one connection: the probe sees the appends' settings
    try:
        def setting() -> str:
            return str(store._run("probe", lambda conn: conn.execute("SHOW synchronous_commit").fetchone()[0]))

        for level, expected in (("process", "off"), ("power", "on"), ("process", "off")):
            with ConversationSession(backend=FakeBackend(), store=store, durability=level) as s:
                result = s.chat(f"saved at {level}")
                assert result.saved and result.durability == level
                assert setting() == expected
                assert s.undo()  # the rewind's transaction too
                assert setting() == expected
        assert PostgresStore(pg_url, durability="process").durability == "process"
    finally:
        store.close()


def test_an_async_turn_cancelled_while_its_power_commit_waits_keeps_nothing(sessions_dir: Path) -> None:
    # At the power level the commit runs on the shared pool; a task cancelled while that job
    # still waits for a worker must not have its turn saved later behind its back (asyncio
    # cancels the queued job; one already running completes, and the turn is then kept).
    from conversation_session._runtime import MAX_WORKERS, shared_executor

    async def main() -> tuple[list[str], str]:
        s = AsyncConversationSession(backend=FakeBackend(), sessions_dir=sessions_dir, durability="power")
        await s.chat("first")
        pool = shared_executor()
        gate, started = threading.Event(), threading.Semaphore(0)

        def block() -> None:
            started.release()
            gate.wait(30)

        blockers = [pool.submit(block) for _ in range(MAX_WORKERS)]
        for _ in range(MAX_WORKERS):
            assert started.acquire(timeout=30)
        task = asyncio.create_task(s.chat("second"))
        while pool._work_queue.qsize() == 0:  # the commit job is queued behind the blockers
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        for b in blockers:
            b.result(30)
        await asyncio.get_running_loop().run_in_executor(pool, lambda: None)  # the queued commit has run
        history = [m["content"] for m in s.history]
        sid = s.session_id
        await s.aclose()
        return history, sid

    history, sid = asyncio.run(main())
    assert len(history) == 2 and history[0] == "first"
    saved = [m["content"] for m in HistoryStore(sessions_dir).load(sid).messages]
    assert saved == history and "second" not in saved

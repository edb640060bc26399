"""A real PostgreSQL server for the tests: started once per test run, on loopback, in a temp folder.

The Debian package's binaries (``/usr/lib/postgresql/<version>/bin``, or ``initdb`` on ``PATH``)
run a throwaway cluster: ``initdb`` into a fresh directory, ``postgres`` listening on
127.0.0.1 on a free port only (its unix socket inside the temp directory, fsync on), stopped
at the end of the run.  PostgreSQL refuses to run as root, so as root (the CI container) the
cluster belongs to the ``postgres`` system user; as anyone else it runs as that user.

Each test gets its own database (``CREATE DATABASE ... TEMPLATE template0``), so tests never
see each other's sessions.  Fault tests use ``restart()``, ``stop()``/``start()`` and
``terminate_backends()`` on the shared server; each test leaves it running.

Use in a test module (fixtures cannot be shared outside conftest.py, so they are imported)::

    from pg_server import pg_server, pg_url  # noqa: F401
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["WRITER_CHILD", "PgServer", "find_pg_bin", "pg_server", "pg_url", "read", "send", "shared_server",
           "start_writer"]


def find_pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with initdb, else the folder of ``initdb`` on PATH."""

    def version(path: str) -> tuple[int, ...]:
        part = Path(path).parent.parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit()) or (0,)

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One throwaway PostgreSQL cluster."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="cs-pg-"))
        self.datadir = self.root / "data"
        self.sockdir = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._dbs = itertools.count(1)
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._user = _postgres_user()
        self.sockdir.mkdir()
        if self._user is not None:
            for p in (self.root, self.sockdir):
                os.chown(p, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.root, 0o755)
        self._run([str(bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres", "-A", "trust",
                   "-E", "UTF8", "--locale=C", "--no-sync"])
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(
                "\n# conversation_session tests\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "fsync = on\n"
                "max_connections = 300\n"
                "shared_buffers = 32MB\n"
                "logging_collector = off\n"
            )

    # -- running as the postgres user when we are root -----------------------------------------
    def _preexec(self) -> None:
        if self._user is not None:
            os.setgid(self._user.pw_gid)
            os.setuid(self._user.pw_uid)
        os.setsid()  # our own process group: a Ctrl-C of pytest does not reach it first

    def _run(self, argv: list[str]) -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       preexec_fn=self._preexec, cwd=self.root)

    @property
    def dsn_admin(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, dbname: str, password: str | None = None) -> str:
        auth = f"postgres:{password}" if password else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.logfile, "ab")  # handed to the child, closed here once it has it
        try:
            self.proc = subprocess.Popen([str(self.bindir / "postgres"), "-D", str(self.datadir)],
                                         stdout=log, stderr=log, preexec_fn=self._preexec, cwd=self.root)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._accepts():
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not start in {timeout} s:\n{self.log_tail()}")

    def _accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.dsn_admin, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (SIGINT: ends sessions, clean shutdown) or ``immediate``
        (SIGQUIT: like a crash, recovery on the next start)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- helpers for tests ---------------------------------------------------------------------
    def admin(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.dsn_admin, autocommit=True) as conn:
            cur = conn.execute(sql, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def create_database(self) -> str:
        name = f"t{os.getpid()}_{next(self._dbs)}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def terminate_backends(self, dbname: str) -> int:
        """``pg_terminate_backend`` every connection to ``dbname``; how many were killed."""
        rows = self.admin("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        return int(rows[0][0])  # type: ignore[call-overload]


def _postgres_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pass
    # The Debian package creates it; a bare machine with only the binaries may not have one.
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
                   check=True, stdout=subprocess.DEVNULL)
    return pwd.getpwnam("postgres")


_server: PgServer | None = None


def shared_server() -> PgServer:
    """The run's one server, started on first use and stopped when the test process exits."""
    global _server
    if _server is None:
        bindir = find_pg_bin()
        if bindir is None:
            pytest.fail("PostgreSQL's server binaries are missing: install the Debian package "
                        "'postgresql' (./scripts/test does it), or put initdb on PATH")
        server = PgServer(bindir)
        server.start()
        atexit.register(server.close)
        _server = server
    _server.start()  # a fault test may have left it stopped
    return _server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    # The server is a module-level singleton rather than this fixture's value: fixtures are
    # imported into several test modules, and each import would otherwise start its own.
    yield shared_server()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database on the shared server; its URL."""
    pg_server.start()
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.start()
    with contextlib.suppress(Exception):
        pg_server.drop_database(name)


# A writer in a real second process, for kill -9, SIGSTOP and races; works with either store.
#   argv: <store spec: a postgresql:// URL or a folder> <session id or "-" for a new one> <lease TTL>
#   stdin: "turn" appends one turn and prints "ok <messages>" or "failed <error>";
#          "stream" appends turns forever, printing "ok <messages>" after each;
#          "close" closes the writer and prints "closed".
# It prints "open <session id> <messages>" once the session is open, or "locked <holder>".
WRITER_CHILD = """
import sys
from conversation_session import SessionLockedError

spec, sid, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
if "://" in spec:
    from conversation_session.stores._postgres import PostgresStore
    store = PostgresStore(spec, lease_ttl_s=ttl, connect_timeout_s=2)
else:
    from conversation_session import HistoryStore
    store = HistoryStore(spec)
if sys.stdin.readline().strip() != "go":
    sys.exit(2)
try:
    if sid == "-":
        w = store.create("m")
        n = 0
    else:
        w, rec = store.open(sid)
        n = len(rec.messages)
except SessionLockedError as exc:
    print("locked", exc.holder, flush=True)
    sys.exit(0)
print("open", w.session_id, n, flush=True)


def turn():
    global n
    msgs = [{"role": "user", "content": f"question {n // 2} " + "x" * 50},
            {"role": "assistant", "content": f"answer {n // 2} " + "y" * 200}]
    if w.append(n, msgs):
        n += 2
        print("ok", n, flush=True)
    else:
        n += 2  # kept in memory; the next append writes it too
        print("failed", str(w.last_error).replace("\\n", " "), flush=True)


for line in sys.stdin:
    cmd = line.strip()
    if cmd == "turn":
        turn()
    elif cmd == "stream":
        while True:
            turn()
    elif cmd == "close":
        w.close()
        print("closed", flush=True)
"""


def start_writer(spec: str, session_id: str = "-", ttl: float = 15.0, *, go: bool = True) -> subprocess.Popen[str]:
    """A ``WRITER_CHILD`` process; with ``go`` it is told to open at once."""
    import sys

    proc = subprocess.Popen([sys.executable, "-c", WRITER_CHILD, spec, session_id, str(ttl)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if go:
        send(proc, "go")
    return proc


def send(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def read(proc: subprocess.Popen[str]) -> list[str]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"writer process ended (status {proc.poll()})")
    return line.split()

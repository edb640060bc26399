"""Several workers on one store: any worker serves any session, and a worker killed with
``kill -9`` mid-turn leaves the session usable at once from another, with every acknowledged
turn.  Real server processes (separate ones on separate ports, and uvicorn's ``--workers``),
the file store (``flock`` dies with the process) and a real PostgreSQL (the lease expires)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from pg_server import pg_server, pg_url  # noqa: F401
from test_service import LONG, TOKEN_A, TOKEN_B, ServiceProcess, service, wait_for


def _turns(c: httpx.Client, sid: str) -> list[str]:
    history = c.get(f"/v1/sessions/{sid}").json()["history"]
    return [m["content"] for m in history if m["role"] == "user"]


def _kill_mid_turn(a: ServiceProcess, sid: str) -> None:
    """Start a long turn on ``a`` and ``kill -9`` it once the reply is streaming."""
    seen = threading.Event()

    def stream() -> None:
        with httpx.Client(base_url=a.url, timeout=30) as c:
            try:
                with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"text": LONG, "stream": True}) as resp:
                    for line in resp.iter_lines():
                        if line.startswith("event: piece"):
                            seen.set()
            except httpx.HTTPError:
                pass  # the worker died under us: that is the point

    t = threading.Thread(target=stream)
    t.start()
    assert seen.wait(15), "the turn did not start streaming"
    a.kill9()
    t.join(15)


def _two_workers_one_store(a: ServiceProcess, b: ServiceProcess) -> float:
    """Alternate turns, kill ``a`` mid-turn, continue on ``b``; how long ``b`` took to take over."""
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        sid = ca.post("/v1/sessions").json()["session_id"]
        # Any worker serves any session: turns alternate between the two processes.
        for i in range(4):
            c = ca if i % 2 == 0 else cb
            resp = c.post(f"/v1/sessions/{sid}/messages", json={"text": f"turn {i}"})
            assert resp.status_code == 200, resp.text
            assert resp.json()["turn"] == i + 1
        assert cb.get("/v1/sessions").json()["sessions"][0]["turns"] == 4
        _kill_mid_turn(a, sid)
        t0 = time.monotonic()
        resp = cb.post(f"/v1/sessions/{sid}/messages", json={"text": "after the crash"})
        took = time.monotonic() - t0
        assert resp.status_code == 200, resp.text
        assert resp.json()["turn"] == 5
        assert _turns(cb, sid) == ["turn 0", "turn 1", "turn 2", "turn 3", "after the crash"]  # nothing lost
        return took


@pytest.mark.parametrize("keep_open", ["0", "30"])
def test_two_processes_on_one_file_store_one_killed_mid_turn(tmp_path: Path, keep_open: str) -> None:
    """``--keep-open 0``: closed after each request; 30: kept open, handed over on request."""
    store = tmp_path / "sessions"
    with service(store, "--fake-delay", "0.02", "--keep-open", keep_open) as a, \
            service(store, "--fake-delay", "0.02", "--keep-open", keep_open) as b:
        took = _two_workers_one_store(a, b)
    assert took < 2.0  # the flock died with the process: no wait at all


def test_idle_sessions_are_handed_over_between_workers_at_once(tmp_path: Path) -> None:
    store = tmp_path / "sessions"
    with service(store, "--keep-open", "300") as a, service(store, "--keep-open", "300") as b, \
            httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        sid = ca.post("/v1/sessions").json()["session_id"]
        slowest = 0.0
        for i in range(10):
            c = ca if i % 2 == 0 else cb
            t0 = time.monotonic()
            resp = c.post(f"/v1/sessions/{sid}/messages", json={"text": f"turn {i}"})
            slowest = max(slowest, time.monotonic() - t0)
            assert resp.status_code == 200 and resp.json()["turn"] == i + 1, resp.text
            # The worker that answered keeps the session open (no reopen for its next turn).
            assert (a if c is ca else b).health()["open_sessions"] == 1
        assert slowest < 1.0  # asked to let go, not waiting out --keep-open 300 (nor --lock-wait 10)
        assert _turns(cb, sid) == [f"turn {i}" for i in range(10)]
        assert b.health()["open_sessions"] == 1  # B answered the last turn and keeps it
        assert ca.delete(f"/v1/sessions/{sid}").status_code == 200  # B is asked to let go
        assert b.health()["open_sessions"] == 0


def test_busy_across_workers_waits_its_turn_then_409(tmp_path: Path) -> None:
    store = tmp_path / "sessions"
    with service(store, "--fake-delay", "0.02", "--keep-open", "0", "--lock-wait", "0.5") as a, \
            service(store, "--fake-delay", "0.02", "--keep-open", "0", "--lock-wait", "8") as b, \
            httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        sid = ca.post("/v1/sessions").json()["session_id"]
        ca.post(f"/v1/sessions/{sid}/messages", json={"text": "first"}).raise_for_status()
        out: list[httpx.Response] = []
        t = threading.Thread(target=lambda: out.append(
            cb.post(f"/v1/sessions/{sid}/messages", json={"text": " ".join(["w"] * 60)})))
        t.start()
        wait_for(lambda: b.health()["busy_sessions"] == 1, what="B's turn to start")
        # A waits its bound (0.5 s) for the session B is using, then answers 409.
        busy = ca.post(f"/v1/sessions/{sid}/messages", json={"text": "meanwhile"})
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "busy"
        t.join()
        assert out[0].status_code == 200
        waiting: list[httpx.Response] = []
        t2 = threading.Thread(target=lambda: waiting.append(
            ca.post(f"/v1/sessions/{sid}/messages", json={"text": " ".join(["v"] * 60)})))
        t2.start()
        wait_for(lambda: a.health()["busy_sessions"] == 1, what="A's turn to start")
        # B's bound is 8 s: it waits for A's turn to end, then runs.
        queued = cb.post(f"/v1/sessions/{sid}/messages", json={"text": "queued"})
        t2.join()
        assert waiting[0].status_code == 200 and queued.status_code == 200
        assert queued.json()["turn"] == 4 and _turns(cb, sid)[-1] == "queued"


def test_uvicorn_workers_share_the_store_and_survive_a_killed_worker(tmp_path: Path) -> None:
    with service(tmp_path / "sessions", "--workers", "2", "--fake-delay", "0.02") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        pids = set()
        end = time.monotonic() + 20
        while len(pids) < 2 and time.monotonic() < end:
            with httpx.Client(base_url=srv.url, timeout=5) as fresh:  # a new connection each time
                pids.add(fresh.get("/healthz").json()["pid"])
        assert len(pids) == 2, pids
        sid = c.post("/v1/sessions").json()["session_id"]
        for i in range(3):
            assert c.post(f"/v1/sessions/{sid}/messages", json={"text": f"turn {i}"}).json()["turn"] == i + 1

        started = threading.Event()

        def long_turn() -> None:
            with httpx.Client(base_url=srv.url, timeout=30) as own:
                try:
                    with own.stream("POST", f"/v1/sessions/{sid}/messages",
                                    json={"text": LONG, "stream": True}) as resp:
                        for line in resp.iter_lines():
                            if line.startswith("event: piece"):
                                started.set()
                except httpx.HTTPError:
                    pass

        t = threading.Thread(target=long_turn)
        t.start()
        assert started.wait(15)
        victim = None
        end = time.monotonic() + 10
        while victim is None and time.monotonic() < end:  # the worker with the session open
            with httpx.Client(base_url=srv.url, timeout=5) as fresh:
                h = fresh.get("/healthz").json()
            if h["busy_sessions"] == 1:
                victim = h["pid"]
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        t.join(15)
        resp = None
        end = time.monotonic() + 20
        while time.monotonic() < end:  # clients retry on connection errors
            try:
                with httpx.Client(base_url=srv.url, timeout=30) as fresh:
                    resp = fresh.post(f"/v1/sessions/{sid}/messages", json={"text": "after"})
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert resp is not None and resp.status_code == 200, resp and resp.text
        assert resp.json()["turn"] == 4
        with httpx.Client(base_url=srv.url, timeout=30) as fresh:
            assert _turns(fresh, sid) == ["turn 0", "turn 1", "turn 2", "after"]


def test_two_workers_on_postgresql_one_killed_mid_turn(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    args = ("--store", pg_url, "--fake-delay", "0.02", "--keep-open", "0", "--lease-ttl", "2", "--lock-wait", "10")
    with service(tmp_path / "a", *args) as a, service(tmp_path / "b", *args) as b:
        took = _two_workers_one_store(a, b)
    # The killed worker's lease lapses within its TTL (2 s); the request waited for it, bounded.
    assert took < 2.0 + 2.0


@pytest.mark.parametrize("keep_open", ["0", "30"])
def test_restart_keeps_every_acknowledged_turn(tmp_path: Path, keep_open: str) -> None:
    store = tmp_path / "sessions"
    with service(store, "--keep-open", keep_open) as a, httpx.Client(base_url=a.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        for i in range(5):
            c.post(f"/v1/sessions/{sid}/messages", json={"text": f"t{i}"}).raise_for_status()
        a.kill9()  # not even a graceful shutdown
    with service(store) as b, httpx.Client(base_url=b.url, timeout=30) as c:
        assert _turns(c, sid) == [f"t{i}" for i in range(5)]
        assert c.post(f"/v1/sessions/{sid}/messages", json={"text": "t5"}).json()["turn"] == 6


def test_first_turns_racing_on_two_workers_share_one_history(tmp_path: Path) -> None:
    """A new session has no store session yet: two workers making one at once must agree on
    one (the ownership table's compare-and-set), and neither turn may be lost."""
    store = tmp_path / "sessions"
    with service(store, "--fake-delay", "0.01", "--keep-open", "0") as a, \
            service(store, "--fake-delay", "0.01", "--keep-open", "0") as b, \
            httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        def send(name: str, c: httpx.Client, sid: str, text: str, go: threading.Barrier,
                 out: dict[str, httpx.Response]) -> None:
            go.wait()
            out[name] = c.post(f"/v1/sessions/{sid}/messages", json={"text": text})

        for round_ in range(5):
            sid = ca.post("/v1/sessions").json()["session_id"]
            out: dict[str, httpx.Response] = {}
            go = threading.Barrier(2)
            threads = [threading.Thread(target=send, args=(n, c, sid, f"{n} {round_}", go, out))
                       for n, c in (("a", ca), ("b", cb))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(r.status_code for r in out.values()) == [200, 200], {k: r.text for k, r in out.items()}
            assert sorted(r.json()["turn"] for r in out.values()) == [1, 2]
            assert sorted(_turns(ca, sid)) == [f"a {round_}", f"b {round_}"]
            assert ca.get(f"/v1/sessions/{sid}").json()["store_session_id"] == \
                cb.get(f"/v1/sessions/{sid}").json()["store_session_id"]


def test_killed_during_the_first_turn_the_session_starts_afresh(tmp_path: Path) -> None:
    store = tmp_path / "sessions"
    with service(store, "--fake-delay", "0.02", "--keep-open", "0") as a, \
            service(store, "--fake-delay", "0.02", "--keep-open", "0") as b, \
            httpx.Client(base_url=b.url, timeout=30) as cb:
        sid = cb.post("/v1/sessions").json()["session_id"]
        _kill_mid_turn(a, sid)  # its first turn: the store session it made holds no turn
        resp = cb.post(f"/v1/sessions/{sid}/messages", json={"text": "first for real"})
        assert resp.status_code == 200 and resp.json()["turn"] == 1
        assert _turns(cb, sid) == ["first for real"]


# -- the rate limit holds across workers -------------------------------------------------------------
def _spend_across(a: ServiceProcess, b: ServiceProcess, token: str, n: int) -> list[int]:
    """``n`` requests with one token, alternating between the two workers: their status codes."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=a.url, headers=headers, timeout=10) as ca, \
            httpx.Client(base_url=b.url, headers=headers, timeout=10) as cb:
        return [(ca if i % 2 == 0 else cb).get("/v1/sessions").status_code for i in range(n)]


def _rate_limit_is_counted_once(a: ServiceProcess, b: ServiceProcess) -> None:
    # A burst of 5 for one token, hardly any refill: 5 requests pass, whichever worker serves them.
    codes = _spend_across(a, b, TOKEN_A, 8)
    assert codes == [200] * 5 + [429] * 3, codes
    # Another token has its own bucket, on both workers.
    assert _spend_across(a, b, TOKEN_B, 2) == [200, 200]


def test_the_rate_limit_holds_across_workers_on_one_file_store(tmp_path: Path) -> None:
    store = tmp_path / "sessions"
    args = ("--token", TOKEN_A, "--token", TOKEN_B, "--rate", "0.01", "--burst", "5")
    with service(store, *args) as a, service(store, *args) as b:
        _rate_limit_is_counted_once(a, b)


def test_the_rate_limit_holds_across_workers_on_postgresql(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    args = ("--store", pg_url, "--token", TOKEN_A, "--token", TOKEN_B, "--rate", "0.01", "--burst", "5")
    with service(tmp_path / "a", *args) as a, service(tmp_path / "b", *args) as b:
        _rate_limit_is_counted_once(a, b)
        # The refill is shared too: after a pause at a higher rate both workers see the bucket refilled.
    args = ("--store", pg_url, "--token", TOKEN_A, "--rate", "4", "--burst", "2")
    with service(tmp_path / "c", *args) as c, service(tmp_path / "d", *args) as d:
        codes = _spend_across(c, d, TOKEN_A, 4)
        assert codes[:2] == [200, 200] and 429 in codes[2:], codes
        time.sleep(0.6)  # 4 per second: 2 back
        assert _spend_across(c, d, TOKEN_A, 2) == [200, 200]


# -- a session created and not used yet --------------------------------------------------------------
def test_an_unused_session_survives_a_restart_and_another_worker_uses_it(tmp_path: Path) -> None:
    store = tmp_path / "sessions"
    with service(store) as a, httpx.Client(base_url=a.url, timeout=30) as c:
        sid = c.post("/v1/sessions", json={"system_prompt": "You are a lighthouse keeper."}).json()["session_id"]
        a.kill9()  # not a graceful stop: the session exists in the ownership table only
    with service(store) as b, service(store) as other, httpx.Client(base_url=b.url, timeout=30) as cb, \
            httpx.Client(base_url=other.url, timeout=30) as co:
        got = cb.get(f"/v1/sessions/{sid}")
        assert got.status_code == 200 and got.json()["turns"] == 0
        assert sid in [s["session_id"] for s in co.get("/v1/sessions").json()["sessions"]]
        resp = co.post(f"/v1/sessions/{sid}/messages", json={"text": "first"})
        assert resp.status_code == 200 and resp.json()["turn"] == 1, resp.text
        resp = cb.post(f"/v1/sessions/{sid}/messages", json={"text": "second"})
        assert resp.status_code == 200 and resp.json()["turn"] == 2, resp.text
        # Its own system prompt, given at creation, reached the store session made at the first turn.
        assert cb.get(f"/v1/sessions/{sid}").json()["system_prompt"] == "You are a lighthouse keeper."
        exported = json.loads(cb.get(f"/v1/sessions/{sid}/export").content)
        assert exported["system_prompt"] == "You are a lighthouse keeper."
        assert _turns(cb, sid) == ["first", "second"]


def test_an_unused_session_survives_a_restart_on_postgresql(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    args = ("--store", pg_url, "--lease-ttl", "2")
    with service(tmp_path / "a", *args) as a, httpx.Client(base_url=a.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["session_id"]
        a.kill9()
    with service(tmp_path / "b", *args) as b, service(tmp_path / "c", *args) as other, \
            httpx.Client(base_url=b.url, timeout=30) as cb, httpx.Client(base_url=other.url, timeout=30) as co:
        assert cb.get(f"/v1/sessions/{sid}").json()["turns"] == 0
        assert co.post(f"/v1/sessions/{sid}/messages", json={"text": "first"}).json()["turn"] == 1
        assert cb.post(f"/v1/sessions/{sid}/messages", json={"text": "second"}).json()["turn"] == 2
        assert _turns(co, sid) == ["first", "second"]


def test_a_dead_workers_socket_does_not_make_a_reused_pid_a_worker(tmp_path: Path, monkeypatch) -> None:
    """A worker killed with -9 leaves its hand-over socket file; when its pid is reused by
    another program (the chat), a 409 must name that program, not "another worker" (seen in
    CI: a chat holding a session was called a worker of the service)."""
    import socket as socket_mod

    from conversation_session.service import _handoff

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    chat = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = _handoff._folder()
        folder.mkdir(mode=0o700)
        stale = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)
        stale.bind(str(folder / f"{chat.pid}.sock"))
        stale.close()  # the file stays, nobody is bound: what a killed worker leaves
        holder = f"{socket_mod.gethostname()}:{chat.pid}:abcd"
        assert not _handoff.is_worker(chat.pid)
        assert _handoff.describe_holder(holder).startswith(f"another program, process {chat.pid}")
        live = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_DGRAM)  # a live worker's socket
        (folder / f"{chat.pid}.sock").unlink()
        live.bind(str(folder / f"{chat.pid}.sock"))
        try:
            assert _handoff.is_worker(chat.pid)
        finally:
            live.close()
    finally:
        chat.kill()
        chat.wait()

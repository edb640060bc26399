"""Load test of the session service: 200 concurrent clients x 20 turns through 4 workers on
FakeBackend, with one worker killed by ``kill -9`` during the run.

Reports the per-turn latency through the service (client wall time of ``POST
/v1/sessions/{id}/messages``) against the same turns through the library in-process
(``AsyncConversationSession.chat`` on the same kind of store, FakeBackend, no delay), so the
difference is the service's overhead: HTTP, auth, the ownership table, opening and closing the
session per request (several workers share the store), the worker hop.  Then every session's
history is checked: each acknowledged turn present exactly once, in order.

Clients act as a careful device would: each has its own token; on a connection error or a 5xx
it looks at the session's history before sending again (the turn may have been saved just
before the worker died), so a retry never duplicates a turn; a 409 is retried after a pause.

    .venv/bin/python bench/bench_service.py              # PostgreSQL if its binaries are installed
    .venv/bin/python bench/bench_service.py --store file # the file store
    .venv/bin/python bench/bench_service.py --clients 50 --turns 10
    .venv/bin/python bench/bench_service.py --smoke      # 8 clients x 5 turns, 2 workers: proves it runs

Loopback only; the whole run is bounded by ``--deadline`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the library in-process: the baseline ---------------------------------------------------------------
async def library_serial(store_spec: str, turns: int, piece_delay: float = 0.0) -> list[float]:
    """One client, one turn at a time: the per-turn cost without queueing."""
    return await library_run(store_spec, 1, turns, piece_delay)


async def library_run(store_spec: str, clients: int, turns: int, piece_delay: float = 0.0) -> list[float]:
    from conversation_session import AsyncConversationSession, FakeBackend, HistoryStore, StoreAPI

    if "://" in store_spec:
        from conversation_session import PostgresStore

        store: StoreAPI = PostgresStore.from_url(store_spec)
    else:
        store = HistoryStore(store_spec)
    backend = FakeBackend(piece_delay=piece_delay)
    latencies: list[float] = []

    async def client(i: int) -> None:
        async with AsyncConversationSession(backend=backend, store=store, timeout=60) as s:
            for t in range(turns):
                t0 = time.perf_counter()
                await s.chat(f"client {i} turn {t}")
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(client(i) for i in range(clients)))
    store.close()
    return latencies


# -- through the service ------------------------------------------------------------------------------
class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.retries = 0
        self.reconciled = 0       # a turn saved although its answer was lost: found in the history
        self.conflicts = 0
        self.errors: dict[str, int] = {}
        self.done = 0


async def service_client(url: str, token: str, i: int, turns: int, stats: Stats, deadline: float) -> tuple[str, int]:
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as c:
        while True:
            try:
                resp = await c.post("/v1/sessions")
                if resp.status_code == 201:
                    sid: str = resp.json()["session_id"]
                    break
            except httpx.TransportError:
                pass
            stats.retries += 1
            await asyncio.sleep(0.1)
        t = 0
        while t < turns:
            if time.monotonic() > deadline:
                raise TimeoutError("deadline")
            text = f"client {i} turn {t}"
            t0 = time.perf_counter()
            try:
                resp = await c.post(f"/v1/sessions/{sid}/messages", json={"text": text})
            except httpx.TransportError as exc:
                stats.errors[type(exc).__name__] = stats.errors.get(type(exc).__name__, 0) + 1
                resp = None
            if resp is not None and resp.status_code == 200:
                stats.latencies.append(time.perf_counter() - t0)
                stats.done += 1
                t += 1
                continue
            if resp is not None and resp.status_code in (409, 429):
                stats.conflicts += 1
                await asyncio.sleep(0.05)
                continue
            if resp is not None and resp.status_code < 500:
                raise AssertionError(f"unexpected {resp.status_code}: {resp.text}")
            # A lost answer: was the turn saved anyway?  Look before sending again.
            stats.retries += 1
            await asyncio.sleep(0.05)
            while True:
                try:
                    got = await c.get(f"/v1/sessions/{sid}")
                    if got.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
            users = [m["content"] for m in got.json()["history"] if m["role"] == "user"]
            if users and users[-1] == text:
                stats.reconciled += 1
                stats.done += 1
                t += 1
    return sid, i


def worker_pids(url: str, want: int, timeout: float = 20.0) -> set[int]:
    pids: set[int] = set()
    end = time.monotonic() + timeout
    while len(pids) < want and time.monotonic() < end:
        try:
            with httpx.Client(base_url=url, timeout=5) as fresh:
                pids.add(fresh.get("/healthz").json()["pid"])
        except httpx.HTTPError:
            time.sleep(0.05)
    return pids


async def service_run(store_args: list[str], clients: int, turns: int, workers: int, kill_at: float,
                      deadline_s: float, log_dir: Path, serial_turns: int) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tokens = [f"bench-token-{i:04d}-{os.urandom(6).hex()}" for i in range(clients)]
    env = {**os.environ, "CONVERSATION_SESSION_TOKENS": ",".join(tokens)}
    log = open(log_dir / "service.log", "wb")  # closed below
    proc = subprocess.Popen([sys.executable, "-m", "conversation_session.service", "--backend", "fake",
                             "--port", str(port), "--workers", str(workers), "--rate", "100000",
                             "--burst", "100000", "--log-level", "WARNING", "--lock-wait", "10", *store_args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the service did not start; see " + str(log_dir / "service.log"))
        pids_before = worker_pids(url, workers)
        serial = Stats()  # one client first: the per-turn cost without queueing
        await service_client(url, tokens[0], -1, serial_turns, serial, time.monotonic() + deadline_s)
        stats = Stats()
        deadline = time.monotonic() + deadline_s
        killed: dict[str, Any] = {}

        async def killer() -> None:
            total = clients * turns
            while stats.done < total * kill_at:
                await asyncio.sleep(0.01)
            victims = sorted(worker_pids(url, workers, timeout=5))
            if victims:
                os.kill(victims[0], signal.SIGKILL)
                killed.update(pid=victims[0], at_turn=stats.done, at_s=time.monotonic() - t_start)

        t_start = time.monotonic()
        kill_task = asyncio.ensure_future(killer())
        results = await asyncio.gather(*(service_client(url, tokens[i], i, turns, stats, deadline)
                                         for i in range(clients)))
        wall = time.monotonic() - t_start
        kill_task.cancel()
        # Every session: each turn exactly once, in order, read through a fresh connection.
        lost = duplicated = disordered = 0
        async with httpx.AsyncClient(base_url=url, timeout=60) as check:
            for sid, i in results:
                got = await check.get(f"/v1/sessions/{sid}", headers={"Authorization": f"Bearer {tokens[i]}"})
                users = [m["content"] for m in got.json()["history"] if m["role"] == "user"]
                expected = [f"client {i} turn {t}" for t in range(turns)]
                lost += len(set(expected) - set(users))
                duplicated += len(users) - len(set(users))
                disordered += users != expected and not (set(expected) - set(users)) and len(users) == len(set(users))
        pids_after = worker_pids(url, workers, timeout=5)
        return {"stats": stats, "serial": serial.latencies, "wall_s": wall, "killed": killed, "lost": lost,
                "duplicated": duplicated, "disordered": disordered, "pids_before": sorted(pids_before),
                "pids_after": sorted(pids_after)}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", choices=["auto", "postgresql", "file"], default="auto")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--kill-at", type=float, default=0.4, help="kill a worker when this share of turns is done")
    p.add_argument("--keep-open", default=None, help="passed to the service (default: its own)")
    p.add_argument("--serial-turns", type=int, default=200, help="turns of the one-client phase")
    p.add_argument("--deadline", type=float, default=600.0, help="bound on the service run (seconds)")
    p.add_argument("--fake-delay", type=float, default=0.0, help="seconds per reply piece (service and library)")
    p.add_argument("--smoke", action="store_true",
                   help="8 clients x 5 turns through 2 workers, 5 ms per piece (so the kill lands mid-run)")
    args = p.parse_args()
    if args.smoke:
        args.clients, args.turns, args.workers, args.serial_turns = 8, 5, 2, 5
        args.fake_delay, args.deadline = 0.005, 120.0

    from pg_server import PgServer, find_pg_bin

    bindir = find_pg_bin() if args.store != "file" else None
    if args.store == "postgresql" and bindir is None:
        print("PostgreSQL binaries not found", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-service-"))
    pg = None
    try:
        if bindir is not None:
            pg = PgServer(bindir)
            pg.start()
            lib_store = pg.url(pg.create_database())
            svc_store = pg.url(pg.create_database())
            store_args = ["--store", svc_store, "--lease-ttl", "3"]
            kind = "PostgreSQL (local, fsync on)"
        else:
            lib_store = str(tmp / "lib-sessions")
            store_args = ["--sessions-dir", str(tmp / "svc-sessions")]
            kind = "file store"
        if args.fake_delay:
            store_args += ["--fake-delay", str(args.fake_delay)]
        if args.keep_open is not None:
            store_args += ["--keep-open", args.keep_open]
        print(f"store: {kind}; {args.clients} clients x {args.turns} turns; {args.workers} workers; "
              f"keep-open {args.keep_open or 'default'}", flush=True)
        lib_serial = asyncio.run(library_serial(lib_store, args.serial_turns, args.fake_delay))
        t0 = time.monotonic()
        lib = asyncio.run(library_run(lib_store, args.clients, args.turns, args.fake_delay))
        lib_wall = time.monotonic() - t0
        print(f"library in-process: {len(lib)} turns in {lib_wall:.1f} s", flush=True)
        run = asyncio.run(service_run(store_args, args.clients, args.turns, args.workers, args.kill_at,
                                      args.deadline, tmp, args.serial_turns))
        st: Stats = run["stats"]
        lib_p50, lib_p99 = pct(lib, 0.5) * 1000, pct(lib, 0.99) * 1000
        svc_p50, svc_p99 = pct(st.latencies, 0.5) * 1000, pct(st.latencies, 0.99) * 1000
        one_lib = [pct(lib_serial, q) * 1000 for q in (0.5, 0.99)]
        one_svc = [pct(run["serial"], q) * 1000 for q in (0.5, 0.99)]
        report = {
            "store": kind, "keep_open": args.keep_open or "default", "clients": args.clients, "turns": args.turns,
            "workers": args.workers,
            "one_client": {"library_ms": {"p50": round(one_lib[0], 2), "p99": round(one_lib[1], 2)},
                           "service_ms": {"p50": round(one_svc[0], 2), "p99": round(one_svc[1], 2)},
                           "overhead_ms": {"p50": round(one_svc[0] - one_lib[0], 2),
                                           "p99": round(one_svc[1] - one_lib[1], 2)}},
            "library_turns_per_s": round(len(lib) / lib_wall, 1),
            "loaded_library_ms": {"p50": round(lib_p50, 2), "p99": round(lib_p99, 2),
                           "mean": round(statistics.fmean(lib) * 1000, 2)},
            "loaded_service_ms": {"p50": round(svc_p50, 2), "p99": round(svc_p99, 2),
                           "mean": round(statistics.fmean(st.latencies) * 1000, 2)},
            "loaded_difference_ms": {"p50": round(svc_p50 - lib_p50, 2), "p99": round(svc_p99 - lib_p99, 2)},
            "service_wall_s": round(run["wall_s"], 1),
            "turns_per_s": round((st.done) / run["wall_s"], 1),
            "acknowledged": len(st.latencies), "reconciled_after_lost_answer": st.reconciled,
            "retries": st.retries, "conflicts_409_429": st.conflicts, "transport_errors": st.errors,
            "killed_worker": run["killed"], "pids_before": run["pids_before"], "pids_after": run["pids_after"],
            "lost": run["lost"], "duplicated": run["duplicated"], "disordered": run["disordered"],
        }
        print(json.dumps(report, indent=2))
        ok = run["lost"] == 0 and run["duplicated"] == 0 and run["disordered"] == 0 and bool(run["killed"])
        print("OK: no turn lost, duplicated or reordered" if ok else "FAILED", flush=True)
        if ok and args.smoke:
            shutil.rmtree(tmp, ignore_errors=True)  # a passing smoke run leaves nothing behind
        return 0 if ok else 1
    finally:
        if pg is not None:
            pg.close()


if __name__ == "__main__":
    raise SystemExit(main())

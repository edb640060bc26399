"""Encryption at rest in the PostgreSQL store: what a key costs on save, on load and on rekey
(docs/encryption.md), against a real server.

In one process and one run, plain and encrypted sessions interleaved round by round (so the
ratio holds on a noisy machine):

- **save per turn**: ``PostgresWriter.append`` of one turn (a ~200-character question and a
  ~600-character reply, one turn in three in Chinese) to a session already holding N messages,
  at the ``power`` level (``synchronous_commit = on``: the commit waits for the WAL flush) and
  at ``process``;
- **load**: ``PostgresStore.load`` of the whole session (N messages), with a fresh store each
  round (the unwrapped data key is not cached across stores);
- **rekey**: ``PostgresStore.rekey`` of the session (one transaction re-sealing every row).

Without ``--url`` it starts its own PostgreSQL (tests/pg_server.py: loopback, fsync on).

Run: ``.venv/bin/python bench/bench_pg_encryption.py [--messages 5000] [--rounds 7]``
(``--smoke``: 200 messages, 2 rounds of 3 turns, to prove it runs).  Markdown on stdout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "bench")]

from bench_encryption import p90, size_flags, sizes, turn  # noqa: E402  (the file store's turns and sizes)

from conversation_session import PostgresStore  # noqa: E402


def build(url: str, key: bytes | None, n: int, schema: str) -> str:
    with PostgresStore(url, encryption_key=key, schema=schema, durability="process") as store:
        writer = store.create("bench")
        writer.append(0, [m for i in range(n // 2) for m in turn(i)])
        writer.close()
        return writer.session_id


def time_saves(url: str, key: bytes | None, sid: str, turns: int, level: str, schema: str) -> list[float]:
    with PostgresStore(url, encryption_key=key, schema=schema, durability=level) as store:
        writer, record = store.open(sid)
        start, out = len(record.messages), []
        for t in range(turns):
            t0 = time.perf_counter()
            assert writer.append(start, turn(start + t))
            out.append(time.perf_counter() - t0)
            start += 2
        writer.close()
    return out


def time_load(url: str, key: bytes | None, sid: str, schema: str) -> float:
    with PostgresStore(url, encryption_key=key, schema=schema) as store:
        store.load(sid)  # the pool and the schema check, not timed
        t0 = time.perf_counter()
        record = store.load(sid)
        dt = time.perf_counter() - t0
    assert record.messages
    return dt


def time_rekey(url: str, old: bytes | None, sid: str, schema: str) -> float:
    with PostgresStore(url, encryption_key=os.urandom(32), schema=schema) as store:
        assert store.keyring is not None
        if old is not None:
            store.keyring.also_read_with(old)
        store.load_newest()  # the pool, not timed
        t0 = time.perf_counter()
        assert store.rekey(sid)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", help="an existing PostgreSQL database (default: start a throwaway server)")
    size_flags(ap)
    a = sizes(ap.parse_args())
    server = None
    url = a.url
    if url is None:
        from pg_server import PgServer, find_pg_bin

        bindir = find_pg_bin()
        if bindir is None:
            sys.exit("PostgreSQL's server binaries are missing (Debian package 'postgresql'), or give --url")
        server = PgServer(bindir)
        server.start()
        url = server.url(server.create_database())
    key = os.urandom(32)
    res: dict[str, dict[str, list[float]]] = {"plain": {}, "encrypted": {}}
    try:
        for r in range(a.rounds):
            order = [("plain", None), ("encrypted", key)]
            for label, k in order if r % 2 == 0 else order[::-1]:
                schema = f"bench_{label}_{r}"
                sid = build(url, k, a.messages, schema)
                d = res[label]
                d.setdefault("save_power", []).extend(time_saves(url, k, sid, a.turns, "power", schema))
                d.setdefault("save_process", []).extend(time_saves(url, k, sid, a.turns, "process", schema))
                d.setdefault("load", []).append(time_load(url, k, sid, schema))
                d.setdefault("rekey", []).append(time_rekey(url, k, sid, schema))
    finally:
        if server is not None:
            server.close()
    print(f"Messages: {a.messages:,}; {a.rounds} rounds, plain and encrypted interleaved; median (p90) in ms; "
          f"load average {os.getloadavg()[0]:.1f}.\n")
    print("| PostgreSQL | plain | encrypted | ratio |")
    print("|---|---|---|---|")
    rows = (("save_power", "save one turn, `power` level"), ("save_process", "save one turn, `process` level"),
            ("load", f"load {a.messages:,} messages"),
            ("rekey", f"rekey a session of {a.messages:,} messages (plain: its first encryption)"))
    for name, title in rows:
        p, e = res["plain"][name], res["encrypted"][name]
        mp, me = statistics.median(p) * 1000, statistics.median(e) * 1000
        print(f"| {title} | {mp:.2f} ({p90(p):.2f}) | {me:.2f} ({p90(e):.2f}) | {me / mp:.2f}x |")


if __name__ == "__main__":
    main()

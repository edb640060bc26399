"""Encryption at rest: what it costs on save and on load (docs/encryption.md).

In one process and one run, plain and encrypted interleaved block by block (so the ratio holds
on a noisy machine):

- **save per turn**: ``SessionWriter.append`` of one turn (a ~200-character question and a
  ~600-character reply, one turn in three in Chinese) to a session already holding N messages,
  at the ``process`` durability level (no flush: the cost of building, sealing and writing the
  line; at ``power`` the flush, the same for both, is added) and at ``power``;
- **snapshot**: ``SessionWriter.write_snapshot`` of the whole session (the background work);
- **load**: ``HistoryStore.load`` of a session of N messages (a snapshot plus a 2-line journal),
  with a fresh store object each time (no unwrapped-key cache).

Run: ``PYTHONPATH=src python bench/bench_encryption.py [--messages 5000] [--rounds 7]``
(``--smoke``: 200 messages, 2 rounds of 3 turns, to prove it runs).
Markdown on stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from conversation_session import HistoryStore


def turn(i: int) -> list[dict[str, str]]:
    if i % 3 == 2:
        q, a = "请解释一下这个问题的背景和原因。" * 6, "这是一个很好的问题，答案涉及多个方面。" * 16
    else:
        q, a = ("How does the journal keep a turn safe? " * 5)[:200], ("The line is written once. " * 24)[:600]
    return [{"role": "user", "content": f"{i} {q}"}, {"role": "assistant", "content": a}]


def build(folder: Path, key: bytes | None, n: int) -> str:
    store = HistoryStore(folder, encryption_key=key, durability="process")
    writer = store.create("bench")
    messages = [m for i in range(n // 2) for m in turn(i)]
    writer.append(0, messages)
    writer.flush()
    writer.close()
    return writer.session_id


def time_saves(folder: Path, key: bytes | None, sid: str, n: int, turns: int, level: str) -> list[float]:
    store = HistoryStore(folder, encryption_key=key, durability=level)
    writer, record = store.open(sid)
    out = []
    start = len(record.messages)
    for t in range(turns):
        msgs = turn(n + t)
        t0 = time.perf_counter()
        ok = writer.append(start, msgs)
        out.append(time.perf_counter() - t0)
        assert ok
        start += 2
        writer.flush()  # the background snapshot is done before the next turn (a person types)
    writer.close()
    return out


def time_snapshot(folder: Path, key: bytes | None, sid: str) -> float:
    store = HistoryStore(folder, encryption_key=key, durability="process")
    writer, _ = store.open(sid)
    t0 = time.perf_counter()
    writer.write_snapshot()
    dt = time.perf_counter() - t0
    writer.close()
    return dt


def time_load(folder: Path, key: bytes | None, sid: str) -> float:
    store = HistoryStore(folder, encryption_key=key)
    t0 = time.perf_counter()
    record = store.load(sid)
    dt = time.perf_counter() - t0
    assert len(record.messages) > 0
    return dt


def size_flags(ap: argparse.ArgumentParser) -> None:
    """The sizes of a run (both encryption benchmarks): messages, rounds, turns, ``--smoke``."""
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="200 messages, 2 rounds of 3 turns: proves the script runs")


def sizes(a: argparse.Namespace) -> argparse.Namespace:
    if a.smoke:
        a.messages, a.rounds, a.turns = 200, 2, 3
    return a


def p90(xs: list[float]) -> float:
    """The 90th percentile in ms (the largest sample below it: a small run's p90 is its maximum)."""
    return sorted(xs)[min(len(xs) - 1, max(math.ceil(len(xs) * 0.9) - 1, 0))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    size_flags(ap)
    a = sizes(ap.parse_args())
    key = os.urandom(32)
    res: dict[str, dict[str, list[float]]] = {"plain": {}, "encrypted": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for r in range(a.rounds):
            for label, k in (("plain", None), ("encrypted", key)) if r % 2 == 0 else (("encrypted", key),
                                                                                       ("plain", None)):
                folder = Path(tmp) / f"{label}-{r}"
                sid = build(folder, k, a.messages)
                d = res[label]
                d.setdefault("save_process", []).extend(time_saves(folder, k, sid, a.messages, a.turns, "process"))
                d.setdefault("save_power", []).extend(time_saves(folder, k, sid, a.messages + 2 * a.turns,
                                                                 a.turns, "power"))
                d.setdefault("snapshot", []).append(time_snapshot(folder, k, sid))
                # A 2-line journal beside the snapshot, as after a crash.
                store = HistoryStore(folder, encryption_key=k, durability="process")
                writer, rec = store.open(sid)
                core = writer._core
                core._request_snapshot = lambda: None  # type: ignore[method-assign]
                writer.append(len(rec.messages), turn(1))
                writer.append(len(rec.messages) + 2, turn(2))
                core.fd, fd = None, core.fd  # "crash": no final snapshot, the journal stays
                os.close(fd)
                d.setdefault("load", []).extend(time_load(folder, k, sid) for _ in range(3))
                d.setdefault("bytes", []).append(sum(p.stat().st_size for p in folder.iterdir()))
    print(f"Messages: {a.messages:,}; {a.rounds} rounds, plain and encrypted interleaved; median (p90) in ms.\n")
    print("| | plain | encrypted | ratio |")
    print("|---|---|---|---|")
    for name, title in (("save_process", "save one turn, `process` level"), ("save_power", "save one turn, "
                        "`power` level"), ("snapshot", "snapshot of the whole session"),
                        ("load", f"load {a.messages:,} messages + 2 journal lines")):
        p, e = res["plain"][name], res["encrypted"][name]
        mp, me = statistics.median(p) * 1000, statistics.median(e) * 1000
        print(f"| {title} | {mp:.3f} ({p90(p):.3f}) | {me:.3f} ({p90(e):.3f}) | {me / mp:.2f}x |")
    bp, be = statistics.median(res["plain"]["bytes"]), statistics.median(res["encrypted"]["bytes"])
    print(f"| size on disk (snapshot + journal) | {bp / 1e6:.2f} MB | {be / 1e6:.2f} MB | {be / bp:.2f}x |")


if __name__ == "__main__":
    main()

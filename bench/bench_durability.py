"""What each durability level costs per turn, with 1, 10 and 100 sessions committing at once.

Run by hand (about a minute on 2 shared cores; the test suite runs only ``--smoke``)::

    PYTHONPATH=src .venv/bin/python bench/bench_durability.py [--rounds 30] [--dir PATH]
    .venv/bin/python bench/bench_durability.py --smoke     # 3 rounds, 1 and 10 sessions, once: proves it runs

Each of N threads owns one open session of one ``HistoryStore`` in a folder on the disk under
test (default: ``bench/.durability`` on the repository's filesystem, never /tmp, which may be a
tmpfs).  A round: every thread waits at a barrier, then appends one turn (a ~200-character
question and a ~600-character reply, like bench_persistence) with ``SessionWriter.append``;
the time of that call is the per-turn cost.  The background snapshot that follows each turn
runs as in real use.  Rounds are repeated; the table shows the median and the 90th percentile
of the per-turn cost (the latency a turn sees), the wall time of all rounds divided by the
turns made (the throughput cost: it includes the idle wait for snapshots, the same for every
level), and the disk flushes issued per round (``group_sync.flushes``).

Variants, interleaved in the same run (the same-run baseline):

* ``process``: the journal line is written (page cache) before ``append`` returns.
* ``power``: written and flushed, the flushes shared by group commit (``GroupSync``).
* ``power, batch flushed file by file``: group commit whose leader flushes the batch with one
  ``fdatasync`` per file instead of one ``syncfs`` (why ``GroupSync`` uses ``syncfs``).
* ``power, no group commit``: written and flushed with one ``fdatasync`` per turn, each thread on
  its own (``GroupSync.sync`` replaced by ``os.fdatasync``): what group commit saves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from conversation_session.stores import _fileio  # noqa: E402
from conversation_session.stores._file import HistoryStore  # noqa: E402

QUESTION = "How do I keep the sourdough starter alive while I am away for a week? " * 3
REPLY = "Feed it, refrigerate it, and give it two feedings at room temperature when you return. " * 7


def run(directory: Path, sessions: int, level: str, rounds: int, grouped: bool | str) -> dict[str, float]:
    shutil.rmtree(directory, ignore_errors=True)
    store = HistoryStore(directory, durability=level)
    writers = [store.create("bench") for _ in range(sessions)]
    barrier = threading.Barrier(sessions)
    costs: list[float] = []
    lock = threading.Lock()
    original = _fileio.group_sync.sync
    original_syncfs = _fileio.group_sync._syncfs
    if not grouped:
        _fileio.group_sync.sync = os.fdatasync  # type: ignore[method-assign]
    elif grouped == "each":
        _fileio.group_sync._syncfs = None
    flushes0 = _fileio.group_sync.flushes

    def worker(w: object) -> None:
        mine = []
        for r in range(rounds):
            barrier.wait()
            start = 2 * r
            t0 = time.perf_counter()
            ok = w.append(start, [{"role": "user", "content": QUESTION},  # type: ignore[attr-defined]
                                  {"role": "assistant", "content": REPLY}])
            mine.append(time.perf_counter() - t0)
            assert ok
            # Idle between turns, as in real use (a model takes far longer than a snapshot):
            # the background snapshot of this turn finishes before the next round.
            w.flush()  # type: ignore[attr-defined]
        with lock:
            costs.extend(mine)

    try:
        threads = [threading.Thread(target=worker, args=(w,)) for w in writers]
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
    finally:
        _fileio.group_sync.sync = original  # type: ignore[method-assign]
        _fileio.group_sync._syncfs = original_syncfs
    flushes = _fileio.group_sync.flushes - flushes0
    for w in writers:
        w.close()
    shutil.rmtree(directory, ignore_errors=True)
    costs.sort()
    return {"median_ms": statistics.median(costs) * 1000,
            "amortized_ms": wall / (rounds * sessions) * 1000,
            "p90_ms": costs[int(0.9 * (len(costs) - 1))] * 1000,
            "flushes_per_round": flushes / rounds if grouped else float(sessions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / ".durability")
    ap.add_argument("--smoke", action="store_true", help="3 rounds, 1 and 10 sessions, once: proves the script runs")
    args = ap.parse_args()
    sizes, repeats = ((1, 10), 1) if args.smoke else ((1, 10, 100), 2)
    if args.smoke:
        args.rounds = 3
    variants: list[tuple[str, str, bool | str]] = [
                ("process", "process", True), ("power", "power", True),
                ("power, batch flushed file by file", "power", "each"),
                ("power, no group commit", "power", False)]
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for _repeat in range(repeats):  # interleaved twice: a noisy neighbour hits every variant alike
        for n in sizes:
            for name, level, grouped in variants:
                results.setdefault((n, name), []).append(run(args.dir, n, level, args.rounds, grouped))
    print(f"Disk: the filesystem of {args.dir.parent} ({os.uname().sysname}), {args.rounds} rounds x {repeats}\n")
    print("| sessions at once | level | per-turn median (ms) | per-turn p90 (ms) | wall time per turn (ms) "
          "| disk flushes per round |")
    print("|---:|---|---:|---:|---:|---:|")
    for (n, name), rs in results.items():
        med = statistics.median(r["median_ms"] for r in rs)
        p90 = statistics.median(r["p90_ms"] for r in rs)
        am = statistics.median(r["amortized_ms"] for r in rs)
        fl = statistics.median(r["flushes_per_round"] for r in rs)
        print(f"| {n} | {name} | {med:.2f} | {p90:.2f} | {am:.2f} | {fl:.1f} |")


if __name__ == "__main__":
    main()

"""Many sessions in one process: 1,000 concurrent async sessions on FakeBackend, 20 turns each.

What it reports (one run, one process):

* session-layer overhead per turn: the time the session layer itself spends on the event loop
  for one turn (planning the prompt, handing each piece on, committing and journaling the
  turn: every synchronous step of ``_TurnSteps``, timed), p50 / p99 / max over all 20,000
  turns (wall time per turn is meaningless here: a turn waits for 999 others);
* the process's thread count while all sessions are open and talking (target: at most 16,
  whatever the number of sessions);
* memory per idle open session: RSS with N sessions open (each with 20 completed turns) minus
  RSS before they were opened, divided by N;
* throughput: turns per second through one event loop (FakeBackend streams two pieces with a
  1 ms pause each, so the loop interleaves as with a real stream).

Run:  .venv/bin/python bench/bench_async.py [--sessions 1000] [--turns 20]     # ~1 minute
      .venv/bin/python bench/bench_async.py --smoke     # 20 sessions x 3 turns: proves it runs
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from conversation_session import AsyncConversationSession, FakeBackend, Turn  # noqa: E402

OVERHEADS: list[float] = []


def _instrument() -> None:
    """Time every synchronous step of a turn, per turn.  The steps are private (``_TurnSteps``,
    beside the public ``Turn``): found through ``Turn``'s module, which follows the package's
    moves, and a clear error if they are gone."""
    steps = getattr(sys.modules[Turn.__module__], "_TurnSteps", None)
    if steps is None or not all(hasattr(steps, m) for m in ("accept", "complete")):
        raise SystemExit(f"{Turn.__module__} has no _TurnSteps.accept/complete any more: "
                         "bench_async.py's instrumentation must follow the turn's steps")
    init, accept, complete = steps.__init__, steps.accept, steps.complete

    def timed_init(self, *a, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        init(self, *a, **k)
        self._bench_s = time.perf_counter() - t0

    def timed_accept(self, piece):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        accept(self, piece)
        self._bench_s += time.perf_counter() - t0

    def timed_complete(self, **k):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        result = complete(self, **k)
        OVERHEADS.append(self._bench_s + time.perf_counter() - t0)
        return result

    steps.__init__, steps.accept, steps.complete = timed_init, timed_accept, timed_complete  # type: ignore[method-assign]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def run(n_sessions: int, turns: int, folder: str) -> None:
    _instrument()
    fake = FakeBackend(piece_delay=0.001)  # each piece yields to the loop, as a real stream does
    overheads = OVERHEADS
    max_threads = threading.active_count()

    gc.collect()
    rss0 = rss_bytes()
    sessions = [AsyncConversationSession(backend=fake, sessions_dir=folder, timeout=60) for _ in range(n_sessions)]
    opened = asyncio.Event()

    async def talk(s: AsyncConversationSession, i: int) -> None:
        nonlocal max_threads
        for t in range(turns):
            await s.chat(f"session {i} turn {t}: a short spoken question")
            max_threads = max(max_threads, threading.active_count())

    t0 = time.perf_counter()
    await asyncio.gather(*(talk(s, i) for i, s in enumerate(sessions)))
    wall = time.perf_counter() - t0
    opened.set()
    # The sessions are open and idle now: what does each cost?
    await asyncio.sleep(1.0)  # background snapshots settle
    gc.collect()
    per_session = (rss_bytes() - rss0) / n_sessions
    threads_idle = threading.active_count()
    for s in sessions:
        await s.aclose()
    print(f"sessions: {n_sessions}, turns each: {turns}, total turns: {len(overheads)} in {wall:.1f} s "
          f"({len(overheads) / wall:.0f} turns/s)")
    print(f"session-layer overhead per turn: p50 {statistics.median(overheads) * 1e3:.3f} ms, "
          f"p99 {pct(overheads, 0.99) * 1e3:.3f} ms, max {max(overheads) * 1e3:.1f} ms")
    print(f"threads: at most {max_threads} while talking, {threads_idle} idle")
    print(f"memory per idle open session ({turns} turns each): {per_session / 1024:.1f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="20 sessions x 3 turns: proves the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.sessions, args.turns = 20, 3
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(run(args.sessions, args.turns, folder))


if __name__ == "__main__":
    main()

"""The overhead of a tool round: what a tool call costs the session (the journal and the
dispatch) next to calling the function directly.  Run by hand (the test suite runs only
``--smoke``)::

    PYTHONPATH=src .venv/bin/python bench/bench_tools.py [--turns 300] [--dir PATH]
    PYTHONPATH=src .venv/bin/python bench/bench_tools.py --smoke    # a few seconds

The tool is trivial (it returns a constant string), so every figure is overhead.  Measured in
one process, variants interleaved block by block (the same-run baseline, so ratios hold on a
noisy machine), on ``FakeBackend`` with no delay, in a sessions folder on the disk under test
(default ``bench/.tools``, never /tmp, which may be a tmpfs):

* ``direct call``: ``fn(**arguments)``, what the function itself costs.
* ``dispatch``: ``run_call(tool, arguments, cancel)``: the thread of its own, the wait, the
  outcome (no journal).
* ``turn, 0 calls``: one ``chat()`` with the tool offered but not called (the baseline).
* ``turn, 1 call`` / ``turn, 4 calls`` (one round): the same turn where the model asks for 1 or
  4 calls, then answers.  The extra time over the baseline, divided by the calls, is the
  per-call overhead of a round: the intent committed before the calls (one journal line), each
  result committed before the model sees it (one line per call), the dispatch, and the second
  request to the (fake) model.

Each turn variant runs at durability ``process`` (journal lines written to the page cache) and
``power`` (each step flushed to the disk before the next: the crash rule's cost on this disk).
Reported: the median and the 90th percentile per turn, and the overhead per call.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from conversation_session import ConversationSession, FakeBackend, ToolCalls, tool
from conversation_session.backends._base import CancelToken
from conversation_session.tools import run_call

ROOT = Path(__file__).resolve().parent.parent


def set_light(room: str, on: bool) -> str:
    """Switch a room's light.

    Args:
        room: the room's name
        on: true to switch it on
    """
    return "ok"


ARGS = {"room": "kitchen", "on": True}


def per_call(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of ``fn``, the median of 5 batches of ``n``."""
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        batches.append((time.perf_counter() - t0) / n)
    return statistics.median(batches)


class TurnVariant:
    """A session that makes turns with ``calls`` tool calls each, at ``durability``."""

    def __init__(self, folder: Path, calls: int, durability: str):
        self.calls = calls
        self.fake = FakeBackend()
        self.session = ConversationSession(backend=self.fake, sessions_dir=folder, tools=[set_light],
                                           durability=durability, timeout=None, persist_kv_cache=False)
        self.times: list[float] = []

    def turn(self) -> None:
        if self.calls:
            self.fake.enqueue(ToolCalls([("set_light", ARGS)] * self.calls))
        self.fake.enqueue("The light is on.")
        t0 = time.perf_counter()
        result = self.session.chat("Turn the kitchen light on")
        self.times.append(time.perf_counter() - t0)
        assert len(result.tool_calls) == self.calls and all(c.get("result") == "ok" for c in result.tool_calls)

    def close(self) -> None:
        self.session.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=300, help="turns per variant (default 300)")
    ap.add_argument("--block", type=int, default=10, help="turns per variant in a row before the next (default 10)")
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / ".tools", help="where the sessions are written")
    ap.add_argument("--smoke", action="store_true", help="a quick run (20 turns per variant) to check it works")
    a = ap.parse_args()
    turns = 20 if a.smoke else a.turns
    a.dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-tools-", dir=a.dir))
    try:
        t = tool(set_light)
        cancel = CancelToken()
        direct = per_call(lambda: set_light(**ARGS), 20_000 if not a.smoke else 2_000)
        dispatch = per_call(lambda: run_call(t, ARGS, cancel), 2_000 if not a.smoke else 200)
        variants = {(d, k): TurnVariant(folder / f"{d}-{k}", k, d) for d in ("process", "power") for k in (0, 1, 4)}
        try:
            for v in variants.values():  # warm: the first turns open files, start threads
                for _ in range(3):
                    v.turn()
                v.times.clear()
            done = 0
            while done < turns:
                n = min(a.block, turns - done)
                for v in variants.values():
                    for _ in range(n):
                        v.turn()
                done += n
        finally:
            for v in variants.values():
                v.close()
        print(f"{turns} turns per variant, blocks of {a.block}, folder {a.dir}\n")
        print("| variant | median | p90 | overhead per call (median over 0 calls) |")
        print("|---|---:|---:|---:|")
        print(f"| direct call `set_light(**args)` | {direct * 1e6:.2f} µs | | |")
        print(f"| dispatch `run_call` (thread, wait, outcome; no journal) | {dispatch * 1e6:.1f} µs | | |")
        for d in ("process", "power"):
            base = statistics.median(variants[(d, 0)].times)
            for k in (0, 1, 4):
                ts = variants[(d, k)].times
                med = statistics.median(ts)
                over = f"{(med - base) / k * 1e3:.3f} ms" if k else "(baseline)"
                print(f"| turn, {k} call(s), durability {d} | {med * 1e3:.3f} ms | {pct(ts, 0.9) * 1e3:.3f} ms "
                      f"| {over} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Every crash state of the recorded runs (tests/crash_states.py), at both durability levels.

Run by hand (a minute or two on 2 shared cores; needs strace)::

    PYTHONPATH=src .venv/bin/python bench/bench_crash_states.py [--load-turns 12] [--runs 5]
    .venv/bin/python bench/bench_crash_states.py --smoke    # 1 run, 2 turns under load: proves it runs

Each run records the driver under strace (a real session: appends, title, retry, undo, explicit
snapshots, ``--load-turns`` back-to-back turns with the journal cut under load, close, resume,
``HistoryStore.set_title``) and checks *every* distinct state a power cut can leave at every point
of the trace, including every two files or folders diverging at once (the CI test checks a
sample of 300 single-divergence states).  Background snapshots make each run's trace
a little different, so several runs explore more interleavings.  Also runs the planted defects
(the checker's self-test): each must be caught.

Printed: per level, the crash points, the distinct states explored, the states that lost an
acknowledged operation (power: must be 0) and the failures (must be 0).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from crash_states import BREAKS, check, record  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load-turns", type=int, default=12)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="1 run of each, 2 turns under load: proves the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.runs, args.load_turns = 1, 2
    if shutil.which("strace") is None:
        print("strace is not installed (Debian package 'strace'): skipped")
        return 0 if args.smoke else 1
    bad = 0
    print("| level | runs | crash points | distinct states explored | (crash point, state) pairs missing an "
          "acknowledged operation | failures | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for level in ("power", "process"):
        points = explored = lost = failures = 0
        t0 = time.perf_counter()
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
                verdict = check(record(level, Path(tmp), load_turns=args.load_turns), pairs=True)
            points += verdict.crash_points
            explored += verdict.explored
            lost += verdict.lost_turns
            failures += len(verdict.failures)
            for f in verdict.failures[:5]:
                print(f"  {level}: {f}", file=sys.stderr)
        bad += failures + (lost if level == "power" else 0)
        print(f"| {level} | {args.runs} | {points} | {explored} | {lost} | {failures} | "
              f"{time.perf_counter() - t0:.0f} |")
    print("\nPlanted defects (power level; each must be caught):\n")
    print("| defect | distinct states | failures found |")
    print("|---|---:|---:|")
    for planted in BREAKS[1:]:
        with tempfile.TemporaryDirectory(dir=ROOT / "bench") as tmp:
            verdict = check(record("power", Path(tmp), load_turns=args.load_turns, breaks=planted))
        bad += not verdict.failures
        print(f"| {planted} | {verdict.explored} | {len(verdict.failures)} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

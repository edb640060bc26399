"""Listing cost: ``HistoryStore.list_sessions()`` over N sessions of M messages.

Three cases per size: the first listing (no cache: every snapshot is parsed once, as every
listing did before), a warm listing (nothing changed: a stat and the journal per session),
and a listing after one session took a turn (that one snapshot is parsed again).  The old
store (a full load of every session per listing) is measured too when ``--old REV`` names a
git revision to compare with.

    .venv/bin/python bench/bench_listing.py                 # 300 x 1,000 and 100 x 100
    .venv/bin/python bench/bench_listing.py --old 75be06a   # also the store before the cache
    .venv/bin/python bench/bench_listing.py --smoke         # 5 x 10 and 10 x 20, once: proves it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(directory: Path, sessions: int, messages: int) -> None:
    directory.mkdir(parents=True)
    history = []
    for n in range(messages // 2):
        history += [{"role": "user", "content": f"问题 {n}: " + "x" * 80},
                    {"role": "assistant", "content": f"回答 {n}: " + "y" * 200}]
    for i in range(sessions):
        data = {"schema_version": 1, "session_id": f"session_{i}", "created_at": "2025-10-24T12:00:00",
                "updated_at": "2025-10-24T12:00:00", "llm_model": "m", "turns": messages // 2,
                "conversation_history": history}
        (directory / f"session_{i}.json").write_text(json.dumps(data, ensure_ascii=False))


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(src: Path, sessions: int, messages: int, repeat: int) -> dict[str, float]:
    """Run in a child so the store under test is the one at ``src``."""
    code = f"""
import json, sys, time, shutil, statistics
sys.path.insert(0, {str(src)!r})
sys.path.insert(0, {str(ROOT / 'bench')!r})
from pathlib import Path
from bench_listing import build, timed
from conversation_session import HistoryStore
base = Path(sys.argv[1])
build(base / "s", {sessions}, {messages})
store = HistoryStore(base / "s")
out = {{}}
cold = []
for _ in range({repeat}):
    (base / "s" / ".list-cache.json").unlink(missing_ok=True)
    t0 = time.perf_counter(); n = len(store.list_sessions()); cold.append(time.perf_counter() - t0)
assert n == {sessions}, n
out["cold"] = statistics.median(cold)
out["warm"] = timed(store.list_sessions, {repeat})
def one_changed():
    p = base / "s" / "session_0.json"
    data = p.read_bytes(); p.write_bytes(data)  # a new mtime: that snapshot is parsed again
    store.list_sessions()
out["one_changed"] = timed(one_changed, {repeat})
print(json.dumps(out))
"""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="a git revision whose store to compare with (its src/ is exported to a temp dir)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--smoke", action="store_true", help="5 x 10 and 10 x 20 sessions, once: proves the script runs")
    args = ap.parse_args()
    sizes = ((5, 10), (10, 20)) if args.smoke else ((100, 100), (300, 1000))
    if args.smoke:
        args.repeat = 1
    sources = {"this tree": ROOT / "src"}
    tmp_old = None
    if args.old:
        tmp_old = tempfile.TemporaryDirectory()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.old, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp_old.name], input=archive.stdout, check=True)
        sources[f"old ({args.old})"] = Path(tmp_old.name) / "src"
    print(f"list_sessions(), median of {args.repeat}, {os.cpu_count()} CPU(s)")
    print(f"{'store':<18} {'sessions x messages':>20} {'first (no cache)':>17} {'warm':>10} {'one changed':>12}")
    for sessions, messages in sizes:
        for name, src in sources.items():
            r = measure(src, sessions, messages, args.repeat)
            print(f"{name:<18} {f'{sessions} x {messages:,}':>20} {r['cold'] * 1000:>14.1f} ms "
                  f"{r['warm'] * 1000:>7.1f} ms {r['one_changed'] * 1000:>9.1f} ms")
    if tmp_old is not None:
        tmp_old.cleanup()


if __name__ == "__main__":
    main()

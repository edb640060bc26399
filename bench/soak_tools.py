"""Crash soak of tool-using turns, run by hand: random ``kill -9`` of a real process while it
chats with tools, then a resume and a check of the crash rule (docs/tools.md).

    .venv/bin/python bench/soak_tools.py                     # 1,000 kills
    .venv/bin/python bench/soak_tools.py --kills 200 --max-wait 0.3
    .venv/bin/python bench/soak_tools.py --smoke             # 8 kills: proves it runs

The worker chats on ``FakeBackend`` in one session; every turn asks for two calls of a counting
tool (each run appends its unique tag to a file, fsynced) and then answers.  After each
``chat()`` returns, it appends the turn number to its acknowledgement file.  The parent kills it
at a random moment, resumes the session (``load_history()``, which records an unknown outcome
for a call left without a result), checks, and starts the worker again.  Checked after every
kill: no tool run twice, no run without its recorded call, every recorded call with exactly one
result (no orphan), every acknowledged turn on disk.  Prints a Markdown table; exit status 0
only if every count that must be 0 is.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conversation_session import ConversationSession, FakeBackend, ToolCalls
from conversation_session.tools import UNKNOWN_OUTCOME


def run_worker(root: Path) -> int:
    runs_fd = os.open(root / "runs", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    ack_fd = os.open(root / "acks", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def count(tag: str) -> str:
        """Count once."""
        os.write(runs_fd, f"{tag}\n".encode())
        os.fsync(runs_fd)
        return f"counted {tag}"

    fake = FakeBackend(piece_delay=0.002)
    id_file = root / "session.id"
    with ConversationSession(backend=fake, sessions_dir=root / "sessions", tools=[count], timeout=None) as s:
        if id_file.exists():
            s.load_history(id_file.read_text().strip())
        turn = s.turns
        while True:
            fake.enqueue(ToolCalls([("count", {"tag": f"t{turn}a"}), ("count", {"tag": f"t{turn}b"})]))
            fake.enqueue(["done ", "with ", f"turn {turn}"])
            s.chat(f"turn {turn}")
            if not id_file.exists():
                id_file.write_text(s.session_id)
            os.write(ack_fd, f"{turn}\n".encode())
            turn = s.turns


def check(root: Path, totals: collections.Counter[str]) -> None:
    """Resume the session as a user would and count what the crash rule forbids."""
    if not (root / "session.id").exists():
        return
    sid = (root / "session.id").read_text().strip()
    with ConversationSession(backend=FakeBackend(), sessions_dir=root / "sessions") as s:
        if not s.load_history(sid):
            totals["sessions lost"] += 1
            return
        history = s.history
    calls: collections.Counter[str] = collections.Counter()
    tag_of: dict[str, str] = {}
    results: collections.Counter[str] = collections.Counter()
    unknown = 0
    for m in history:
        for c in m.get("tool_calls", []):
            calls[c["function"]["arguments"]["tag"]] += 1
            tag_of[c["id"]] = c["function"]["arguments"]["tag"]
        if m["role"] == "tool":
            results[m["tool_call_id"]] += 1
            unknown += m["content"] == UNKNOWN_OUTCOME
    runs = collections.Counter((root / "runs").read_text().split()) if (root / "runs").exists() else {}
    acked = set((root / "acks").read_text().split()) if (root / "acks").exists() else set()
    users = {m["content"].removeprefix("turn ") for m in history if m["role"] == "user"}
    totals["duplicate runs"] = sum(n - 1 for n in runs.values() if n > 1)
    totals["runs without a recorded call"] = sum(1 for tag in runs if tag not in calls)
    totals["calls recorded twice"] = sum(n - 1 for n in calls.values() if n > 1)
    totals["calls without exactly one result"] = sum(1 for cid in tag_of if results[cid] != 1)
    totals["acknowledged turns lost"] = len(acked - users)
    totals["runs"] = sum(runs.values())
    totals["calls recorded"] = len(tag_of)
    totals["turns acknowledged"] = len(acked)
    totals["unknown outcomes recorded"] = unknown


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--max-wait", type=float, default=0.25, help="longest wait before a kill, after start-up")
    parser.add_argument("--per-session", type=int, default=25, help="kills before a fresh session")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="8 kills, a fresh session after 4: proves it runs")
    args = parser.parse_args()
    if args.smoke:
        args.kills, args.per_session = 8, 4
    if args.worker:
        return run_worker(Path(args.worker))
    rng = random.Random(22)
    grand: collections.Counter[str] = collections.Counter()
    totals: collections.Counter[str] = collections.Counter()
    root = Path(tempfile.mkdtemp(prefix="soak_tools_"))
    t0 = time.monotonic()
    for kill in range(args.kills):
        if kill and kill % args.per_session == 0:
            # A fresh session (and folder) now and then: a session of thousands of turns would
            # make each restart measure loading, not crashing.
            grand += totals
            totals = collections.Counter()
            shutil.rmtree(root, ignore_errors=True)
            root = Path(tempfile.mkdtemp(prefix="soak_tools_"))
        proc = subprocess.Popen([sys.executable, __file__, "--worker", str(root)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        # Wait for the worker to be chatting (its imports take most of a start), then a random moment.
        marker = root / "acks"
        before = marker.stat().st_size if marker.exists() else 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if marker.exists() and marker.stat().st_size > before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, args.max_wait))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        totals["kills"] += 1
        check(root, totals)
    grand += totals
    shutil.rmtree(root, ignore_errors=True)
    totals = grand
    elapsed = time.monotonic() - t0
    must_be_zero = ("duplicate runs", "runs without a recorded call", "calls recorded twice",
                    "calls without exactly one result", "acknowledged turns lost", "sessions lost")
    print("| figure | value |\n|---|---|")
    for key in ("kills", "turns acknowledged", "calls recorded", "runs", "unknown outcomes recorded", *must_be_zero):
        print(f"| {key} | {totals[key]} |")
    print(f"\n{elapsed:.0f} s, a fresh session every {args.per_session} kills")
    return 0 if all(totals[k] == 0 for k in must_be_zero) else 1


if __name__ == "__main__":
    sys.exit(main())

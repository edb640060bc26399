"""Soak test, run by hand: N processes x M turns on FakeBackend while random ``kill -9``s land.

    .venv/bin/python bench/soak.py                          # 4 processes x 200 turns
    .venv/bin/python bench/soak.py --workers 8 --turns 500 --max-seconds 600
    .venv/bin/python bench/soak.py --smoke       # 2 processes x 80 turns, 4 kills: proves it runs

Each worker chats in its own session in one shared sessions folder and, after every
``chat()`` returns, appends the turn number to its acknowledgement file.  The parent kills a
random worker every few hundred milliseconds; after each kill it checks the session on disk
(every acknowledged turn must be there, in order, with nothing duplicated), then restarts the
worker, which resumes its session and carries on.  At the end it prints a Markdown table:
turns acknowledged, turns on disk, lost (must be 0) and corrupt (must be 0), and runs the
doctor over the folder (the ``doctor`` command, as a user would).  Exit status 0 only if nothing
was lost or corrupt.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from conversation_session import ConversationSession, FakeBackend, HistoryStore, SessionError


# -- worker ----------------------------------------------------------------------------------------
def write_whole(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or what it held before, whenever the process is killed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def user_text(worker: int, turn: int) -> str:
    return f"w{worker} t{turn}"


def run_worker(root: Path, worker: int, turns: int, piece_delay: float) -> int:
    sessions = root / "sessions"
    id_file = root / f"worker_{worker}.id"
    ack_fd = os.open(root / f"worker_{worker}.acks", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with ConversationSession(backend=FakeBackend(piece_delay=piece_delay), sessions_dir=sessions,
                             timeout=None) as s:
        known = id_file.exists()
        if known and not s.load_history(id_file.read_text().strip()):
            print(f"worker {worker}: its session {id_file.read_text().strip()} is gone", file=sys.stderr)
            return 3
        turn = sum(m["role"] == "user" for m in s.history)
        while turn < turns:
            result = s.chat(user_text(worker, turn))
            if not result.saved:
                print(f"worker {worker}: turn {turn} not saved", file=sys.stderr)
                return 4
            if not known:
                write_whole(id_file, s.session_id.encode())
                known = True
            os.write(ack_fd, f"{turn}\n".encode())  # acknowledged: chat() has returned
            turn += 1
    return 0


# -- parent ----------------------------------------------------------------------------------------
@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    done: bool = False
    starts: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class Tally:
    kills: int = 0
    checks: int = 0
    lost: int = 0
    corrupt: int = 0
    notes: list[str] = field(default_factory=list)


def acked_turns(root: Path, worker: int) -> set[int]:
    try:
        text = (root / f"worker_{worker}.acks").read_text()
    except FileNotFoundError:
        return set()
    return {int(x) for x in text.split() if x.isdigit()}


def check(root: Path, worker: int, tally: Tally) -> tuple[int, int]:
    """Compare a stopped worker's session with its acknowledgements; returns (acked, on disk)."""
    tally.checks += 1
    acked = acked_turns(root, worker)
    id_file = root / f"worker_{worker}.id"
    if not id_file.exists():
        if acked:
            tally.lost += len(acked)
            tally.notes.append(f"worker {worker}: {len(acked)} turn(s) acknowledged but no session id")
        return len(acked), 0
    sid = id_file.read_text().strip()
    try:
        record = HistoryStore(root / "sessions").load(sid)
    except (SessionError, OSError) as exc:
        tally.corrupt += 1
        tally.notes.append(f"worker {worker}: session {sid} does not load: {exc}")
        return len(acked), 0
    msgs = record.messages
    users = [m["content"] for m in msgs if m["role"] == "user"]
    shape_ok = (len(msgs) % 2 == 0 and all(m["role"] == ("user" if i % 2 == 0 else "assistant")
                                           for i, m in enumerate(msgs)))
    if not shape_ok or users != [user_text(worker, n) for n in range(len(users))]:
        tally.corrupt += 1
        tally.notes.append(f"worker {worker}: session {sid} is out of order or duplicated")
    missing = sorted(n for n in acked if n >= len(users))
    if missing:
        tally.lost += len(missing)
        tally.notes.append(f"worker {worker}: acknowledged turns missing on disk: {missing[:10]}")
    return len(acked), len(users)


def start(w: Worker, root: Path, args: argparse.Namespace) -> None:
    w.starts += 1
    with open(root / f"worker_{w.index}.err", "ab") as err:  # a file: a full pipe would stall the worker
        w.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(w.index), "--dir", str(root), "--turns", str(args.turns),
             "--piece-delay", str(args.piece_delay)],
            stdout=subprocess.DEVNULL, stderr=err,
        )


def run_doctor(sessions: Path) -> list[str]:
    """The ``doctor`` command over ``sessions``: the lines it reports (none when all is well)."""
    proc = subprocess.run([sys.executable, "-m", "conversation_session", "doctor", "--sessions-dir", str(sessions)],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.strip() and not line.startswith("no problems in")]
    if proc.returncode not in (0, 1) or (proc.returncode == 1 and not lines):
        lines.append(f"doctor exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return lines


def run_parent(args: argparse.Namespace) -> int:
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="soak-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    workers = [Worker(i) for i in range(args.workers)]
    tally = Tally()
    t0 = time.monotonic()
    for w in workers:
        start(w, root, args)
    next_kill = t0 + rng.uniform(args.kill_min, args.kill_max)
    while not all(w.done for w in workers):
        now = time.monotonic()
        if now - t0 > args.max_seconds:
            tally.notes.append(f"stopped after {args.max_seconds:g} s with workers unfinished")
            for w in workers:
                if w.proc and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait()
            break
        for w in workers:
            if w.done or w.proc is None or w.proc.poll() is None:
                continue
            err = (root / f"worker_{w.index}.err").read_text(errors="replace").strip()
            if w.proc.returncode == 0:
                w.done = True
            else:
                w.failures.append(f"exit {w.proc.returncode}: {err[-300:]}")
                check(root, w.index, tally)
                start(w, root, args)
        if now >= next_kill and (args.max_kills is None or tally.kills < args.max_kills):
            running = [w for w in workers if not w.done and w.proc is not None and w.proc.poll() is None]
            if running:
                victim = rng.choice(running)
                assert victim.proc is not None
                victim.proc.send_signal(signal.SIGKILL)
                victim.proc.wait()
                tally.kills += 1
                check(root, victim.index, tally)
                start(victim, root, args)
            next_kill = now + rng.uniform(args.kill_min, args.kill_max)
        time.sleep(0.005)
    elapsed = time.monotonic() - t0

    acked = on_disk = 0
    for w in workers:
        a, d = check(root, w.index, tally)
        acked += a
        on_disk += d
    problems = run_doctor(root / "sessions")
    failures = [f"worker {w.index}: {f}" for w in workers for f in w.failures]

    print(f"\nSoak: {args.workers} processes x {args.turns} turns, FakeBackend(piece_delay={args.piece_delay:g}), "
          f"kill -9 every {args.kill_min:g}-{args.kill_max:g} s, folder {root}\n")
    print("| processes | turns each | kill -9 | restarts | checks | turns acknowledged | turns on disk "
          "| lost | corrupt | doctor problems | time |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.workers} | {args.turns} | {tally.kills} | {sum(w.starts for w in workers) - len(workers)} "
          f"| {tally.checks} | {acked} | {on_disk} | {tally.lost} | {tally.corrupt} | {len(problems)} "
          f"| {elapsed:.0f} s |")
    for note in tally.notes + failures:
        print(f"\n- {note}", end="")
    for problem in problems:
        print(f"\n- doctor: {problem}", end="")
    print()
    ok = tally.lost == 0 and tally.corrupt == 0 and all(w.done for w in workers)
    if ok and args.smoke and not args.dir:
        shutil.rmtree(root, ignore_errors=True)  # a passing smoke run leaves nothing behind
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--piece-delay", type=float, default=0.01, help="FakeBackend delay per reply piece (s)")
    p.add_argument("--kill-min", type=float, default=0.05, help="shortest pause between kills (s)")
    p.add_argument("--kill-max", type=float, default=0.5, help="longest pause between kills (s)")
    p.add_argument("--max-seconds", type=float, default=300, help="give up after this long")
    p.add_argument("--max-kills", type=int, default=None, help="stop killing after this many (default: never)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dir", default=None, help="work folder (default: a new temporary one, kept)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true",
                   help="2 processes x 80 turns, 4 kills 0.2-0.5 s apart, seed 1: proves the script runs")
    args = p.parse_args()
    if args.smoke and args.worker is None:
        args.workers, args.turns, args.kill_min, args.kill_max = 2, 80, 0.2, 0.5
        # A bounded number of kills: on a busy machine a worker's start-up can outlast the
        # pause between kills, and an unbounded run would then never finish.
        args.max_seconds, args.piece_delay, args.max_kills = 120.0, 0.005, 4
        args.seed = 1 if args.seed is None else args.seed
    if args.worker is not None:
        return run_worker(Path(args.dir), args.worker, args.turns, args.piece_delay)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
